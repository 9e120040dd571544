"""Triton sparse patch embed: bicubic-resample only the selected patches, fused with the projection.

Each token is a patch (image ``b``, scale ``s``, grid cell ``(row, col)``) of image ``b`` resized
to ``resized_sizes[b][s]``. Upstream resizes every image to every scale and unfolds every patch
to keep a few percent of them; here a program takes a block of tokens and, for each chunk of the
``C * p * p`` patch features, computes the resized pixels straight from the source image
(PyTorch's ``upsample_bicubic2d`` with ``align_corners=False``: source coordinate
``(dst + 0.5) * in / out - 0.5``, cubic convolution with ``A = -0.75``, the four taps
``floor - 1 .. floor + 2`` clamped to the image) and multiplies the chunk into the output tile
with ``tl.dot``. Bias, position-table and residual-table rows are added in the epilogue. Neither
the resized images nor an unfold of them ever exists.

* Pixels are computed in fp32 and rounded to the image dtype (the reference resizes in fp32 and
  casts back), then to the weight dtype for the matmul; accumulation is fp32.
* Images of any sizes share one launch without being copied: a small int64 table holds each
  image's data pointer, height and width, and its resized size at every scale
  (the pointer-table pattern of Triton's grouped-GEMM tutorial).
* Taps whose cubic weight is exactly zero are not loaded. When every token of a block comes from
  an identity resize or an odd integer downscale (3780 -> 3780 or 756 at 4K, 1512 -> 1512), the
  fraction is 0 for every pixel and the block reads one tap per pixel (the same values the
  general path would produce, bit for bit).
* Pixel tiles are recomputed for every output-channel block, so blocks are wide in the output
  channels (see :func:`_launch_config`).

Backward: gradients for weight, bias and both tables (images get none). The weight gradient needs
the patches, which a second kernel re-gathers with the same pixel code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from ..patch_embed import PatchTokens
from .common import TL_DTYPES, dot_precision, mma, to_dtype_rtne


# ----------------------------------------------------------------------------- pixel sampling


@triton.jit
def _cubic_weights(t):
    """Weights of the taps at ``floor - 1 .. floor + 2`` for fraction ``t``.

    PyTorch's cubic convolution with A = -0.75, written in its operation order. At ``t == 0``
    they are exactly (0, 1, 0, 0).
    """
    a = -0.75
    x = t + 1.0
    w0 = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    w1 = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    u = 1.0 - t
    w2 = ((a + 2.0) * u - (a + 3.0)) * u * u + 1.0
    x = u + 1.0
    w3 = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return w0, w1, w2, w3


@triton.jit
def _source_coords(dst, scale):
    """Floor index and fraction of the source coordinate ``(dst + 0.5) * scale - 0.5`` (align_corners=False)."""
    real = scale[:, None] * (dst.to(tl.float32) + 0.5) - 0.5
    lower = tl.floor(real)
    return lower.to(tl.int32), real - lower


@triton.jit
def _row_interp(line, width, ix, wx0, wx1, wx2, wx3, mask):
    """Horizontal cubic interpolation along one source row (tap columns clamped, zero-weight taps skipped)."""
    last = width[:, None] - 1
    v0 = tl.load(line + tl.minimum(tl.maximum(ix - 1, 0), last), mask=mask & (wx0 != 0.0), other=0.0)
    v1 = tl.load(line + tl.minimum(tl.maximum(ix, 0), last), mask=mask & (wx1 != 0.0), other=0.0)
    v2 = tl.load(line + tl.minimum(tl.maximum(ix + 1, 0), last), mask=mask & (wx2 != 0.0), other=0.0)
    v3 = tl.load(line + tl.minimum(tl.maximum(ix + 2, 0), last), mask=mask & (wx3 != 0.0), other=0.0)
    return v0.to(tl.float32) * wx0 + v1.to(tl.float32) * wx1 + v2.to(tl.float32) * wx2 + v3.to(tl.float32) * wx3


@triton.jit
def _token_geometry(Meta, TokImage, TokScale, TokRow, TokCol, tok, t_mask, meta_stride,
                    P: tl.constexpr, IMG_DTYPE: tl.constexpr):
    """Per token: image base pointer, source and resized sizes, patch origin; and whether the whole
    block can take the one-tap path (identity or odd integer downscale in both directions).

    ``Meta`` row of an image: data pointer, height, width, then (height, width) at every scale.
    """
    image = tl.load(TokImage + tok, mask=t_mask, other=0)
    scale = tl.load(TokScale + tok, mask=t_mask, other=0)
    meta = Meta + image * meta_stride
    base = tl.load(meta).to(tl.pointer_type(IMG_DTYPE))
    height = tl.load(meta + 1).to(tl.int32)
    width = tl.load(meta + 2).to(tl.int32)
    out_h = tl.load(meta + 3 + 2 * scale).to(tl.int32)
    out_w = tl.load(meta + 4 + 2 * scale).to(tl.int32)
    top = tl.load(TokRow + tok, mask=t_mask, other=0).to(tl.int32) * P
    left = tl.load(TokCol + tok, mask=t_mask, other=0).to(tl.int32) * P
    step_y = height // out_h
    step_x = width // out_w
    one_tap = (step_y * out_h == height) & (step_x * out_w == width) & (step_y % 2 == 1) & (step_x % 2 == 1)
    block_one_tap = tl.min((one_tap | ~t_mask).to(tl.int32), axis=0) == 1
    return base, height, width, out_h, out_w, top, left, block_one_tap


@triton.jit
def _patch_tile(base, height, width, out_h, out_w, top, left, one_tap, k, mask,
                P: tl.constexpr, IMG_DTYPE: tl.constexpr):
    """Pixels ``(tokens, k)`` of the resized images at patch features ``k = (c, dy, dx)`` (unfold order),
    computed in fp32 and rounded to the image dtype as the reference's resize-and-cast does."""
    plane = base[:, None] + (k // (P * P))[None, :] * (height * width)[:, None]
    y = top[:, None] + ((k // P) % P)[None, :]
    x = left[:, None] + (k % P)[None, :]
    if one_tap:
        # The fraction is 0 everywhere, so the single tap at ``floor`` has weight exactly 1.
        step_y = (height // out_h)[:, None]
        step_x = (width // out_w)[:, None]
        src = (y * step_y + (step_y - 1) // 2) * width[:, None] + x * step_x + (step_x - 1) // 2
        pix = tl.load(plane + src, mask=mask, other=0.0).to(tl.float32)
    else:
        iy, ty = _source_coords(y, tl.math.div_rn(height.to(tl.float32), out_h.to(tl.float32)))
        ix, tx = _source_coords(x, tl.math.div_rn(width.to(tl.float32), out_w.to(tl.float32)))
        wy0, wy1, wy2, wy3 = _cubic_weights(ty)
        wx0, wx1, wx2, wx3 = _cubic_weights(tx)
        last = height[:, None] - 1
        row_len = width[:, None]
        r0 = _row_interp(plane + tl.minimum(tl.maximum(iy - 1, 0), last) * row_len, width, ix, wx0, wx1, wx2, wx3,
                         mask & (wy0 != 0.0))
        r1 = _row_interp(plane + tl.minimum(tl.maximum(iy, 0), last) * row_len, width, ix, wx0, wx1, wx2, wx3,
                         mask & (wy1 != 0.0))
        r2 = _row_interp(plane + tl.minimum(tl.maximum(iy + 1, 0), last) * row_len, width, ix, wx0, wx1, wx2, wx3,
                         mask & (wy2 != 0.0))
        r3 = _row_interp(plane + tl.minimum(tl.maximum(iy + 2, 0), last) * row_len, width, ix, wx0, wx1, wx2, wx3,
                         mask & (wy3 != 0.0))
        pix = r0 * wy0 + r1 * wy1 + r2 * wy2 + r3 * wy3
    return to_dtype_rtne(pix, IMG_DTYPE)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _embed_kernel(
    Out, Weight, Bias, PosTable, PosIndex, ResTable, ResIndex,
    Meta, TokImage, TokScale, TokRow, TokCol,
    num_tokens, c_out, meta_stride,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, K: tl.constexpr, P: tl.constexpr,
    IMG_DTYPE: tl.constexpr, PREC: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[t, n] = patch(t) . weight[n] + bias[n] + pos_table[pos_index[t], n] + res_table[res_index[t], n]``.

    Grid ``(output-channel blocks, token blocks)``: the channel blocks of one token block are
    neighbours in launch order, so their source pixels are still in cache for each other.
    """
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = tok < num_tokens
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < c_out
    base, height, width, out_h, out_w, top, left, one_tap = _token_geometry(
        Meta, TokImage, TokScale, TokRow, TokCol, tok, t_mask, meta_stride, P, IMG_DTYPE)

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        a = _patch_tile(base, height, width, out_h, out_w, top, left, one_tap, k,
                        t_mask[:, None] & k_mask[None, :], P, IMG_DTYPE)
        w = tl.load(Weight + n[None, :] * K + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(to_dtype_rtne(a.to(tl.float32), Weight.dtype.element_ty), w, acc, PREC)

    mask = t_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    pos = tl.load(PosIndex + tok, mask=t_mask, other=0).to(tl.int64)
    acc += tl.load(PosTable + pos[:, None] * c_out + n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        res = tl.load(ResIndex + tok, mask=t_mask, other=0).to(tl.int64)
        acc += tl.load(ResTable + res[:, None] * c_out + n[None, :], mask=mask, other=0.0).to(tl.float32)
    out_rows = tok.to(tl.int64)[:, None] * c_out
    tl.store(Out + out_rows + n[None, :], to_dtype_rtne(acc, Out.dtype.element_ty), mask=mask)


@triton.jit
def _gather_kernel(
    Patches, Meta, TokImage, TokScale, TokRow, TokCol, num_tokens, meta_stride,
    K: tl.constexpr, P: tl.constexpr, IMG_DTYPE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``patches[t, k]``: the selected patches themselves (for the weight gradient), same pixel code."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = tok < num_tokens
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = t_mask[:, None] & (k < K)[None, :]
    base, height, width, out_h, out_w, top, left, one_tap = _token_geometry(
        Meta, TokImage, TokScale, TokRow, TokCol, tok, t_mask, meta_stride, P, IMG_DTYPE)
    pix = _patch_tile(base, height, width, out_h, out_w, top, left, one_tap, k, mask, P, IMG_DTYPE)
    pix = to_dtype_rtne(pix.to(tl.float32), Patches.dtype.element_ty)
    tl.store(Patches + tok.to(tl.int64)[:, None] * K + k[None, :], pix, mask=mask)


# ----------------------------------------------------------------------------- host side


@dataclass
class _Gather:
    """Everything the kernels need to find the tokens' pixels (device tensors; ``images`` kept alive)."""

    images: list[torch.Tensor]
    meta: torch.Tensor  # (B, 3 + 2 * S) int64: data pointer, H, W, then (H', W') per scale
    image: torch.Tensor
    scale: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    channels: int
    patch: int

    @property
    def num_tokens(self) -> int:
        return self.image.numel()

    @property
    def img_dtype(self) -> tl.dtype:
        return TL_DTYPES[self.images[0].dtype]


def _make_gather(images: Sequence[torch.Tensor], resized_sizes: Sequence[Sequence[tuple[int, int]]],
                 tokens: PatchTokens, patch: int, device: torch.device) -> _Gather:
    """Build the per-image table on the host and send it to ``device`` without a sync."""
    images = [im.contiguous() for im in images]
    if images and images[0].dtype not in TL_DTYPES:
        raise TypeError(f"the triton backend takes float32/float16/bfloat16 images, got {images[0].dtype}")
    for i, im in enumerate(images):
        if im.numel() >= 2**31:
            raise ValueError(f"images[{i}] has {im.numel()} elements; the kernel indexes an image with int32")
    num_scales = max((len(s) for s in resized_sizes), default=0)
    rows = []
    for im, sizes in zip(images, resized_sizes):
        padded = [v for size in sizes for v in size] + [1, 1] * (num_scales - len(sizes))
        rows.append([im.data_ptr(), im.shape[1], im.shape[2], *padded])
    meta = torch.tensor(rows, dtype=torch.int64).reshape(len(images), 3 + 2 * num_scales)
    return _Gather(
        images=images, meta=meta.to(device, non_blocking=True),  # async from pageable memory: no sync
        image=tokens.image.contiguous(), scale=tokens.scale.contiguous(),
        row=tokens.row.contiguous(), col=tokens.col.contiguous(),
        channels=images[0].shape[0] if images else 0, patch=patch,
    )


def _launch_config(dtype: torch.dtype, c_out: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages).

    Pixel tiles are recomputed per output-channel block and cost far more than the matmul, so
    the channel block is as wide as registers allow (256 for 16-bit weights: 1152 channels take
    5 blocks). 32 tokens per block: an offline sm_90 build (ptxas of triton 3.9) spilled 984
    bytes per thread at 64x256 and none at 32x256. Not autotuned; the interpreter gets small tiles.
    """
    if triton_interpreted():
        return 32, max(16, min(64, triton.next_power_of_2(c_out))), max(16, min(64, triton.next_power_of_2(k))), 1, 1
    wide = 128 if dtype == torch.float32 else 256
    return 32, max(16, min(wide, triton.next_power_of_2(c_out))), 32, 8, 2


def _gather_patches(g: _Gather, dtype: torch.dtype) -> torch.Tensor:
    """The selected patches ``(T, C * p * p)`` in ``dtype`` (pixels rounded to the image dtype first)."""
    k = g.channels * g.patch * g.patch
    out = torch.empty(g.num_tokens, k, device=g.meta.device, dtype=dtype)
    if g.num_tokens == 0:
        return out
    block_t, block_k = 32, 64  # 8 warps: at 4 an offline sm_90 build spilled ~600 bytes
    grid = (triton.cdiv(g.num_tokens, block_t), triton.cdiv(k, block_k))
    _gather_kernel[grid](out, g.meta, g.image, g.scale, g.row, g.col, g.num_tokens, g.meta.stride(0),
                         K=k, P=g.patch, IMG_DTYPE=g.img_dtype, BLOCK_T=block_t, BLOCK_K=block_k, num_warps=8)
    return out


def _embed_forward(g: _Gather, weight: torch.Tensor, bias: torch.Tensor | None, pos_table: torch.Tensor,
                   pos_index: torch.Tensor, res_table: torch.Tensor | None, res_index: torch.Tensor | None,
                   out_dtype: torch.dtype) -> torch.Tensor:
    c_out = weight.shape[0]
    out = torch.empty(g.num_tokens, c_out, device=weight.device, dtype=out_dtype)
    if g.num_tokens == 0:
        return out
    k = g.channels * g.patch * g.patch
    block_t, block_n, block_k, warps, stages = _launch_config(weight.dtype, c_out, k)
    has_res = res_table is not None
    grid = (triton.cdiv(c_out, block_n), triton.cdiv(g.num_tokens, block_t))
    _embed_kernel[grid](
        out, weight.reshape(c_out, k).contiguous(), bias if bias is not None else weight,
        pos_table.contiguous(), pos_index.contiguous(),
        res_table.contiguous() if has_res else weight, res_index.contiguous() if has_res else pos_index,
        g.meta, g.image, g.scale, g.row, g.col, g.num_tokens, c_out, g.meta.stride(0),
        HAS_BIAS=bias is not None, HAS_RES=has_res, K=k, P=g.patch, IMG_DTYPE=g.img_dtype,
        PREC=dot_precision(weight.dtype), BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages,
    )
    return out


class _SparsePatchEmbed(torch.autograd.Function):
    """Differentiable in weight, bias, pos_table and res_table; the images are treated as constants."""

    @staticmethod
    def forward(ctx, weight, bias, pos_table, res_table, g, pos_index, res_index, out_dtype):
        ctx.g = g
        ctx.save_for_backward(weight, pos_index, res_index)
        ctx.table_dtypes = (bias.dtype if bias is not None else None, pos_table.dtype,
                            res_table.dtype if res_table is not None else None)
        ctx.table_shapes = (pos_table.shape, res_table.shape if res_table is not None else None)
        return _embed_forward(g, weight, bias, pos_table, pos_index, res_table, res_index, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        weight, pos_index, res_index = ctx.saved_tensors
        bias_dtype, pos_dtype, res_dtype = ctx.table_dtypes
        pos_shape, res_shape = ctx.table_shapes
        need_w, need_b, need_pos, need_res = ctx.needs_input_grad[:4]
        d_weight = d_bias = d_pos = d_res = None
        if need_w:
            patches = _gather_patches(ctx.g, weight.dtype)
            d_weight = (grad_out.to(weight.dtype).t() @ patches).reshape(weight.shape)
        if need_b:
            d_bias = grad_out.sum(0).to(bias_dtype)
        if need_pos:
            d_pos = grad_out.new_zeros(pos_shape, dtype=pos_dtype).index_add_(0, pos_index, grad_out.to(pos_dtype))
        if need_res:
            d_res = grad_out.new_zeros(res_shape, dtype=res_dtype).index_add_(0, res_index, grad_out.to(res_dtype))
        return d_weight, d_bias, d_pos, d_res, None, None, None, None


def sparse_patch_embed_triton(
    images: Sequence[torch.Tensor],
    resized_sizes: Sequence[Sequence[tuple[int, int]]],
    tokens: PatchTokens,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_table: torch.Tensor,
    pos_index: torch.Tensor,
    res_table: torch.Tensor | None = None,
    res_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`ps3_kernels.patch_embed.sparse_patch_embed` (arguments validated there).

    Output dtype is the promotion of the weight, bias and table dtypes, as in the reference. Images
    must share one dtype and ``tokens`` must address patches inside their resized images (not
    checked: that would need a host sync).
    """
    out_dtype = weight.dtype
    for name, t in (("weight", weight), ("bias", bias), ("pos_table", pos_table), ("res_table", res_table)):
        if t is not None:
            if t.dtype not in TL_DTYPES:
                raise TypeError(f"the triton backend takes float32/float16/bfloat16 {name}, got {t.dtype}")
            out_dtype = torch.promote_types(out_dtype, t.dtype)
    g = _make_gather(images, resized_sizes, tokens, weight.shape[-1], weight.device)
    return _SparsePatchEmbed.apply(weight, bias, pos_table, res_table, g, pos_index, res_index, out_dtype)
