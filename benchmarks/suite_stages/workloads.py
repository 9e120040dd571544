"""The compile workloads of the suite's work items: host code that launches the same Triton
kernels, with the same dtypes and launch configurations, as the item it stands for.

They are recorded, not run (:mod:`triton_launches`): by ``benchmarks/aot_report.py`` on the CPU
(the committed compile report, one row per specialisation), and by the precompile stage on the GPU
host, whose worker processes compile what they record into Triton's cache before the other
stages start. The kernels' specialisations do not depend on the batch, the number of tokens or
the resolution (``test_aot_report.py`` checks it), so the model-level workloads run a one-layer
trunk of the model's width and heads on two images at most, and the dense baselines at 756 px.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import torch

import bench_patch_embed
import bench_selection
import bench_varlen_attention
from launch_variants import Variant, use_variant
from ps3 import PS3VisionConfig
from ps3 import bench as ps3_bench
from ps3_kernels import use_backend, varlen_prefix_attention
from ps3_kernels.backend import triton_interpreted

from .base import DTYPES, Shapes, Workload


def _variant(variant: Variant | None):
    return use_variant(variant, interpreted=triton_interpreted()) if variant else contextlib.nullcontext()


def _suffix(variant: Variant | None) -> str:
    return f" [{variant.name}]" if variant and variant.override is not None else ""


def attention(sh: Shapes, tag: str, batch: int, look: bool, backward: bool = True,
              variant: Variant | None = None) -> Workload:
    """The op on ``batch`` looks over their prefixes (or the low-res pass), forward (+ backward)."""
    def run(device: str) -> None:
        lengths = [sh.look if look else sh.prefix_len] * batch
        case = bench_varlen_attention.make_case(lengths, list(range(batch)), DTYPES[tag], device, heads=sh.heads,
                                                head_dim=sh.head_dim, prefix_len=sh.prefix_len)
        if not look:
            case.update(prefix_k=None, prefix_v=None, prefix_index=None)
        names = [n for n in ("q", "k", "v", "prefix_k", "prefix_v") if case[n] is not None]
        leaves = [case[n].requires_grad_(backward) for n in names]
        with _variant(variant), torch.set_grad_enabled(backward):
            out = varlen_prefix_attention(**case, impl="triton")
            if backward:
                out.backward(torch.ones_like(out))
        del leaves

    kind = "look" if look else "low-res"
    return Workload(f"attention {kind} {tag} B={batch} {'fwd+bwd' if backward else 'fwd'}{_suffix(variant)}", run)


def patch_embed(sh: Shapes, tag: str, batch: int, backward: bool = True, variant: Variant | None = None) -> Workload:
    """The op on ``batch`` images (at most 4: 16 images of 3780 px are 2.7 GB on the CPU)."""
    batch = min(batch, 4)

    def run(device: str) -> None:
        case = bench_patch_embed.make_case(list(sh.scales), batch, sh.patch_tokens, DTYPES[tag], device,
                                           patch=sh.patch, width=sh.width)
        params = [case["weight"], case["bias"], *case["pos_tables"], *case["res_tables"]]
        for p in params:
            p.requires_grad_(backward)
        with _variant(variant), use_backend("triton"), torch.set_grad_enabled(backward):
            out = bench_patch_embed.sparse_embed(case)
            if backward:
                out.backward(torch.ones_like(out))

    return Workload(f"patch embed {tag} B={batch} {'fwd+bwd' if backward else 'fwd'}{_suffix(variant)}", run)


def selection(sh: Shapes, tag: str, batch: int, backward: bool = False, low_grid: int | None = None) -> Workload:
    """Scoring on the low-res grid (``low_grid``: another side) with the high-res map (backward:
    the gradients of all four inputs too), then the look assignment of every scale."""
    grid = low_grid or sh.low_grid

    def run(device: str) -> None:
        case = bench_selection.make_case(list(sh.scales), batch, sh.looks, sh.patch_tokens, DTYPES[tag], device,
                                         channels=sh.width, hr_channels=sh.sel_hr_channels, hr_grid=sh.sel_hr_grid,
                                         low_grid=grid)
        inputs = [case[k].requires_grad_(backward) for k in ("feature", "prompt", "hr_feature", "hr_prompt")]
        with use_backend("triton"), torch.set_grad_enabled(backward):
            probs = bench_selection.score(case)
            if backward:
                probs.backward(torch.ones_like(probs))
            bench_selection.assign(bench_selection.per_scale(probs.detach(), case["grids"]), case)
        del inputs

    return Workload(f"selection {tag} B={batch}{' fwd+bwd' if backward else ''}"
                    f"{f' {grid}x{grid} grid' if low_grid else ''}", run)


def recording_config(config: PS3VisionConfig) -> PS3VisionConfig:
    """``config`` with a one-layer trunk of the same width, heads and patch (and a narrow MLP): the
    same kernel launches per layer, a fraction of the host work when recorded on the CPU."""
    spec = config.trunk_spec()
    config = copy.deepcopy(config)
    for key, value in dict(model_name=f"recorded_{spec.width}x{spec.num_heads}", hidden_size=spec.width, depth=1,
                           num_heads=spec.num_heads, mlp_ratio=0.1, patch_size=spec.patch_size,
                           img_size=spec.img_size, select_based_on_layer=[0]).items():
        setattr(config, key, value)
    return config


@functools.lru_cache(maxsize=4)
def _recording_model(preset: str, resolution: int, device: str):
    p = ps3_bench.PRESETS[preset]
    return ps3_bench.build_model(recording_config(ps3_bench.model_config(p, resolution)), device, p.dtype)


def encoder(sh: Shapes, method: str, batch: int, backward: bool = False) -> Workload:
    """A ``ps3.bench`` method (``ps3-1``, ``ps3-6``, ``s2``, ``anyres``) on the e2e preset's model
    (one-layer trunk), bf16 on the GPU: forward, or forward and backward of every parameter."""
    images = min(batch, 2)
    resolution = sh.e2e_resolution if method.startswith("ps3") else 756

    def run(device: str) -> None:
        model = _recording_model(sh.e2e_preset, resolution, device)
        x = torch.randn(images, 3, resolution, resolution).to(device=device, dtype=next(model.parameters()).dtype)
        fn = ps3_bench.method_fn(method, model, resolution)
        with use_backend("triton"), torch.set_grad_enabled(backward):
            model.requires_grad_(backward)
            try:
                out = fn(x)
                if backward:
                    out.float().sum().backward()
            finally:
                model.requires_grad_(False)

    return Workload(f"{sh.e2e_preset} {method} {resolution} px B={images} {'fwd+bwd' if backward else 'fwd'}", run)


def parity_case(case: str) -> Workload:
    """An upstream fixture case on the Triton backend (``tests/test_model_parity.py``)."""
    def run(device: str) -> None:
        from test_model_parity import run_case

        with use_backend("triton"):
            run_case(case, device)

    return Workload(f"parity {case}", run)


def no_sync_forward(index: int) -> Workload:
    """The tiny model's forward of two images with ``FORWARD_KWARGS[index]`` (``tests/test_no_host_sync.py``)."""
    def run(device: str) -> None:
        from test_no_host_sync import FORWARD_KWARGS

        from helpers import tiny_vision_config, to_device
        from ps3 import PS3VisionModel

        model = PS3VisionModel(tiny_vision_config()).to(device).eval()
        kwargs = {k: to_device(v, device) for k, v in FORWARD_KWARGS[index].items()}
        images = [torch.randn(3, 224, 180, device=device), torch.randn(3, 150, 224, device=device)]
        with torch.no_grad(), use_backend("triton"):
            model(images, prompt=torch.randn(2, 64, device=device), **kwargs)

    return Workload(f"no host sync forward {index}", run)


def train_step(sh: Shapes, case) -> Workload:
    """A ``bench_train`` case's pre-training step (forward, backward and AdamW, gradient checkpointing,
    its autocast dtype) on a one-layer trunk and a one-layer text tower of the case's widths with
    narrow MLPs, a small vocabulary and 64 tokens per look, two images of 756 px at most: the same
    kernel launches, a fraction of the host work when recorded on the CPU."""
    import bench_train
    from ps3.bench.pretrain_step import make_batch, make_optimizer
    from ps3.bench.pretrain_step import train_step as step

    images, resolution = min(case.batch, 2), min(case.resolution, 756)

    def run(device: str) -> None:
        vision, text = bench_train.configs(case.model, 1, trunk_depth=1)
        vision.update(mlp_ratio=0.1, max_select_num=64)
        text.update(mlp_ratio=0.1, vocab_size=100)
        model = bench_train.build_model(vision, text).to(device).train()
        model.set_grad_checkpointing(True)
        batch = make_batch(images, resolution, text["vocab_size"], text["context_length"])
        with use_backend("triton"):
            step(model, make_optimizer(model), {k: v.to(device) for k, v in batch.items()},
                 getattr(torch, case.autocast) if case.autocast else None)

    return Workload(f"train step {case.model} {resolution} px B={images} {case.autocast or 'fp32'}", run)
