"""Every op on both backends: gradients of every differentiable input against a float64 reference,
the custom-op contracts (``torch.library.opcheck``), and gradient-aware dispatch."""

from __future__ import annotations

import warnings

import pytest
import torch

import ps3_kernels
import ps3_kernels.backend as backend
from ps3_kernels import (
    TritonNotSupportedError,
    assign_looks,
    selection_probs,
    selection_probs_reference,
    sparse_patch_embed,
    sparse_patch_embed_reference,
    use_backend,
    varlen_prefix_attention,
    varlen_prefix_attention_reference,
)
from ps3_kernels.patch_embed import image_layout

from helpers import DEVICE, rel_err, to_device
from test_patch_embed import make_case
from test_selection_ops import scoring_inputs
from test_varlen_attention import make_inputs

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Gradient tolerances against float64 (a low-precision gradient carries the rounding of its inputs too).
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def grads_vs_float64(fn, reference, tensors: dict, others: dict, dtype, seed=0):
    """Relative errors of ``fn``'s output and of the gradients of every tensor in ``tensors`` (cast to
    ``dtype``) against ``reference`` on float64 copies, for one random output gradient."""
    leaves = {n: t.detach().to(DEVICE, dtype).requires_grad_() for n, t in tensors.items()}
    out = fn(**leaves, **to_device(others))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(grad.to(DEVICE, out.dtype))
    ref_leaves = {n: t.detach().to(dtype).double().requires_grad_() for n, t in tensors.items()}
    ref = reference(**ref_leaves, **others)
    ref.backward(grad.double())
    errors = {"out": rel_err(out.cpu(), ref)}
    for n, t in leaves.items():
        assert t.grad is not None, f"{n} got no gradient"
        assert t.grad.dtype == dtype, n
        errors[n] = rel_err(t.grad.cpu(), ref_leaves[n].grad)
    return errors


def run_on(backend_name, fn):
    def call(**kwargs):
        with use_backend(backend_name):
            return fn(**kwargs)
    return call


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", ["torch"])
def test_attention_gradients(backend_name, dtype):
    """The Triton backward is checked the same way, over more cases and head dims, in
    test_varlen_attention.py::test_triton_backward."""
    args = make_inputs([5, 40, 16, 3], 3, (19, 2, [1, 0, 1, 1]), head_dim=72, dtype=torch.float32, seed=11)
    tensors = {n: args.pop(n) for n in ("q", "k", "v", "prefix_k", "prefix_v")}
    errors = grads_vs_float64(run_on(backend_name, varlen_prefix_attention), varlen_prefix_attention_reference,
                              tensors, args, dtype)
    assert max(errors.values()) < TOL[dtype], errors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_patch_embed_gradients(backend_name, dtype):
    images, sizes, tokens, weight, bias, pos_table, pos_index, res_table, res_index = make_case(
        [(6, 5), (12, 9)], [[(12, 12), (8, 4)], [(12, 8), (36, 28)]], 4, 16, torch.float32, torch.float32, seed=4)
    tensors = dict(weight=weight, bias=bias, pos_table=pos_table, res_table=res_table)
    others = dict(images=[im.to(dtype) for im in images], resized_sizes=sizes, tokens=tokens, pos_index=pos_index,
                  res_index=res_index)
    errors = grads_vs_float64(run_on(backend_name, sparse_patch_embed), sparse_patch_embed_reference, tensors,
                              others, dtype)
    assert max(errors.values()) < TOL[dtype], errors


def test_patch_embed_image_gradient_on_the_reference():
    """Images get gradients from the reference (through the resize): auto never drops them, and an
    explicit triton refuses, naming the input."""
    images, sizes, tokens, weight, bias, pos_table, pos_index, _, _ = make_case(
        [(6, 5), (12, 9)], [[(12, 12)], [(36, 28)]], 4, 8, torch.float32, torch.float32, seed=5, with_res=False)
    args = (sizes, tokens, weight, bias, pos_table, pos_index)
    errors = grads_vs_float64(run_on("torch", lambda image0, **kw: sparse_patch_embed([image0, images[1]], *args)),
                              lambda image0: sparse_patch_embed_reference([image0, images[1].double()], sizes, tokens,
                                                                          weight.double(), bias.double(),
                                                                          pos_table.double(), pos_index),
                              {"image0": images[0]}, {}, torch.float32)
    assert errors["image0"] < 1e-5, errors
    with use_backend("triton"), pytest.raises(TritonNotSupportedError, match="images require"):
        sparse_patch_embed([images[0].requires_grad_(), images[1]], *args)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("hr_shape", [None, (12, 13, 7)], ids=["lowres", "highres"])
def test_selection_probs_gradients(backend_name, dtype, hr_shape):
    feature, prompt, hr, hp = scoring_inputs(2, 40, 9, 5, hr_shape, torch.float32, seed=8)
    tensors = dict(feature=feature, prompt=prompt)
    if hr is not None:
        tensors.update(highres_feature=hr, highres_prompt=hp)
    errors = grads_vs_float64(run_on(backend_name, selection_probs), selection_probs_reference, tensors, {}, dtype)
    assert max(errors.values()) < TOL[dtype], errors


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_assign_looks_is_not_differentiable(backend_name):
    """An integer map on both backends: probabilities that require grad give an output without grad_fn."""
    probs = torch.rand(2, 12, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_()
    quotas = torch.tensor([[3, 2], [0, 5]], device=DEVICE)
    with use_backend(backend_name):
        out = assign_looks(probs, quotas)
    assert out.dtype == torch.long and not out.requires_grad
    assert torch.equal(out, ps3_kernels.assign_looks_reference(probs.detach(), quotas))


# ----------------------------------------------------------------------------- custom-op contracts


def _op_cases():
    """(op name, args) for every registered op, with inputs that require grad where it is differentiable."""
    import ps3_kernels.triton.patch_embed  # noqa: F401  (registering the ops)
    import ps3_kernels.triton.selection  # noqa: F401
    import ps3_kernels.triton.varlen_attention  # noqa: F401

    att = make_inputs([3, 18], 2, (5, 1, [0, 0]), head_dim=16, dtype=torch.float32, requires_grad=True)
    images, sizes, tokens, weight, bias, pos, pos_index, res, res_index = make_case(
        [(6, 5), (12, 9)], [[(12, 12), (8, 4)], [(12, 8), (36, 28)]], 4, 16, torch.float32, torch.float32, seed=4)
    pixels, geometry = image_layout(images, sizes)
    token_args = (tokens.image, tokens.scale, tokens.row, tokens.col)
    weight, bias, pos, res = (t.requires_grad_() for t in (weight, bias, pos, res))
    feature, prompt, hr, hp = (t.requires_grad_() for t in scoring_inputs(2, 20, 4, 3, (8, 9, 7), torch.float32))
    with torch.no_grad():
        _, logit, argmax = torch.ops.ps3_kernels.selection_probs(*to_device((feature, prompt, hr, hp)))
    return {
        "varlen_prefix_attention": (att["q"], att["k"], att["v"], att["cu_seqlens"], att["prefix_k"],
                                    att["prefix_v"], att["prefix_index"], 0.25, None),
        "sparse_patch_embed": (pixels, geometry, *token_args, weight, bias, pos, pos_index, res, res_index),
        "gather_patches": (pixels, geometry, *token_args, weight.detach()),
        "selection_probs": (feature, prompt, hr, hp),
        "selection_probs_backward": (torch.randn(2, 4, 3), logit.cpu(), argmax.cpu(), *(t.detach() for t in (
            feature, prompt, hr, hp)), True, [True, False, True, True]),
        "assign_looks": (torch.rand(2, 12).requires_grad_(), torch.tensor([[3, 2], [0, 5]])),
    }


@pytest.mark.skipif(not backend.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("name", ["varlen_prefix_attention", "sparse_patch_embed", "gather_patches",
                                  "selection_probs", "selection_probs_backward", "assign_looks"])
def test_opcheck(name):
    """Schema, fake (meta) impl, autograd registration and AOT dispatch of every registered op."""
    args = to_device(_op_cases()[name])
    if name in ("gather_patches", "selection_probs_backward"):  # no input requires grad: the
        # autograd-registration check does not apply
        torch.library.opcheck(getattr(torch.ops.ps3_kernels, name).default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    else:
        torch.library.opcheck(getattr(torch.ops.ps3_kernels, name).default, args)


# ----------------------------------------------------------------------------- dispatch


def test_every_op_states_its_triton_support():
    support = ps3_kernels.triton_support()
    assert set(support) == {"varlen_prefix_attention", "sparse_patch_embed", "selection_probs", "assign_looks"}
    for s in support.values():
        assert s.dtypes and str(s).startswith(s.op)
    assert "images" not in support["sparse_patch_embed"].differentiable
    assert set(support["selection_probs"].differentiable) == {"feature", "prompt", "highres_feature",
                                                              "highres_prompt"}


@pytest.fixture
def auto_on_gpu(monkeypatch):
    """Make ``auto`` treat these CPU tensors as the GPU tensors it would run Triton on."""
    monkeypatch.setattr(backend, "_on_gpu", lambda tensors: True)
    monkeypatch.setattr(backend, "_warned", set())


def test_auto_falls_back_for_a_missing_gradient_and_says_why(auto_on_gpu):
    images, sizes, tokens, weight, bias, pos, pos_index, _, _ = make_case(
        [(6, 5)], [[(12, 12)]], 4, 8, torch.float32, torch.float32, seed=5, with_res=False)
    image = images[0].clone().requires_grad_()
    args = ([image], sizes, tokens, weight, bias, pos, pos_index)
    with use_backend("auto"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = sparse_patch_embed(*args)
    (grad,) = torch.autograd.grad(out.sum(), image)
    assert grad.abs().sum() > 0
    reason = "images require grad and the Triton path computes no gradient for them"
    assert [str(w.message) for w in caught] == [f"sparse_patch_embed runs the PyTorch reference: {reason}"]
    assert ps3_kernels.not_supported_reasons("sparse_patch_embed", *args) == [reason]
    with torch.no_grad():  # no gradient needed: nothing keeps auto from the kernel
        assert ps3_kernels.not_supported_reasons("sparse_patch_embed", *args) == []


def test_auto_runs_triton_with_gradients_where_it_has_them(auto_on_gpu):
    """Selection heads need gradients: the Triton path has them now, so auto keeps it."""
    feature, prompt, _, _ = scoring_inputs(2, 20, 4, 3, None, torch.float32)
    feature.requires_grad_()
    reasons = ps3_kernels.not_supported_reasons("selection_probs", feature, prompt)
    assert reasons == []
    assert backend.dispatch(ps3_kernels.selection.PROBS_SUPPORT, reasons, [feature]) == "triton"
    doubled = feature.double()
    assert ps3_kernels.not_supported_reasons("selection_probs", doubled, prompt) == [
        "the promoted input is float64 (the Triton path takes float32, float16, bfloat16)"]
