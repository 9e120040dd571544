"""Graph-safe launches in the vision forward: its launch count does not grow with the number of images
or looks, a repeated forward at fixed shapes copies nothing from the host, it traces as one graph
with the Triton ops in it, and (on a GPU) it can be captured in a CUDA graph."""

from __future__ import annotations

import pytest
import torch

import ps3_kernels.backend as backend
import ps3_kernels.layout as layout
from ps3 import PS3VisionModel
from ps3.demo import randomize_parameters_
from ps3_kernels import use_backend
from ps3_kernels.counting import count_launches

from helpers import DEVICE, rel_err, tiny_vision_config

# Counted but not run under the interpreter (their outputs index nothing; the look assignment runs).
DRY = ("_fwd_kernel", "_embed_kernel", "_cosine_map_kernel", "_probs_kernel")


@pytest.fixture(scope="module")
def model():
    return randomize_parameters_(PS3VisionModel(tiny_vision_config()), seed=2).to(DEVICE).eval()


@pytest.fixture
def gpu_metadata(monkeypatch):
    """The ops validate index tensors on the CPU (free there); count what a GPU forward launches."""
    monkeypatch.setattr(backend, "host_readable", lambda t: False)


def forward_counts(model, backend_name, images, **kwargs):
    with torch.no_grad(), use_backend(backend_name):
        # The first call at a layout also builds its device tables (copies, on a GPU) and block schedules.
        for _ in range(2 if backend_name == "triton" or DEVICE == "cuda" else 1):
            with count_launches(dry=DRY) as counts:
                model(images, **kwargs)
    return counts


@pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_launch_count_does_not_grow_with_images_or_looks(model, backend_name, gpu_metadata):
    counts = {(b, looks): forward_counts(model, backend_name, torch.randn(b, 3, 224, 196, device=DEVICE),
                                         num_look_close=looks)
              for b in (1, 2, 3) for looks in (1, 3)}
    base = counts[(2, 1)]
    for key, c in counts.items():
        if key[0] > 1:
            assert (c.aten, c.triton, c.custom) == (base.aten, base.triton, base.custom), key
    # One image needs no copy to pack its low-res tokens (nor, on the torch backend, to pad them).
    assert counts[(1, 1)].launches == counts[(1, 3)].launches <= base.launches
    if backend_name == "triton":  # every kernel of the forward is a Triton op: 3 per layer pass + 4 more
        assert base.triton["_fwd_kernel"] == 2 * len(model.vision_model.trunk.blocks)
        assert base.custom["varlen_prefix_attention"] == base.triton["_fwd_kernel"]


@pytest.mark.parametrize("backend_name", ["triton", "torch"])
def test_repeated_forward_copies_nothing_from_the_host(model, backend_name, gpu_metadata):
    """Index tables are built from host ints once per layout; the second call makes none."""
    for images in (torch.randn(2, 3, 224, 196, device=DEVICE),
                   [torch.randn(3, 224, 196, device=DEVICE), torch.randn(3, 150, 224, device=DEVICE)]):
        layout._TABLES.clear()
        with torch.no_grad(), use_backend(backend_name):
            with count_launches(dry=DRY) as first:
                model(images, num_look_close=2)
            with count_launches(dry=DRY) as second:
                model(images, num_look_close=2)
        assert first.views["lift_fresh"] > 0
        assert second.views["lift_fresh"] == 0


@pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed")
def test_vision_forward_traces_as_one_graph_with_triton_ops():
    """torch.compile(fullgraph=True) with the Triton custom ops in the graph (aot_eager: the ops run
    as compiled by Triton, or interpreted on the CPU), forward and backward."""
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config(depth=2, select_based_on_layer=[0, 1])),
                                  seed=3).to(DEVICE).train()
    x = torch.randn(2, 3, 224, 200, device=DEVICE)
    prompt = torch.randn(2, 64, device=DEVICE, requires_grad=True)

    def loss(out):
        return out.last_hidden_state.square().mean() + sum(p.sum() for p in out.selection_probs)

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch._dynamo.reset()  # no state from other tests' compiles of the same forward (and none left for them)
    try:
        with use_backend("triton"):
            got = loss(compiled(x, num_look_close=1, prompt=prompt))
            (got_grad,) = torch.autograd.grad(got, prompt)
            ref = loss(model(x, num_look_close=1, prompt=prompt))
            (ref_grad,) = torch.autograd.grad(ref, prompt)
    finally:
        torch._dynamo.reset()
    assert rel_err(got, ref) < 1e-6 and rel_err(got_grad, ref_grad) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_vision_forward_captures_in_a_cuda_graph():
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config()), seed=4).cuda().eval()
    x = torch.randn(2, 3, 224, 196, device="cuda")
    other = torch.randn_like(x)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: kernels compiled, per-layout tables built
            model(x, num_look_close=2)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x, num_look_close=2).last_hidden_state
        x.copy_(other)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, model(other, num_look_close=2).last_hidden_state) < 1e-5
