"""Selection scoring and look assignment: Triton kernels (interpreted on CPU) against the references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ps3_kernels.selection import assign_looks, assign_looks_reference, selection_probs, selection_probs_reference

from helpers import rel_err, run_triton


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
