"""Triton selection scoring and look assignment for PS3's high-res patch selection.

:func:`selection_probs_triton`: one kernel launch for the whole batch. A program takes a block of
low-res grid positions of one image and computes, without intermediate maps,

    logit = cos(feature, prompt)                                   (channel-normalised, eps 1e-12)
    logit = (logit + max over the position's adaptive-pool bin of cos(highres_feature, highres_prompt)) / 2
    prob  = softmax([clamp(5 * logit, -10, 10), 0])[0]

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

:func:`assign_looks_triton`: ``torch.sort`` (stable, descending) per scale for the whole batch,
then one kernel that turns each sorted position into its look (the quota interval its rank falls
in) and scatters it to the patch. No host sync.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..backend import promoted_dtype, triton_interpreted
from ..selection import selection_probs_reference
from .common import TL_DTYPES, to_dtype_rtne

_EPS: tl.constexpr = tl.constexpr(1e-12)  # F.normalize's default


# ----------------------------------------------------------------------------- scoring


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


@triton.jit
def _probs_kernel(
    Out, Feat, Prompt, HrFeat, HrPrompt,
    C, h, w, sf_b, sf_c, sf_h, sf_w, sp_b, sp_c,
    C2, H2, W2, sh_b, sh_c, sh_h, sh_w, sq_b, sq_c,
    HAS_HR: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, BIN: tl.constexpr,
    DTYPE: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Selection probabilities of ``BLOCK_P`` grid positions of image ``program_id(0)``.

    With the high-res branch, each position's adaptive-max-pool bin (rows ``floor(i*H2/h) ..
    ceil((i+1)*H2/h)``, columns alike; at most ``KH x KW`` cells, padded to ``BIN``) is scored
    cell by cell as rows of one flat tile and reduced with a max.
    """
    b = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = pos < h * w
    i = pos // w
    j = pos % w
    logit = _cosine(Feat + b * sf_b, i * sf_h + j * sf_w, p_mask, sf_c, Prompt + b * sp_b, sp_c, C, DTYPE, BLOCK_C)
    if HAS_HR:
        cell = tl.arange(0, BIN)
        y = (i * H2 // h)[:, None] + (cell // KW)[None, :]
        x = (j * W2 // w)[:, None] + (cell % KW)[None, :]
        y_end = ((i + 1) * H2 + h - 1) // h
        x_end = ((j + 1) * W2 + w - 1) // w
        inside = p_mask[:, None] & (cell < KH * KW)[None, :] & (y < y_end[:, None]) & (x < x_end[:, None])
        hr = _cosine(HrFeat + b * sh_b, tl.reshape(y * sh_h + x * sh_w, (BLOCK_P * BIN,)),
                     tl.reshape(inside, (BLOCK_P * BIN,)), sh_c, HrPrompt + b * sq_b, sq_c, C2, DTYPE, BLOCK_C)
        pooled = tl.max(tl.where(inside, tl.reshape(hr, (BLOCK_P, BIN)), float("-inf")), axis=1)
        logit = _round(logit + pooled, DTYPE) * 0.5
    logit = tl.minimum(tl.maximum(_round(logit * 5.0, DTYPE), -10.0), 10.0)
    top = tl.maximum(logit, 0.0)
    e_logit = _exp(logit - top, INTERPRETED)
    e_zero = _exp(-top, INTERPRETED)
    prob = tl.math.div_rn(e_logit, e_logit + e_zero)
    tl.store(Out + b * h * w + pos, to_dtype_rtne(prob, Out.dtype.element_ty), mask=p_mask)


def _max_bin(src: int, dst: int) -> int:
    """Largest adaptive-pool bin along one axis (``ceil((i+1)*src/dst) - floor(i*src/dst)``)."""
    return max(-(-(i + 1) * src // dst) - i * src // dst for i in range(dst))


@torch.library.custom_op("ps3_kernels::selection_probs", mutates_args=(),
                         schema="(Tensor feature, Tensor prompt, Tensor? highres_feature, Tensor? highres_prompt) "
                                "-> Tensor")
def _probs_op(feature, prompt, highres_feature, highres_prompt):
    """One launch for the batch; inputs share one dtype (see :func:`selection_probs_triton`)."""
    B, C, h, w = feature.shape
    out = torch.empty(B, h, w, device=feature.device, dtype=feature.dtype)
    if out.numel() == 0:
        return out
    has_hr = highres_feature is not None
    hr, hp = (highres_feature, highres_prompt) if has_hr else (feature, prompt)
    kh, kw = (_max_bin(hr.shape[2], h), _max_bin(hr.shape[3], w)) if has_hr else (1, 1)
    interpreted = triton_interpreted()
    block_p = 32 if interpreted else 16
    grid = (B, triton.cdiv(h * w, block_p))
    _probs_kernel[grid](
        out, feature, prompt, hr, hp,
        C, h, w, *feature.stride(), *prompt.stride(),
        hr.shape[1], hr.shape[2], hr.shape[3], *hr.stride(), *hp.stride(),
        HAS_HR=has_hr, KH=kh, KW=kw, BIN=triton.next_power_of_2(kh * kw), DTYPE=TL_DTYPES[feature.dtype],
        INTERPRETED=interpreted, BLOCK_P=block_p, BLOCK_C=64,
    )
    return out


@_probs_op.register_fake
def _(feature, prompt, highres_feature, highres_prompt):
    B, _, h, w = feature.shape
    return feature.new_empty(B, h, w)


def _probs_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _probs_backward(ctx, grad):
    """The reference's backward: its forward recomputed with autograd on the saved inputs (small maps),
    then differentiated; PyTorch ops on the inputs' device."""
    inputs = ctx.saved_tensors
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(inputs, ctx.needs_input_grad)]
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        out = selection_probs_reference(*leaves)
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    return tuple(next(grads) if t is not None and t.requires_grad else None for t in leaves)


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
    return _probs_op(feature, prompt, highres_feature, highres_prompt)


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
