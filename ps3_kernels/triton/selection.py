"""Triton selection scoring and look assignment for PS3's high-res patch selection.

:func:`selection_probs_triton` computes, for every low-res grid position,

    logit = cos(feature, prompt)                                   (channel-normalised, eps 1e-12)
    logit = (logit + max over the position's adaptive-pool bin of cos(highres_feature, highres_prompt)) / 2
    prob  = softmax([clamp(5 * logit, -10, 10), 0])[0]

in one launch, or two with the high-res map: :func:`_cosine_map_kernel` scores every high-res
pixel once, then :func:`_probs_kernel` scores the low-res positions and max-pools each bin of that
map with a loop over its cells. Grid and bin sizes are run-time integers and no tile grows with
the geometry, so each dtype compiles once per kernel (with or without the high-res branch), in
seconds, whatever the grids.

Each operation follows the reference's order and rounding: normalise then multiply then sum
(two passes over the channels: norms first), IEEE division and square root, CUDA's ``expf``
(libdevice) for the softmax, and after every elementwise step a rounding to the input dtype,
which is what the reference's bf16/fp16 ops do. What still differs is the order of the channel
sums, so a probability can be one unit in the last place off the reference's (which itself
differs between CPU and GPU: the CPU softmax multiplies by a reciprocal, CUDA's divides, as here).
Selection compares probabilities exactly, so such a one-ulp difference can reorder two patches
whose probabilities were one ulp apart. The ties selection is built around survive: the
per-scale maps are nearest-upsampled copies of one value, and positions with equal feature
vectors get the same arithmetic, hence equal probabilities, wherever they sit in a block.

The backward is the reference's autograd in two launches: :func:`_probs_bwd_kernel` (one program
per block of low-res positions or of high-res pixels) writes the feature gradients and per-program
partial sums for the prompts, and :func:`_prompt_grad_kernel` reduces those in a fixed order (no
atomics: deterministic). The forward leaves it the pre-clamp logit and each bin's argmax (the first
maximum in raster order, as PyTorch's adaptive max pool picks it), so it recomputes no cosine it
does not differentiate; gradients are computed in fp32 and rounded once to the input dtype.

:func:`assign_looks_triton`: ``torch.sort`` (stable, descending) per scale for the whole batch,
then one kernel that turns each sorted position into its look (the quota interval its rank falls
in) and scatters it to the patch. No host sync.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..backend import promoted_dtype, triton_interpreted
from .common import TL_DTYPES, to_dtype_rtne

_EPS: tl.constexpr = tl.constexpr(1e-12)  # F.normalize's default

_SIZES = ("C", "h", "w", "C2", "H2", "W2", "kh", "kw", "n", "W", "low_blocks", "rows0", "rows1", "C0", "C1",
          "need_feat", "need_prompt", "need_hr_feat", "need_hr_prompt")


def _jit(fn):
    """``triton.jit`` that compiles one kernel for every geometry: sizes, flags and the batch and row
    strides (``s*_b``, ``s*_h``) are run-time integers, never specialised on their values; channel
    and column strides (``s*_c``, ``s*_w``) only on being 1, which is layout (channels-last or not)."""
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    runtime = [n for n in names if n in _SIZES or (n.startswith("s") and n.endswith(("_b", "_h")))]
    layout = [n for n in names if n.startswith("s") and n.endswith(("_c", "_w"))]
    return triton.jit(fn, do_not_specialize=runtime, do_not_specialize_on_alignment=layout)


# ----------------------------------------------------------------------------- scoring: forward


@triton.jit
def _round(x, DTYPE: tl.constexpr):
    """Round fp32 ``x`` to ``DTYPE`` and back: the rounding a reference op in that dtype applies."""
    return to_dtype_rtne(x, DTYPE).to(tl.float32)


@triton.jit
def _exp(x, INTERPRETED: tl.constexpr):
    """``expf`` as CUDA computes it (libdevice); the CPU interpreter has no libdevice and uses numpy's."""
    if INTERPRETED:
        out = tl.exp(x)
    else:
        out = libdevice.exp(x)
    return out


@triton.jit
def _softmax_pair(z, INTERPRETED: tl.constexpr):
    """``softmax([clamp(z, -10, 10), 0])``: both entries, each divided out (no ``1 - p`` cancellation)."""
    z = tl.minimum(tl.maximum(z, -10.0), 10.0)
    top = tl.maximum(z, 0.0)
    e_logit = _exp(z - top, INTERPRETED)
    e_zero = _exp(-top, INTERPRETED)
    return tl.math.div_rn(e_logit, e_logit + e_zero), tl.math.div_rn(e_zero, e_logit + e_zero)


@triton.jit
def _offsets(pos, W, s_h, s_w, FLAT: tl.constexpr):
    """Offsets of raster positions ``pos`` of a map ``W`` wide. ``FLAT``: its rows follow each other
    (``s_h == W * s_w``), so the offset is linear in ``pos`` and Triton sees the loads contiguous."""
    if FLAT:
        out = pos * s_w
    else:
        out = (pos // W) * s_h + (pos % W) * s_w
    return out


@triton.jit
def _cosine(X, offs, mask, stride_c, Prompt, stride_pc, C, DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Cosine of the prompt with the feature vectors at ``X + offs`` (one per row, channels ``stride_c`` apart).

    Computes ``sum_c round(round(x_c / |x|) * round(p_c / |p|))`` like the reference's
    ``(F.normalize(x) * F.normalize(p)).sum()``: norms in a first pass over the channels, the
    products of normalised values in a second.
    """
    sq = tl.zeros(offs.shape, dtype=tl.float32)
    psq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        x = tl.load(X + offs[:, None] + c[None, :] * stride_c, mask=mask[:, None] & c_mask[None, :], other=0.0)
        x = x.to(tl.float32)
        sq += tl.sum(x * x, axis=1)
        p = tl.load(Prompt + c * stride_pc, mask=c_mask, other=0.0).to(tl.float32)
        psq += p * p
    norm = tl.maximum(_round(tl.sqrt_rn(sq), DTYPE), _EPS)
    pnorm = tl.maximum(_round(tl.sqrt_rn(tl.sum(psq, axis=0)), DTYPE), _EPS)
    dot = tl.zeros(offs.shape, dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        x = tl.load(X + offs[:, None] + c[None, :] * stride_c, mask=mask[:, None] & c_mask[None, :], other=0.0)
        x = _round(tl.math.div_rn(x.to(tl.float32), tl.broadcast_to(norm[:, None], x.shape)), DTYPE)
        p = tl.load(Prompt + c * stride_pc, mask=c_mask, other=0.0).to(tl.float32)
        p = _round(tl.math.div_rn(p, tl.broadcast_to(pnorm, p.shape)), DTYPE)
        dot += tl.sum(_round(x * p[None, :], DTYPE), axis=1)
    return _round(dot, DTYPE)


@_jit
def _cosine_map_kernel(Out, X, Prompt, C, n, W, sx_b, sx_c, sx_h, sx_w, sp_b, sp_c,
                       FLAT: tl.constexpr, DTYPE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    """``Out[b, pos]`` (fp32, ``(B, n)``): the cosine of pixel ``pos`` of the ``W``-wide map ``X[b]`` with
    ``Prompt[b]``, rounded as the reference's (each pixel once, however many bins share it)."""
    b = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = pos < n
    cos = _cosine(X + b * sx_b, _offsets(pos, W, sx_h, sx_w, FLAT), mask, sx_c, Prompt + b * sp_b, sp_c, C,
                  DTYPE, BLOCK_C)
    tl.store(Out + b * n + pos, cos, mask=mask)


@triton.jit
def _bin_max(Cos, i, j, mask, h, w, H2, W2, kh, kw):
    """Max of the ``H2 x W2`` map ``Cos`` over the adaptive-pool bin of grid position ``(i, j)`` (rows
    ``floor(i*H2/h) .. ceil((i+1)*H2/h)``, columns alike; at most ``kh x kw`` cells) and its raster
    index: the first maximum in raster order, or the last NaN, as PyTorch's kernels pick it."""
    y0 = i * H2 // h
    y1 = ((i + 1) * H2 + h - 1) // h
    x0 = j * W2 // w
    x1 = ((j + 1) * W2 + w - 1) // w
    best = tl.full(i.shape, float("-inf"), tl.float32)
    arg = y0 * W2 + x0
    for dy in range(0, kh):
        for dx in range(0, kw):
            cell = (y0 + dy) * W2 + x0 + dx
            inside = mask & (y0 + dy < y1) & (x0 + dx < x1)
            v = tl.load(Cos + cell, mask=inside, other=float("-inf"))
            take = inside & ((v > best) | (v != v))
            best = tl.where(take, v, best)
            arg = tl.where(take, cell, arg)
    return best, arg


@_jit
def _probs_kernel(
    Out, Logit, Argmax, Feat, Prompt, HrCos,
    C, h, w, sf_b, sf_c, sf_h, sf_w, sp_b, sp_c, H2, W2, kh, kw,
    HAS_HR: tl.constexpr, FLAT: tl.constexpr, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Selection probabilities of ``BLOCK_P`` grid positions of image ``program_id(0)``; also writes
    the pre-clamp logit (fp32) and, with the high-res map ``HrCos`` (``(B, H2*W2)`` cosines), each
    bin's argmax, which the backward reads."""
    b = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = pos < h * w
    logit = _cosine(Feat + b * sf_b, _offsets(pos, w, sf_h, sf_w, FLAT), p_mask, sf_c, Prompt + b * sp_b, sp_c, C,
                    DTYPE, BLOCK_C)
    if HAS_HR:
        pooled, arg = _bin_max(HrCos + b * H2 * W2, pos // w, pos % w, p_mask, h, w, H2, W2, kh, kw)
        tl.store(Argmax + b * h * w + pos, arg, mask=p_mask)
        logit = _round(_round(logit + pooled, DTYPE) * 0.5, DTYPE)
    logit = _round(logit * 5.0, DTYPE)
    tl.store(Logit + b * h * w + pos, logit, mask=p_mask)
    prob, _ = _softmax_pair(logit, INTERPRETED)
    tl.store(Out + b * h * w + pos, to_dtype_rtne(prob, Out.dtype.element_ty), mask=p_mask)


# ----------------------------------------------------------------------------- scoring: backward


@triton.jit
def _logit_grad(Grad, Logit, b, pos, mask, h, w, sg_b, sg_h, sg_w, HAS_HR: tl.constexpr,
                INTERPRETED: tl.constexpr):
    """The gradient reaching the cosines of grid positions ``pos`` (0 where masked): softmax, clamp
    (passes at the bounds, as ``torch.clamp``'s backward), ``* 5`` and, with the high-res map, ``/ 2``."""
    g = tl.load(Grad + b * sg_b + (pos // w) * sg_h + (pos % w) * sg_w, mask=mask, other=0.0).to(tl.float32)
    z = tl.load(Logit + b * h * w + pos, mask=mask, other=0.0)
    s_logit, s_zero = _softmax_pair(z, INTERPRETED)
    d = tl.where((z >= -10.0) & (z <= 10.0), g * s_logit * s_zero, 0.0) * 5.0
    if HAS_HR:
        d = d * 0.5
    return d


@triton.jit
def _cosine_grad(GradX, Part, PartS, X, Prompt, d, offs, g_offs, load_mask, store_mask, C, s_c, sg_c, sp_c,
                 need_x, need_p, DTYPE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Backward of ``cos_i = normalize(x_i) . normalize(p)`` for the rows of one program, given ``d_i``
    (the gradient reaching ``cos_i``; rows outside ``load_mask`` have ``d_i = 0`` and are not read).

    With ``n = |x|``, ``m = max(n, eps)`` (``F.normalize``'s clamp; its backward passes at ``n == eps``):
    ``dx = d/m * (normalize(p) - [n >= eps] x/n * cos)`` is written to ``GradX`` (rows in
    ``store_mask``), and this program's partial sums for the prompt's gradient go to ``Part``
    (``sum_i d_i x_i / m_i`` per channel) and ``PartS`` (``sum_i d_i cos_i``; see :func:`_prompt_grad`).
    """
    sq = tl.zeros(offs.shape, dtype=tl.float32)
    dot = tl.zeros(offs.shape, dtype=tl.float32)
    psq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        x = tl.load(X + offs[:, None] + c[None, :] * s_c, mask=load_mask[:, None] & c_mask[None, :], other=0.0)
        x = x.to(tl.float32)
        p = tl.load(Prompt + c * sp_c, mask=c_mask, other=0.0).to(tl.float32)
        sq += tl.sum(x * x, axis=1)
        dot += tl.sum(x * p[None, :], axis=1)
        psq += p * p
    n = tl.sqrt_rn(sq)
    m = tl.maximum(n, _EPS)
    pm = tl.maximum(tl.sqrt_rn(tl.sum(psq, axis=0)), _EPS)
    cos = dot / m / pm
    scale = d / m
    radial = tl.where(n >= _EPS, cos / m, 0.0)  # m == n where it counts
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_mask = c < C
        x = tl.load(X + offs[:, None] + c[None, :] * s_c, mask=load_mask[:, None] & c_mask[None, :], other=0.0)
        x = x.to(tl.float32)
        p = tl.load(Prompt + c * sp_c, mask=c_mask, other=0.0).to(tl.float32)
        gx = scale[:, None] * (p[None, :] / pm - x * radial[:, None])
        if need_x != 0:
            tl.store(GradX + g_offs[:, None] + c[None, :] * sg_c, to_dtype_rtne(gx, DTYPE),
                     mask=store_mask[:, None] & c_mask[None, :])
        if need_p != 0:
            tl.store(Part + c, tl.sum(x * scale[:, None], axis=0), mask=c_mask)
    if need_p != 0:
        tl.store(PartS, tl.sum(d * cos, axis=0))


@_jit
def _probs_bwd_kernel(
    GradFeat, PartP, PartPS, GradHr, PartQ, PartQS,
    Grad, Logit, Argmax, Feat, Prompt, HrFeat, HrPrompt,
    h, w, sg_b, sg_h, sg_w,
    C, sf_b, sf_c, sf_h, sf_w, sp_b, sp_c, sdf_b, sdf_c, sdf_h, sdf_w,
    C2, H2, W2, sh_b, sh_c, sh_h, sh_w, sq_b, sq_c, sdh_b, sdh_c, sdh_h, sdh_w, kh, kw,
    low_blocks, need_feat, need_prompt, need_hr_feat, need_hr_prompt,
    HAS_HR: tl.constexpr, FLAT: tl.constexpr, DTYPE: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Programs ``q < low_blocks`` of image ``program_id(0)``: ``BLOCK_P`` low-res positions (feature
    gradient, prompt partials in row ``q``); the others: ``BLOCK_P`` high-res pixels, each gathering
    the gradients of the bins (at most ``kh x kw``) whose argmax it is, in raster order of the bins
    (the order PyTorch's CPU max-pool backward adds them), then the high-res feature gradient and the
    high-res prompt partials."""
    b = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1)
    if q < low_blocks:
        pos = q * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = pos < h * w
        d = _logit_grad(Grad, Logit, b, pos, mask, h, w, sg_b, sg_h, sg_w, HAS_HR, INTERPRETED)
        row = b * low_blocks + q
        _cosine_grad(GradFeat + b * sdf_b, PartP + row * C, PartPS + row, Feat + b * sf_b, Prompt + b * sp_b, d,
                     _offsets(pos, w, sf_h, sf_w, FLAT), _offsets(pos, w, sdf_h, sdf_w, FLAT), mask, mask,
                     C, sf_c, sdf_c, sp_c, need_feat, need_prompt, DTYPE, BLOCK_C)
    else:
        hr_blocks = tl.num_programs(1) - low_blocks
        q = q - low_blocks
        pix = q * BLOCK_P + tl.arange(0, BLOCK_P)
        mask = pix < H2 * W2
        y = pix // W2
        x = pix % W2
        # The bins holding row y: i from floor(y*h/H2) to floor(((y+1)*h - 1)/H2); columns alike.
        i0 = y * h // H2
        i1 = tl.minimum(((y + 1) * h - 1) // H2, h - 1)
        j0 = x * w // W2
        j1 = tl.minimum(((x + 1) * w - 1) // W2, w - 1)
        d = tl.zeros((BLOCK_P,), dtype=tl.float32)
        for di in range(0, kh):
            for dj in range(0, kw):
                cell = (i0 + di) * w + j0 + dj
                inside = mask & (i0 + di <= i1) & (j0 + dj <= j1)
                hit = inside & (tl.load(Argmax + b * h * w + cell, mask=inside, other=-1) == pix)
                d += _logit_grad(Grad, Logit, b, cell, hit, h, w, sg_b, sg_h, sg_w, HAS_HR, INTERPRETED)
        row = b * hr_blocks + q
        _cosine_grad(GradHr + b * sdh_b, PartQ + row * C2, PartQS + row, HrFeat + b * sh_b, HrPrompt + b * sq_b, d,
                     _offsets(pix, W2, sh_h, sh_w, FLAT), _offsets(pix, W2, sdh_h, sdh_w, FLAT), mask & (d != 0), mask,
                     C2, sh_c, sdh_c, sq_c, need_hr_feat, need_hr_prompt, DTYPE, BLOCK_C)


@triton.jit
def _prompt_grad(GradP, Part, PartS, Prompt, b, C, rows, sp_b, sp_c, sg_b, sg_c,
                 DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """``F.normalize``'s backward for channel block ``program_id(2)`` of prompt ``b``, from the ``rows``
    partial sums of :func:`_cosine_grad`: ``dp = (u - [|p| >= eps] p/|p| * s) / max(|p|, eps)`` with
    ``u = sum_i d_i x_i / m_i`` (the gradient of ``normalize(p)``) and ``s = sum_i d_i cos_i =
    normalize(p) . u``. Every program sums ``|p|`` and ``s`` itself, all in a fixed order."""
    psq = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        p = tl.load(Prompt + b * sp_b + c * sp_c, mask=c < C, other=0.0).to(tl.float32)
        psq += p * p
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    u = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    for r0 in range(0, rows, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        s += tl.load(PartS + b * rows + r, mask=r < rows, other=0.0)
        u += tl.load(Part + (b * rows + r)[:, None] * C + c[None, :], mask=(r < rows)[:, None] & c_mask[None, :],
                     other=0.0)
    n = tl.sqrt_rn(tl.sum(psq, axis=0))
    m = tl.maximum(n, _EPS)
    radial = tl.where(n >= _EPS, tl.sum(s, axis=0) / m, 0.0)  # m == n where it counts
    p = tl.load(Prompt + b * sp_b + c * sp_c, mask=c_mask, other=0.0).to(tl.float32)
    gp = (tl.sum(u, axis=0) - p * radial) / m
    tl.store(GradP + b * sg_b + c * sg_c, to_dtype_rtne(gp, DTYPE), mask=c_mask)


@_jit
def _prompt_grad_kernel(
    G0, P0, S0, Pr0, C0, rows0, sp0_b, sp0_c, sg0_b, sg0_c,
    G1, P1, S1, Pr1, C1, rows1, sp1_b, sp1_c, sg1_b, sg1_c,
    DTYPE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Prompt gradients of image ``program_id(0)``, channel block ``program_id(2)``: ``program_id(1)``
    0 the first prompt's, 1 the second's."""
    b = tl.program_id(0).to(tl.int64)
    if tl.program_id(1) == 0:
        _prompt_grad(G0, P0, S0, Pr0, b, C0, rows0, sp0_b, sp0_c, sg0_b, sg0_c, DTYPE, BLOCK_R, BLOCK_C)
    else:
        _prompt_grad(G1, P1, S1, Pr1, b, C1, rows1, sp1_b, sp1_c, sg1_b, sg1_c, DTYPE, BLOCK_R, BLOCK_C)


# ----------------------------------------------------------------------------- scoring: host side


@functools.lru_cache(maxsize=256)
def _max_bin(src: int, dst: int) -> int:
    """Largest adaptive-pool bin along one axis (``ceil((i+1)*src/dst) - floor(i*src/dst)``)."""
    return max(-(-(i + 1) * src // dst) - i * src // dst for i in range(dst))


@functools.lru_cache(maxsize=256)
def _max_bins_per_cell(src: int, dst: int) -> int:
    """Most adaptive-pool bins (of ``dst`` over ``src`` cells) that hold one cell along one axis."""
    return max(min(((y + 1) * dst - 1) // src, dst - 1) - y * dst // src + 1 for y in range(src))


def _is_flat(*maps: torch.Tensor) -> bool:
    """Rows of every ``(..., H, W)`` map follow each other in memory (see :func:`_offsets`)."""
    return all(t.shape[-2] == 1 or t.stride(-2) == t.shape[-1] * t.stride(-1) for t in maps)


def _blocks() -> dict[str, int]:
    """Tile sizes; larger under the CPU interpreter (fewer programs, same arithmetic), except the
    prompt reduction's row block, kept small there so small tests still loop over row blocks."""
    if triton_interpreted():
        return dict(probs=64, cos=256, bwd=256, rows=4)
    return dict(probs=16, cos=32, bwd=16, rows=16)


_SCHEMA = ("(Tensor feature, Tensor prompt, Tensor? highres_feature, Tensor? highres_prompt) "
           "-> (Tensor, Tensor, Tensor)")
_BWD_SCHEMA = ("(Tensor grad, Tensor logit, Tensor argmax, Tensor? feature, Tensor? prompt, Tensor? highres_feature, "
               "Tensor? highres_prompt, bool has_highres, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor)")


@torch.library.custom_op("ps3_kernels::selection_probs", mutates_args=(), schema=_SCHEMA)
def _probs_op(feature, prompt, highres_feature, highres_prompt):
    """``(probs, logit, argmax)``: the probabilities, the pre-clamp logit (fp32) and each position's bin
    argmax in the high-res map (int32; empty without it), in one launch (two with the high-res map).
    Inputs share one dtype (see :func:`selection_probs_triton`)."""
    B, C, h, w = feature.shape
    has_hr = highres_feature is not None
    out = torch.empty(B, h, w, device=feature.device, dtype=feature.dtype)
    logit = torch.empty(B, h, w, device=feature.device, dtype=torch.float32)
    argmax = torch.empty((B, h, w) if has_hr else (0,), device=feature.device, dtype=torch.int32)
    if out.numel() == 0:
        return out, logit, argmax
    blocks, interpreted, dtype = _blocks(), triton_interpreted(), TL_DTYPES[feature.dtype]
    H2 = W2 = kh = kw = 1
    hr_cos = logit
    if has_hr:
        _, C2, H2, W2 = highres_feature.shape
        kh, kw = _max_bin(H2, h), _max_bin(W2, w)
        hr_cos = torch.empty(B, H2 * W2, device=feature.device, dtype=torch.float32)
        _cosine_map_kernel[(B, triton.cdiv(H2 * W2, blocks["cos"]))](
            hr_cos, highres_feature, highres_prompt, C2, H2 * W2, W2, *highres_feature.stride(),
            *highres_prompt.stride(), FLAT=_is_flat(highres_feature), DTYPE=dtype, BLOCK_N=blocks["cos"], BLOCK_C=64,
        )
    _probs_kernel[(B, triton.cdiv(h * w, blocks["probs"]))](
        out, logit, argmax if has_hr else logit, feature, prompt, hr_cos,
        C, h, w, *feature.stride(), *prompt.stride(), H2, W2, kh, kw,
        HAS_HR=has_hr, FLAT=_is_flat(feature), DTYPE=dtype, INTERPRETED=interpreted, BLOCK_P=blocks["probs"],
        BLOCK_C=64,
    )
    return out, logit, argmax


@_probs_op.register_fake
def _(feature, prompt, highres_feature, highres_prompt):
    B, _, h, w = feature.shape
    argmax_shape = (B, h, w) if highres_feature is not None else (0,)
    return (feature.new_empty(B, h, w), feature.new_empty(B, h, w, dtype=torch.float32),
            feature.new_empty(argmax_shape, dtype=torch.int32))


@torch.library.custom_op("ps3_kernels::selection_probs_backward", mutates_args=(), schema=_BWD_SCHEMA)
def _probs_backward_op(grad, logit, argmax, feature, prompt, highres_feature, highres_prompt, has_highres, needs):
    """Gradients of (feature, prompt, highres_feature, highres_prompt), each empty where ``needs`` says
    no; the pairs a gradient is needed of are given, the others may be None. At most two launches."""
    need_feat, need_prompt, need_hr_feat, need_hr_prompt = needs
    B, h, w = logit.shape
    low, high = need_feat or need_prompt, need_hr_feat or need_hr_prompt
    ref = feature if low else highres_feature
    grads = [torch.empty_like(t) if need else ref.new_empty(0)
             for t, need in zip((feature, prompt, highres_feature, highres_prompt), needs)]
    if not (low or high):
        return tuple(grads)
    if logit.numel() == 0:  # no position: every gradient is zero
        return tuple(g.zero_() for g in grads)
    blocks, dtype = _blocks(), TL_DTYPES[ref.dtype]
    block = blocks["bwd"]
    low_blocks = triton.cdiv(h * w, block) if low else 0
    hr_blocks = triton.cdiv(highres_feature.shape[2] * highres_feature.shape[3], block) if high else 0
    f, p = (feature, prompt) if low else (highres_feature, highres_prompt)
    hf, hp = (highres_feature, highres_prompt) if high else (f, p)
    df = grads[0] if need_feat else f
    dh = grads[2] if need_hr_feat else hf
    part_p = logit.new_empty(B, low_blocks, f.shape[1]) if need_prompt else logit
    part_ps = logit.new_empty(B, low_blocks) if need_prompt else logit
    part_q = logit.new_empty(B, hr_blocks, hf.shape[1]) if need_hr_prompt else logit
    part_qs = logit.new_empty(B, hr_blocks) if need_hr_prompt else logit
    _, C2, H2, W2 = hf.shape
    _probs_bwd_kernel[(B, low_blocks + hr_blocks)](
        df, part_p, part_ps, dh, part_q, part_qs,
        grad, logit, argmax if has_highres else logit, f, p, hf, hp,
        h, w, *grad.stride(),
        f.shape[1], *f.stride(), *p.stride(), *df.stride(),
        C2, H2, W2, *hf.stride(), *hp.stride(), *dh.stride(),
        _max_bins_per_cell(H2, h) if high else 1, _max_bins_per_cell(W2, w) if high else 1,
        low_blocks, int(need_feat), int(need_prompt), int(need_hr_feat), int(need_hr_prompt),
        HAS_HR=has_highres, FLAT=_is_flat(f, df, hf, dh), DTYPE=dtype, INTERPRETED=triton_interpreted(),
        BLOCK_P=block, BLOCK_C=64,
    )
    sets = [(g, part, part_s, pr, pr.shape[1], part.shape[1], *pr.stride(), *g.stride())
            for g, part, part_s, pr, need in ((grads[1], part_p, part_ps, p, need_prompt),
                                               (grads[3], part_q, part_qs, hp, need_hr_prompt)) if need]
    if sets:  # with one prompt to differentiate, the second column of programs (the same arguments) is not launched
        grid = (B, len(sets), triton.cdiv(max(args[4] for args in sets), 64))
        _prompt_grad_kernel[grid](*sets[0], *sets[-1], DTYPE=dtype, BLOCK_R=blocks["rows"], BLOCK_C=64)
    return tuple(grads)


@_probs_backward_op.register_fake
def _(grad, logit, argmax, feature, prompt, highres_feature, highres_prompt, has_highres, needs):
    ref = feature if needs[0] or needs[1] else highres_feature
    return tuple(torch.empty_like(t) if need else ref.new_empty(0)
                 for t, need in zip((feature, prompt, highres_feature, highres_prompt), needs))


def _probs_setup_context(ctx, inputs, output):
    feature, prompt, highres_feature, highres_prompt = inputs
    _, logit, argmax = output
    ctx.mark_non_differentiable(logit, argmax)
    ctx.set_materialize_grads(False)  # no zero gradients made for them (ATen launches)
    need = ctx.needs_input_grad
    low, high = need[0] or need[1], need[2] or need[3]
    ctx.has_highres = highres_feature is not None
    ctx.save_for_backward(logit, argmax, *((feature, prompt) if low else (None, None)),
                          *((highres_feature, highres_prompt) if high else (None, None)))


def _probs_backward(ctx, grad, grad_logit, grad_argmax):
    logit, argmax, feature, prompt, highres_feature, highres_prompt = ctx.saved_tensors
    needs = [bool(n) for n in ctx.needs_input_grad]
    if grad is None:  # gradients are not materialised (see setup): nothing reached the probabilities
        return None, None, None, None
    grads = _probs_backward_op(grad, logit, argmax, feature, prompt, highres_feature, highres_prompt,
                               ctx.has_highres, needs)
    return tuple(g if n else None for g, n in zip(grads, needs))


_probs_op.register_autograd(_probs_backward, setup_context=_probs_setup_context)


def selection_probs_triton(
    feature: torch.Tensor,
    prompt: torch.Tensor,
    highres_feature: torch.Tensor | None = None,
    highres_prompt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`ps3_kernels.selection.selection_probs` (arguments validated and
    dispatched there); differentiable in all four inputs.

    Inputs of different dtypes are first cast to their promoted dtype (the reference instead
    normalises each in its own dtype); float32, float16 and bfloat16 are supported.
    """
    dtype = promoted_dtype(feature, prompt, highres_feature, highres_prompt)
    feature, prompt = feature.to(dtype), prompt.to(dtype)
    if highres_feature is not None:
        highres_feature, highres_prompt = highres_feature.to(dtype), highres_prompt.to(dtype)
    return _probs_op(feature, prompt, highres_feature, highres_prompt)[0]


# ----------------------------------------------------------------------------- look assignment


@triton.jit
def _assign_kernel(Out, Order, Quotas, n, num_looks, sq_b, sq_l, BLOCK: tl.constexpr):
    """``out[b, order[b, r]] = l`` with ``cumsum(quotas[b])[l-1] <= r < cumsum(quotas[b])[l]``, else -1."""
    b = tl.program_id(0)
    rank = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = rank < n
    patch = tl.load(Order + b * n + rank, mask=mask, other=0)
    look = tl.zeros((BLOCK,), dtype=tl.int64)
    bound = tl.zeros((BLOCK,), dtype=tl.int64)
    for l in range(num_looks):
        bound += tl.load(Quotas + b * sq_b + l * sq_l)
        look += (rank >= bound).to(tl.int64)
    look = tl.where(look < num_looks, look, -1)
    tl.store(Out + b * n + patch, look, mask=mask)


@torch.library.custom_op("ps3_kernels::assign_looks", mutates_args=(), schema="(Tensor probs, Tensor quotas) -> Tensor")
def _looks_op(probs, quotas):
    """Stable descending sort per row, then one launch that maps ranks to looks; int64 ``(B, n)``."""
    B, n = probs.shape
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices.contiguous()
    out = torch.empty(B, n, device=probs.device, dtype=torch.int64)
    if out.numel() == 0:
        return out
    block = 1024 if not triton_interpreted() else 256
    _assign_kernel[(B, triton.cdiv(n, block))](out, order, quotas, n, quotas.shape[1], *quotas.stride(), BLOCK=block)
    return out


@_looks_op.register_fake
def _(probs, quotas):
    return probs.new_empty(probs.shape, dtype=torch.int64)


def assign_looks_triton(probs: torch.Tensor, quotas: torch.Tensor) -> torch.Tensor:
    """Triton version of :func:`ps3_kernels.selection.assign_looks` (arguments validated there).
    The output is an integer map: no gradient flows through it, as in the reference."""
    return _looks_op(probs, quotas.to(device=probs.device, dtype=torch.int64, non_blocking=True))
