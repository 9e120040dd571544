"""Stage ``no_sync``: the vision forward of a two-image list (Triton backend) in CUDA sync-debug mode
``"error"`` after a warm-up call, once per forward-argument set of ``tests/test_no_host_sync.py``:
any host synchronisation raises. The dry run checks the same with every host read of a tensor
value forbidden (PyTorch backend)."""

from __future__ import annotations

import torch

from ps3_kernels import use_backend

from .base import Shapes, Stage, StageContext, WorkItem, seed
from .checks import check_item
from .workloads import no_sync_forward


def check_no_host_sync(ctx: StageContext, index: int) -> dict:
    from test_no_host_sync import FORWARD_KWARGS, forbid_host_reads

    from helpers import tiny_vision_config, to_device
    from ps3 import PS3VisionModel
    from ps3.demo import randomize_parameters_

    device = ctx.shapes.device
    kwargs = {k: to_device(v, device) for k, v in FORWARD_KWARGS[index].items()}
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config()), seed=2).to(device).eval()
    gen = torch.Generator().manual_seed(seed())
    images = [torch.randn(3, 224, 180, generator=gen).to(device), torch.randn(3, 150, 224, generator=gen).to(device)]
    prompt = torch.randn(2, 64, generator=gen).to(device)
    with torch.no_grad():
        with use_backend("triton" if ctx.cuda else "torch"):
            model(images, prompt=prompt, **kwargs)
        if ctx.cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                with use_backend("triton"):
                    model(images, prompt=prompt, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            with use_backend("torch"), forbid_host_reads():
                model(images, prompt=prompt, **kwargs)
    return dict(errors={}, tol=None, shape=f"tiny model, 2 images, {FORWARD_KWARGS[index]}")


def items(sh: Shapes) -> list[WorkItem]:
    from test_no_host_sync import FORWARD_KWARGS

    return [check_item(f"no host sync {kwargs}", 1.0, lambda ctx, i=i: check_no_host_sync(ctx, i),
                       (no_sync_forward(i),) if sh.gpu else ())
            for i, kwargs in enumerate(FORWARD_KWARGS)]


STAGE = Stage("no_sync", 0.02, __doc__.split("\n\n")[0], items)
