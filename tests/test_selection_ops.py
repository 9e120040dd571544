"""Selection scoring and look assignment: Triton kernels (interpreted on CPU) against the references."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from ps3_kernels import use_backend
from ps3_kernels.counting import count_launches
from ps3_kernels.selection import assign_looks, assign_looks_reference, selection_probs, selection_probs_reference

from helpers import DEVICE, rel_err, run_triton, to_device
from test_no_host_sync import forbid_host_reads


# ----------------------------------------------------------------------------- scoring


def scoring_inputs(B, C, h, w, hr_shape, dtype, seed=0):
    """Features laid out like the model's (channels-last memory behind a (B, C, h, w) view)."""
    gen = torch.Generator().manual_seed(seed)
    feature = torch.randn(B, h, w, C, generator=gen).permute(0, 3, 1, 2).to(dtype)
    prompt = torch.randn(B, C, generator=gen).to(dtype)
    if hr_shape is None:
        return feature, prompt, None, None
    C2, H2, W2 = hr_shape
    highres = torch.randn(B, C2, H2, W2, generator=gen).to(dtype)
    return feature, prompt, highres, torch.randn(B, C2, generator=gen).to(dtype)


HR_SHAPES = [None, (12, 18, 10), (12, 13, 7), (8, 4, 3)]  # none; 2x2 bins; overlapping bins; bins of one cell


@pytest.mark.parametrize("hr_shape", HR_SHAPES)
def test_probs_fp32(poisoned, hr_shape):
    args = scoring_inputs(2, 70, 9, 5, hr_shape, torch.float32, seed=1)
    out = run_triton(selection_probs, *args)
    ref = selection_probs_reference(*args)
    ref64 = selection_probs_reference(*[None if a is None else a.double() for a in args])
    # The CPU reference's softmax multiplies by a reciprocal, CUDA's (and the kernel's) divides.
    assert (out - ref).abs().max() < 3e-7
    assert rel_err(out, ref64) < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hr_shape", HR_SHAPES[:2])
def test_probs_half_rounds_like_reference(poisoned, dtype, hr_shape):
    """Each elementwise step is rounded to the input dtype as the reference's ops are: equal values,
    or one unit in the last place off where a channel sum rounds the other way."""
    args = scoring_inputs(2, 70, 9, 5, hr_shape, dtype, seed=2)
    out = run_triton(selection_probs, *args)
    ref = selection_probs_reference(*args)
    assert out.dtype == dtype
    diff = (out.float() - ref.float()).abs()
    assert torch.all(diff <= torch.finfo(dtype).eps * ref.float().abs())
    assert (diff > 0).float().mean() < 0.05


@pytest.mark.parametrize("hr_shape", [None, (12, 4, 4)])
def test_probs_equal_inputs_tie(poisoned, hr_shape):
    """Positions with equal feature vectors (a nearest-upsampled map) get bit-equal probabilities,
    wherever they sit in the program's blocks: the ties selection relies on survive."""
    feature, prompt, hr, hp = scoring_inputs(2, 40, 4, 4, hr_shape, torch.float32, seed=3)
    feature = F.interpolate(feature, scale_factor=2, mode="nearest")  # (2, 40, 8, 8) in 2x2 blocks
    if hr is not None:
        hr = F.interpolate(hr, scale_factor=(4, 2), mode="nearest")  # (16, 8): a 2x2 block's bins are equal
    out = run_triton(selection_probs, feature, prompt, hr, hp)
    blocks = out.unflatten(1, (4, 2)).unflatten(3, (4, 2))
    assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    assert (out - selection_probs_reference(feature, prompt, hr, hp)).abs().max() < 3e-7


# ----------------------------------------------------------------------------- scoring: backward

NAMES = ("feature", "prompt", "highres_feature", "highres_prompt")


def triton_and_float64(args, needs=None, views=None, seed=0):
    """Forward and backward of the Triton path and of the reference on float64 copies of the same
    values, for one random output gradient: ``{"out" or input name: (triton, float64)}`` (the
    gradients of the inputs in ``needs``, default all given; the others must get none).
    ``views`` maps the leaves to the tensors passed to the op (non-contiguous layouts)."""
    needs = needs or [a is not None for a in args]
    views = views or (lambda *leaves: leaves)
    leaves = [a.detach().to(DEVICE).requires_grad_(n) if a is not None else None for a, n in zip(args, needs)]
    with use_backend("triton"):
        out = selection_probs(*views(*leaves))
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(grad.to(DEVICE, out.dtype))
    ref_leaves = [a.detach().double().requires_grad_(n) if a is not None else None for a, n in zip(args, needs)]
    ref = selection_probs_reference(*views(*ref_leaves))
    ref.backward(grad.double())
    pairs = {"out": (out.detach().cpu(), ref.detach())}
    for name, leaf, ref_leaf, need in zip(NAMES, leaves, ref_leaves, needs):
        if need:
            assert leaf.grad is not None and leaf.grad.dtype == leaf.dtype, name
            pairs[name] = (leaf.grad.cpu(), ref_leaf.grad)
        elif leaf is not None:
            assert leaf.grad is None, name
    return pairs


def errors(pairs):
    return {name: rel_err(got, want) for name, (got, want) in pairs.items()}


GEOMETRIES = {  # (B, C, h, w, high-res (C2, H2, W2))
    "grid1x1": (1, 8, 1, 1, (6, 5, 7)),
    "odd_overlapping_B3": (3, 12, 5, 3, (6, 11, 7)),
    "highres_smaller_than_grid": (2, 10, 5, 4, (6, 3, 2)),
    "nonsquare_wide_grid": (1, 10, 3, 7, (4, 13, 5)),
    "no_highres_B3": (3, 9, 4, 4, None),
    # several programs per map at the interpreter's tiles too: prompt partials summed over 5 rows (2 row blocks)
    "several_blocks": (2, 12, 17, 16, (6, 35, 33)),
}


@pytest.mark.parametrize("geometry", GEOMETRIES.values(), ids=GEOMETRIES.keys())
def test_probs_backward_geometries(poisoned, geometry):
    """Every gradient within fp32 rounding of float64 (adaptive bins that overlap, or that hold one
    high-res pixel many times over), every element written, the same bits on a second run."""
    B, C, h, w, hr_shape = geometry
    args = scoring_inputs(B, C, h, w, hr_shape, torch.float32, seed=5)
    pairs = triton_and_float64(args)
    assert max(errors(pairs).values()) < 1e-6, errors(pairs)
    again = triton_and_float64(args)
    assert all(torch.equal(again[n][0], pairs[n][0]) for n in pairs)


SUBSETS = [s for k in range(1, 5) for s in itertools.combinations(NAMES, k)]


@pytest.mark.parametrize("subset", SUBSETS, ids=["+".join(n.replace("highres_", "hr_") for n in s) for s in SUBSETS])
def test_probs_backward_each_subset_of_inputs(subset):
    args = scoring_inputs(2, 6, 3, 4, (5, 5, 7), torch.float32, seed=6)
    pairs = triton_and_float64(args, needs=[n in subset for n in NAMES])
    assert set(pairs) == {"out", *subset}
    assert max(errors(pairs).values()) < 1e-6, errors(pairs)


def test_probs_backward_max_pool_ties():
    """Equal high-res cosines inside bins: each bin's gradient goes to its first cell in raster order,
    as PyTorch's max pool routes it (and the forward's argmax is PyTorch's index).

    The pixels are scaled one-hot vectors, so their cosines are one prompt entry each, exactly, in
    any arithmetic (equal vectors are not enough: the CPU reference sums the channels of different
    pixels in different orders)."""
    feature, prompt, _, hp = scoring_inputs(2, 8, 3, 3, (4, 1, 1), torch.float32, seed=7)
    gen = torch.Generator().manual_seed(7)
    channel = torch.randint(0, 3, (2, 7, 8), generator=gen)
    channel[1] = 2  # image 1: every cell of every bin ties
    hr = F.one_hot(channel, 4).permute(0, 3, 1, 2) * torch.rand(2, 1, 7, 8, generator=gen).add(0.5)
    pairs = triton_and_float64([feature, prompt, hr, hp])
    assert max(errors(pairs).values()) < 1e-6, errors(pairs)
    got, want = pairs["highres_feature"]
    assert torch.equal(got.ne(0).any(1), want.ne(0).any(1))  # the same pixels receive gradients
    cos = (F.normalize(hr, dim=1) * F.normalize(hp, dim=-1)[:, :, None, None]).sum(1)
    _, index = F.adaptive_max_pool2d(cos, (3, 3), return_indices=True)
    with use_backend("triton"):
        argmax = torch.ops.ps3_kernels.selection_probs(*to_device((feature, prompt, hr, hp)))[2]
    assert torch.equal(argmax.cpu().long(), index)


def test_probs_backward_zero_and_tiny_vectors(poisoned):
    """F.normalize's eps: zero vectors, one of norm below 1e-12 (scaled by 1/eps, no norm gradient),
    a zero prompt (image 0) and a zero high-res prompt (image 1)."""
    feature, prompt, hr, hp = scoring_inputs(2, 8, 4, 3, (6, 9, 5), torch.float32, seed=8)
    feature[:, :, 0, 0] = 0
    feature[:, :, 2, 1] *= 1e-13
    hr[:, :, 3:6, 1] = 0
    prompt[0] = 0
    hp[1] = 0
    pairs = triton_and_float64([feature, prompt, hr, hp])
    for name, (got, want) in pairs.items():
        for b in range(2):  # per image: a zero prompt's gradient is 1e12 times the other's
            assert rel_err(got[b], want[b]) < 1e-6, (name, b)


def test_probs_backward_noncontiguous(poisoned):
    """Sliced, transposed and expanded (stride 0) inputs and a transposed output gradient."""
    feature, prompt, hr, hp = scoring_inputs(3, 16, 5, 4, (6, 6, 9), torch.float32, seed=9)
    args = [feature, prompt[:1], hr.transpose(2, 3), hp]  # hr stored (B, C2, W2, H2)

    def views(f, p, h, q):
        return f[:, ::2], p.expand(3, -1)[:, ::2], h.transpose(2, 3)[:, 1:5], q[:, 1:5]

    pairs = triton_and_float64(args, views=views)
    assert max(errors(pairs).values()) < 1e-6, errors(pairs)
    leaves = [a.detach().to(DEVICE).requires_grad_() for a in args]
    with use_backend("triton"):
        out = selection_probs(*views(*leaves))
    grad = torch.randn(3, 4, 5).to(DEVICE).transpose(1, 2)  # not contiguous
    out.backward(grad)
    ref = [a.detach().double().requires_grad_() for a in args]
    selection_probs_reference(*views(*ref)).backward(grad.double())
    assert max(rel_err(a.grad.cpu(), r.grad) for a, r in zip(leaves, ref)) < 1e-6


def test_probs_mixed_dtypes_gradients():
    """Inputs are promoted (here to fp32) and each gradient comes back in its input's dtype."""
    feature, prompt, hr, hp = scoring_inputs(2, 12, 4, 3, (6, 7, 5), torch.float32, seed=10)
    args = [feature.bfloat16(), prompt, hr.half(), hp.bfloat16()]
    pairs = triton_and_float64(args)
    assert pairs["out"][0].dtype == torch.float32 and errors(pairs)["out"] < 1e-6
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}
    for name, a in zip(NAMES, args):
        assert errors(pairs)[name] < tol[a.dtype], (name, errors(pairs)[name])


def test_probs_backward_clamp_bounds():
    """The backward of the clamp at +-10 (unreachable from finite features, whose |5 cos| <= 5): zero
    outside, passing at the bounds as ``torch.clamp``'s does; driven through the backward op with
    crafted logits, against autograd of the reference's tail in float64."""
    feature, prompt, _, _ = scoring_inputs(1, 6, 2, 4, None, torch.float32, seed=11)
    logit = torch.tensor([[[-12.0, -10.0, -3.5, 0.0], [2.0, 10.0, 10.5, 40.0]]])
    grad = torch.randn(1, 2, 4, generator=torch.Generator().manual_seed(0))
    with use_backend("triton"):
        got = torch.ops.ps3_kernels.selection_probs_backward(
            *to_device((grad, logit, torch.empty(0, dtype=torch.int32), feature, prompt)), None, None, False,
            [True, True, False, False])
    z = logit.double().requires_grad_()
    probs = F.softmax(F.pad(z.clamp(-10, 10)[..., None], (0, 1)), dim=-1)[..., 0]
    (d_cos,) = torch.autograd.grad(probs, z, grad.double())
    f, p = feature.double().requires_grad_(), prompt.double().requires_grad_()
    cos = (F.normalize(f, dim=1) * F.normalize(p, dim=-1)[:, :, None, None]).sum(1)
    want = torch.autograd.grad(cos, (f, p), 5 * d_cos)
    assert d_cos[0, 0, 0] == 0 and d_cos[0, 1, 2] == 0 and d_cos[0, 0, 1] != 0 and d_cos[0, 1, 1] != 0
    for g, w in zip(got[:2], want):
        assert rel_err(g.cpu(), w) < 1e-6
    assert got[2].numel() == got[3].numel() == 0


@pytest.mark.parametrize("batch", [1, 3])
def test_probs_launches(batch):
    """Forward: the high-res cosine map and the scoring; backward: one kernel and the prompt reduction.
    No ATen kernel, whatever the batch, and no host read of a device value (the kernels are recorded,
    not run: the interpreter copies)."""
    args = [a.requires_grad_() for a in to_device(scoring_inputs(batch, 8, 3, 3, (4, 7, 6), torch.float32))]
    dry = ("_cosine_map_kernel", "_probs_kernel", "_probs_bwd_kernel", "_prompt_grad_kernel")
    with use_backend("triton"), count_launches(dry=dry) as fwd, forbid_host_reads():
        out = selection_probs(*args)
    grad = torch.ones_like(out)
    with count_launches(dry=dry) as bwd, forbid_host_reads():
        out.backward(grad)
    assert dict(fwd.triton) == {"_cosine_map_kernel": 1, "_probs_kernel": 1} and fwd.launches == 2
    assert dict(bwd.triton) == {"_probs_bwd_kernel": 1, "_prompt_grad_kernel": 1} and bwd.launches == 2


# ----------------------------------------------------------------------------- look assignment


def upstream_looks(probs: torch.Tensor, quotas: torch.Tensor) -> torch.Tensor:
    """Upstream's loop: per image and look, earlier looks' patches get p = -1, then a stable
    descending top-k takes the look's quota."""
    B, n = probs.shape
    out = torch.full((B, n), -1, dtype=torch.long)
    for b in range(B):
        p = probs[b].clone()
        for look, k in enumerate(quotas[b].tolist()):
            top = torch.sort(p, descending=True, stable=True).indices[:k]
            out[b, top] = look
            p[top] = -1
    return out


def tied_probs(B, h, w, block, gen):
    """Probabilities in blocks of equal values, as nearest upsampling of the low-res map makes them."""
    low = torch.rand(B, 1, -(-h // block), -(-w // block), generator=gen)
    return F.interpolate(low, scale_factor=block, mode="nearest")[:, 0, :h, :w].flatten(1)


def run_both(probs, quotas):
    got = run_triton(assign_looks, probs, quotas)
    ref = assign_looks_reference(probs, quotas)
    assert got.dtype == ref.dtype == torch.long
    assert torch.equal(got, ref)
    return got


def test_heavy_ties_match_upstream_loop(poisoned):
    gen = torch.Generator().manual_seed(0)
    probs = tied_probs(3, 12, 10, 3, gen)
    quotas = torch.tensor([[7, 11, 4], [30, 0, 30], [1, 1, 1]])
    got = run_both(probs, quotas)
    assert torch.equal(got, upstream_looks(probs, quotas))


def test_exhausted_scale_and_zero_quotas(poisoned):
    gen = torch.Generator().manual_seed(1)
    probs = tied_probs(3, 6, 6, 2, gen)
    quotas = torch.tensor([[36, 0], [0, 0], [20, 16]])  # all patches in one look; none; all in two
    got = run_both(probs, quotas)
    assert torch.equal(got, upstream_looks(probs, quotas))
    assert (got[0] == 0).all() and (got[1] == -1).all() and (got[2] >= 0).all()


def test_padded_rows_of_smaller_images(poisoned):
    """Rows padded with -inf after an image's own patches; quotas fit each image's patch count."""
    gen = torch.Generator().manual_seed(2)
    counts = [48, 20, 35, 48]
    probs = torch.full((4, 48), float("-inf"))
    for b, n in enumerate(counts):
        probs[b, :n] = tied_probs(1, 8, 6, 2, gen)[0, :n]
    quotas = torch.tensor([[10, 10, 28], [5, 15, 0], [0, 35, 0], [3, 3, 3]])
    got = run_both(probs, quotas)
    assert torch.equal(got, upstream_looks(probs, quotas))
    for b, n in enumerate(counts):
        assert (got[b, n:] == -1).all()


def test_large_row_spans_program_blocks(poisoned):
    gen = torch.Generator().manual_seed(3)
    probs = tied_probs(2, 27, 27, 2, gen)
    quotas = torch.tensor([[85, 341, 200], [0, 700, 29]])
    got = run_both(probs, quotas)
    assert torch.equal(got, upstream_looks(probs, quotas))


def test_empty_inputs():
    assert run_triton(assign_looks, torch.rand(0, 5), torch.zeros(0, 2, dtype=torch.long)).shape == (0, 5)
    assert run_triton(assign_looks, torch.rand(2, 5), torch.zeros(2, 0, dtype=torch.long)).eq(-1).all()


@pytest.mark.parametrize("args,error", [
    ((torch.rand(2, 3, 4), torch.rand(2, 3)), ValueError),                              # feature not 4-D
    ((torch.rand(2, 3, 4, 4), torch.rand(2, 4)), ValueError),                           # prompt width
    ((torch.rand(2, 3, 4, 4), torch.rand(2, 3), torch.rand(2, 5, 8, 8), None), ValueError),
    ((torch.rand(2, 3, 4, 4), torch.rand(2, 3), torch.rand(2, 5, 8, 8), torch.rand(2, 4)), ValueError),
    ((torch.rand(2, 3, 4, 4), torch.ones(2, 3, dtype=torch.long)), TypeError),
])
def test_probs_validation(args, error):
    with pytest.raises(error):
        selection_probs(*args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast needs a GPU")
def test_probs_under_cuda_autocast_are_float32_on_both_backends():
    """Upstream's scoring under AMP is float32 math (autocast runs normalize, sum and softmax in
    float32): both backends return float32 probabilities of the bf16 inputs' values, equal to the
    float32 reference's."""
    args = [t.cuda() for t in scoring_inputs(2, 24, 5, 4, (16, 11, 9), torch.bfloat16)]
    want = selection_probs_reference(*(t.float() for t in args))
    for backend in ("torch", "triton"):
        with use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            got = selection_probs(*args)
        assert got.dtype == torch.float32
        assert rel_err(got, want) < 1e-6, backend
