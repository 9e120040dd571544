"""The vision forward must not read device values on the host (no implicit syncs).

On CUDA this is ``torch.cuda.set_sync_debug_mode("error")``. On CPU the same property is
checked by making every host read of a tensor value raise while the model runs: ``.item()``,
``.tolist()``, truth tests, int/float conversion and boolean-mask indexing (whose output size
depends on the data). The ops' index checks read CPU tensors (free on the CPU, skipped for GPU
tensors outside checked mode); the guard makes the ops treat tensors as GPU tensors.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import ps3_kernels.backend
from ps3 import PS3VisionModel
from ps3.demo import randomize_parameters_
from ps3_kernels import use_backend

from helpers import tiny_vision_config


class HostRead(RuntimeError):
    pass


@contextlib.contextmanager
def forbid_host_reads(record: list | None = None):
    """Every host read of a tensor value raises :class:`HostRead`; with ``record``, each is
    appended to it (its method name) and allowed instead."""
    names = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"]
    saved = {n: getattr(torch.Tensor, n) for n in names}

    def refuse(name):
        def method(self, *args, **kwargs):
            if record is None:
                raise HostRead(f"Tensor.{name} reads a device value on the host")
            record.append(name)
            return saved[name](self, *args, **kwargs)
        return method

    original_getitem = torch.Tensor.__getitem__

    def getitem(self, index):
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
            if record is None:
                raise HostRead("boolean-mask indexing has a data-dependent size")
            record.append("boolean-mask indexing")
        return original_getitem(self, index)

    host_readable = ps3_kernels.backend.host_readable
    try:
        for n in names:
            setattr(torch.Tensor, n, refuse(n))
        torch.Tensor.__getitem__ = getitem
        ps3_kernels.backend.host_readable = lambda t: False
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        torch.Tensor.__getitem__ = original_getitem
        ps3_kernels.backend.host_readable = host_readable


def test_guard_catches_a_host_read():
    x = torch.ones(3)
    with forbid_host_reads(), pytest.raises(HostRead):
        if x.sum() > 0:
            pass


# Forward arguments of a two-image list (also run on CUDA in sync-debug mode by benchmarks/gpu_suite.py).
FORWARD_KWARGS = [
    dict(num_look_close=2),
    dict(num_token_look_close=[13, 40]),
    dict(num_look_close="all", only_select_first_n_scale=[1, 2]),
    dict(output_hidden_states=False, is_global_text=torch.tensor([True, False])),
]


@pytest.mark.parametrize("kwargs", FORWARD_KWARGS)
def test_vision_forward_has_no_host_reads(kwargs):
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config()), seed=2).eval()
    images = [torch.randn(3, 224, 180), torch.randn(3, 150, 224)]
    prompt = torch.randn(2, 64)
    with torch.no_grad(), use_backend("torch"), forbid_host_reads():
        model(images, prompt=prompt, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debug mode needs a GPU")
def test_cuda_forward_has_no_syncs():
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config()), seed=2).cuda().eval()
    x = torch.randn(2, 3, 224, 224, device="cuda")
    with torch.no_grad():
        model(x, num_look_close=2)  # warm-up: lazy initialisation may sync
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x, num_look_close=2)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kwargs", [dict(num_look_close=2), dict(output_hidden_states=False)])
def test_vision_forward_traces_as_one_graph(kwargs):
    """torch.compile(fullgraph=True) fails on any graph break, host sync or data-dependent shape."""
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config()), seed=3).eval()
    x = torch.randn(2, 3, 224, 200)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad(), use_backend("torch"):
        got = compiled(x, **kwargs)
        ref = model(x, **kwargs)
    key = "last_hidden_state" if "num_look_close" in kwargs else "pooled_output"
    assert torch.equal(getattr(got, key), getattr(ref, key))


def test_vision_forward_traces_with_dynamic_shapes_and_a_changed_look_count():
    """With dynamic shapes dynamo passes ints such as ``num_look_close`` as symbolic ints: the
    argument checks must trace them too (formatting one into an error message does not)."""
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config(depth=2, select_based_on_layer=[0, 1])), seed=3).eval()
    x = torch.randn(2, 3, 224, 200)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    try:
        with torch.no_grad(), use_backend("torch"):
            for looks in (1, 2):
                got, ref = compiled(x, num_look_close=looks), model(x, num_look_close=looks)
                assert torch.equal(got.last_hidden_state, ref.last_hidden_state)
                assert all(torch.equal(g, r) for g, r in zip(got.selection_maps, ref.selection_maps))
    finally:
        torch._dynamo.reset()
