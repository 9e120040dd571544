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
* Images of any sizes share one launch: they are addressed from one base tensor (a batch, the
  storage a list of views shares, or else one flat copy) through a small int64 device table of
  each image's offset, strides, size and resized size at every scale, built once per layout
  (:func:`ps3_kernels.patch_embed.image_layout`). No data pointers travel from the host, so the
  launch can be traced and captured in a CUDA graph.
* Taps whose cubic weight is exactly zero are not loaded. When every token of a block comes from
  an identity resize or an odd integer downscale (3780 -> 3780 or 756 at 4K, 1512 -> 1512), the
  fraction is 0 for every pixel and the block reads one tap per pixel (the same values the
  general path would produce, bit for bit).
* Pixel tiles are recomputed for every output-channel block, so blocks are wide in the output
  channels (see :func:`_launch_config`).

Backward: gradients for weight, bias and both tables (images get none). The weight gradient needs
the patches, which a second kernel re-gathers with the same pixel code; bias and table gradients
are a sum and an ``index_add``. Both the forward and the gather are ``torch.library`` custom ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import promoted_dtype, triton_interpreted
from ..patch_embed import PatchTokens
from .common import dot_precision, mma, to_dtype_rtne


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
def _row_interp(line, width, stride_w, ix, wx0, wx1, wx2, wx3, mask):
    """Horizontal cubic interpolation along one source row (tap columns clamped, zero-weight taps skipped)."""
    last = width[:, None] - 1
    sw = stride_w[:, None]
    v0 = tl.load(line + tl.minimum(tl.maximum(ix - 1, 0), last) * sw, mask=mask & (wx0 != 0.0), other=0.0)
    v1 = tl.load(line + tl.minimum(tl.maximum(ix, 0), last) * sw, mask=mask & (wx1 != 0.0), other=0.0)
    v2 = tl.load(line + tl.minimum(tl.maximum(ix + 1, 0), last) * sw, mask=mask & (wx2 != 0.0), other=0.0)
    v3 = tl.load(line + tl.minimum(tl.maximum(ix + 2, 0), last) * sw, mask=mask & (wx3 != 0.0), other=0.0)
    return v0.to(tl.float32) * wx0 + v1.to(tl.float32) * wx1 + v2.to(tl.float32) * wx2 + v3.to(tl.float32) * wx3


@triton.jit
def _clamped_index(Index, tok, t_mask, rows):
    """``Index[tok]`` clamped to ``[0, rows)``: bad indices read a wrong row, never outside the table."""
    i = tl.load(Index + tok, mask=t_mask, other=0).to(tl.int64)
    return tl.minimum(tl.maximum(i, 0), rows - 1)


@triton.jit
def _token_geometry(Pixels, Geometry, TokImage, TokScale, TokRow, TokCol, tok, t_mask, num_images, num_scales,
                    P: tl.constexpr):
    """Per token: image base pointer, strides, source and resized sizes, patch origin; and whether the
    whole block can take the one-tap path (identity or odd integer downscale in both directions).

    ``Geometry`` row of an image (see :func:`image_geometry`): element offset, channel/row/column
    strides, height, width, then (height, width) at every scale. Image and scale indices are
    clamped to the table and the patch origin to the resized image.
    """
    image = _clamped_index(TokImage, tok, t_mask, num_images)
    scale = _clamped_index(TokScale, tok, t_mask, num_scales)
    geo = Geometry + image * (6 + 2 * num_scales)
    base = Pixels + tl.load(geo)
    stride_c = tl.load(geo + 1).to(tl.int32)
    stride_h = tl.load(geo + 2).to(tl.int32)
    stride_w = tl.load(geo + 3).to(tl.int32)
    height = tl.load(geo + 4).to(tl.int32)
    width = tl.load(geo + 5).to(tl.int32)
    out_h = tl.load(geo + 6 + 2 * scale).to(tl.int32)
    out_w = tl.load(geo + 7 + 2 * scale).to(tl.int32)
    # Resized sizes are at least one patch (checked on the host), so a clamped patch lies inside.
    top = tl.minimum(tl.maximum(tl.load(TokRow + tok, mask=t_mask, other=0).to(tl.int64) * P, 0), out_h - P)
    left = tl.minimum(tl.maximum(tl.load(TokCol + tok, mask=t_mask, other=0).to(tl.int64) * P, 0), out_w - P)
    step_y = height // out_h
    step_x = width // out_w
    one_tap = (step_y * out_h == height) & (step_x * out_w == width) & (step_y % 2 == 1) & (step_x % 2 == 1)
    block_one_tap = tl.min((one_tap | ~t_mask).to(tl.int32), axis=0) == 1
    return (base, stride_c, stride_h, stride_w, height, width, out_h, out_w, top.to(tl.int32), left.to(tl.int32),
            block_one_tap)


@triton.jit
def _patch_tile(base, stride_c, stride_h, stride_w, height, width, out_h, out_w, top, left, one_tap, k, mask,
                P: tl.constexpr, IMG_DTYPE: tl.constexpr):
    """Pixels ``(tokens, k)`` of the resized images at patch features ``k = (c, dy, dx)`` (unfold order),
    computed in fp32 and rounded to the image dtype as the reference's resize-and-cast does."""
    plane = base[:, None] + (k // (P * P))[None, :] * stride_c[:, None]
    y = top[:, None] + ((k // P) % P)[None, :]
    x = left[:, None] + (k % P)[None, :]
    if one_tap:
        # The fraction is 0 everywhere, so the single tap at ``floor`` has weight exactly 1.
        step_y = (height // out_h)[:, None]
        step_x = (width // out_w)[:, None]
        src = ((y * step_y + (step_y - 1) // 2) * stride_h[:, None]
               + (x * step_x + (step_x - 1) // 2) * stride_w[:, None])
        pix = tl.load(plane + src, mask=mask, other=0.0).to(tl.float32)
    else:
        iy, ty = _source_coords(y, tl.math.div_rn(height.to(tl.float32), out_h.to(tl.float32)))
        ix, tx = _source_coords(x, tl.math.div_rn(width.to(tl.float32), out_w.to(tl.float32)))
        wy0, wy1, wy2, wy3 = _cubic_weights(ty)
        wx0, wx1, wx2, wx3 = _cubic_weights(tx)
        last = height[:, None] - 1
        row_len = stride_h[:, None]
        r0 = _row_interp(plane + tl.minimum(tl.maximum(iy - 1, 0), last) * row_len, width, stride_w, ix,
                         wx0, wx1, wx2, wx3, mask & (wy0 != 0.0))
        r1 = _row_interp(plane + tl.minimum(tl.maximum(iy, 0), last) * row_len, width, stride_w, ix,
                         wx0, wx1, wx2, wx3, mask & (wy1 != 0.0))
        r2 = _row_interp(plane + tl.minimum(tl.maximum(iy + 1, 0), last) * row_len, width, stride_w, ix,
                         wx0, wx1, wx2, wx3, mask & (wy2 != 0.0))
        r3 = _row_interp(plane + tl.minimum(tl.maximum(iy + 2, 0), last) * row_len, width, stride_w, ix,
                         wx0, wx1, wx2, wx3, mask & (wy3 != 0.0))
        pix = r0 * wy0 + r1 * wy1 + r2 * wy2 + r3 * wy3
    return to_dtype_rtne(pix, IMG_DTYPE)


# ----------------------------------------------------------------------------- kernels

# What varies with the batch is not specialised: counts (Triton would compile a new binary when one
# is 1 or changes divisibility by 16), the pixel buffer's address (a batch, a list's shared storage
# or a flat copy; its loads are gathers that alignment does not widen) and the token and table
# indices' addresses (views of one stacked tensor are 16-byte aligned or not with the token
# count; one int64 per token). One binary per dtype and model serves every batch. ``c_out``, a
# model constant and the row stride of the tables and the output, stays specialised so those rows
# load and store in 16-byte vectors.
_BATCH_ARGS = ("Pixels", "TokImage", "TokScale", "TokRow", "TokCol", "num_tokens", "num_images", "num_scales")

@triton.jit(do_not_specialize=[*_BATCH_ARGS, "PosIndex", "ResIndex", "pos_rows", "res_rows"])
def _embed_kernel(
    Out, Weight, Bias, PosTable, PosIndex, ResTable, ResIndex,
    Pixels, Geometry, TokImage, TokScale, TokRow, TokCol,
    num_tokens, c_out, num_images, num_scales, pos_rows, res_rows,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, POS_PER_TOKEN: tl.constexpr, K: tl.constexpr, P: tl.constexpr,
    PREC: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``out[t, n] = patch(t) . weight[n] + bias[n] + pos_table[pos_index[t], n] + res_table[res_index[t], n]``
    (``POS_PER_TOKEN``: ``pos_table[t, n]``, no index).

    Grid ``(output-channel blocks, token blocks)``: the channel blocks of one token block are
    neighbours in launch order, so their source pixels are still in cache for each other.
    """
    pid_n = tl.program_id(0)
    pid_t = tl.program_id(1)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = tok < num_tokens
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < c_out
    base, stride_c, stride_h, stride_w, height, width, out_h, out_w, top, left, one_tap = _token_geometry(
        Pixels, Geometry, TokImage, TokScale, TokRow, TokCol, tok, t_mask, num_images, num_scales, P)

    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        a = _patch_tile(base, stride_c, stride_h, stride_w, height, width, out_h, out_w, top, left, one_tap, k,
                        t_mask[:, None] & k_mask[None, :], P, Pixels.dtype.element_ty)
        w = tl.load(Weight + n[None, :] * K + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = mma(to_dtype_rtne(a.to(tl.float32), Weight.dtype.element_ty), w, acc, PREC)

    mask = t_mask[:, None] & n_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if POS_PER_TOKEN:
        pos = tok
    else:
        pos = _clamped_index(PosIndex, tok, t_mask, pos_rows)
    acc += tl.load(PosTable + pos[:, None] * c_out + n[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        res = _clamped_index(ResIndex, tok, t_mask, res_rows)
        acc += tl.load(ResTable + res[:, None] * c_out + n[None, :], mask=mask, other=0.0).to(tl.float32)
    out_rows = tok.to(tl.int64)[:, None] * c_out
    tl.store(Out + out_rows + n[None, :], to_dtype_rtne(acc, Out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=_BATCH_ARGS)
def _gather_kernel(
    Patches, Pixels, Geometry, TokImage, TokScale, TokRow, TokCol, num_tokens, num_images, num_scales,
    K: tl.constexpr, P: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``patches[t, k]``: the selected patches themselves (for the weight gradient), same pixel code."""
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = tok < num_tokens
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = t_mask[:, None] & (k < K)[None, :]
    base, stride_c, stride_h, stride_w, height, width, out_h, out_w, top, left, one_tap = _token_geometry(
        Pixels, Geometry, TokImage, TokScale, TokRow, TokCol, tok, t_mask, num_images, num_scales, P)
    pix = _patch_tile(base, stride_c, stride_h, stride_w, height, width, out_h, out_w, top, left, one_tap, k, mask,
                      P, Pixels.dtype.element_ty)
    pix = to_dtype_rtne(pix.to(tl.float32), Patches.dtype.element_ty)
    tl.store(Patches + tok.to(tl.int64)[:, None] * K + k[None, :], pix, mask=mask)


# ----------------------------------------------------------------------------- host side


def _launch_config(dtype: torch.dtype, c_out: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages) of the embed kernel; the gather kernel of the
    backward takes its BLOCK_T, BLOCK_K, num_warps and num_stages too.

    Pixel tiles are recomputed per output-channel block and cost far more than the matmul, so
    the channel block is as wide as registers allow (256 for 16-bit weights: 1152 channels take
    5 blocks). 32 tokens per block: an offline sm_90 build (ptxas of triton 3.9) spilled 984
    bytes per thread at 64x256 and none at 32x256. Not autotuned; the interpreter gets small tiles.
    """
    if triton_interpreted():
        return 32, max(16, min(64, triton.next_power_of_2(c_out))), max(16, min(64, triton.next_power_of_2(k))), 1, 1
    wide = 128 if dtype == torch.float32 else 256
    return 32, max(16, min(wide, triton.next_power_of_2(c_out))), 32, 8, 2


_SCHEMA = (
    "(Tensor pixels, Tensor geometry, Tensor image, Tensor scale, Tensor row, Tensor col, Tensor weight, "
    "Tensor? bias, Tensor pos_table, Tensor? pos_index, Tensor? res_table, Tensor? res_index) -> Tensor"
)


def _num_scales(geometry: torch.Tensor) -> int:
    return (geometry.shape[1] - 6) // 2


@torch.library.custom_op("ps3_kernels::sparse_patch_embed", mutates_args=(), schema=_SCHEMA)
def _embed_op(pixels, geometry, image, scale, row, col, weight, bias, pos_table, pos_index, res_table, res_index):
    """Forward launch: ``(T, C_out)`` tokens of the patches ``(image, scale, row, col)`` of ``pixels``
    (a batch or a flat buffer, addressed through the int64 ``geometry`` table)."""
    c_out, k = weight.shape[0], weight[0].numel()
    num_tokens = image.numel()
    out = torch.empty(num_tokens, c_out, device=weight.device, dtype=promoted_dtype(weight, bias, pos_table, res_table))
    if num_tokens == 0:
        return out
    block_t, block_n, block_k, warps, stages = _launch_config(weight.dtype, c_out, k)
    has_res, per_token = res_table is not None, pos_index is None
    pos_index = image if per_token else pos_index.contiguous()  # a stand-in pointer, not read
    grid = (triton.cdiv(c_out, block_n), triton.cdiv(num_tokens, block_t))
    _embed_kernel[grid](
        out, weight.reshape(c_out, k).contiguous(), bias if bias is not None else weight,
        pos_table.contiguous(), pos_index,
        res_table.contiguous() if has_res else weight, res_index.contiguous() if has_res else pos_index,
        pixels, geometry, image, scale, row, col,
        num_tokens, c_out, geometry.shape[0], _num_scales(geometry), pos_table.shape[0],
        res_table.shape[0] if has_res else 1,
        HAS_BIAS=bias is not None, HAS_RES=has_res, POS_PER_TOKEN=per_token, K=k, P=weight.shape[-1],
        PREC=dot_precision(weight.dtype), BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages,
    )
    return out


@_embed_op.register_fake
def _(pixels, geometry, image, scale, row, col, weight, bias, pos_table, pos_index, res_table, res_index):
    return weight.new_empty(image.shape[0], weight.shape[0], dtype=promoted_dtype(weight, bias, pos_table, res_table))


@torch.library.custom_op("ps3_kernels::gather_patches", mutates_args=(),
                         schema="(Tensor pixels, Tensor geometry, Tensor image, Tensor scale, Tensor row, Tensor col, "
                                "Tensor weight) -> Tensor")
def _gather_op(pixels, geometry, image, scale, row, col, weight):
    """The selected patches ``(T, C * p * p)`` in ``weight``'s dtype (pixels rounded to the image dtype
    first): what the weight gradient multiplies. ``weight`` only gives the patch shape and dtype."""
    c_out, k = weight.shape[0], weight[0].numel()
    num_tokens = image.numel()
    out = torch.empty(num_tokens, k, device=weight.device, dtype=weight.dtype)
    if num_tokens == 0:
        return out
    block_t, _, block_k, warps, stages = _launch_config(weight.dtype, c_out, k)
    grid = (triton.cdiv(num_tokens, block_t), triton.cdiv(k, block_k))
    _gather_kernel[grid](out, pixels, geometry, image, scale, row, col, num_tokens, geometry.shape[0],
                         _num_scales(geometry), K=k, P=weight.shape[-1], BLOCK_T=block_t, BLOCK_K=block_k,
                         num_warps=warps, num_stages=stages)
    return out


@_gather_op.register_fake
def _(pixels, geometry, image, scale, row, col, weight):
    return weight.new_empty(image.shape[0], weight[0].numel())


def _setup_context(ctx, inputs, output):
    pixels, geometry, image, scale, row, col, weight, bias, pos_table, pos_index, res_table, res_index = inputs
    ctx.save_for_backward(pixels, geometry, image, scale, row, col, weight, pos_index, res_index)
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.tables = [(t.shape, t.dtype) if t is not None else None for t in (pos_table, res_table)]


def _table_grad(grad, index, shape_dtype):
    """Rows of ``grad`` summed into the table rows they read (indices clamped as the kernel clamps them)."""
    shape, dtype = shape_dtype
    rows = index.clamp(0, shape[0] - 1)
    return grad.new_zeros(shape, dtype=dtype).index_add_(0, rows, grad.to(dtype))


def _backward(ctx, grad):
    pixels, geometry, image, scale, row, col, weight, pos_index, res_index = ctx.saved_tensors
    need_w, need_b, need_pos, need_res = (ctx.needs_input_grad[i] for i in (6, 7, 8, 10))
    d_weight = d_bias = d_pos = d_res = None
    if need_w:
        patches = _gather_op(pixels, geometry, image, scale, row, col, weight)
        d_weight = (grad.to(weight.dtype).t() @ patches).reshape(weight.shape)
    if need_b:
        d_bias = grad.sum(0).to(ctx.bias_dtype)
    if need_pos:
        d_pos = grad.to(ctx.tables[0][1]) if pos_index is None else _table_grad(grad, pos_index, ctx.tables[0])
    if need_res:
        d_res = _table_grad(grad, res_index, ctx.tables[1])
    return None, None, None, None, None, None, d_weight, d_bias, d_pos, None, d_res, None


_embed_op.register_autograd(_backward, setup_context=_setup_context)


def sparse_patch_embed_triton(
    pixels: torch.Tensor,
    geometry: torch.Tensor,
    tokens: PatchTokens,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_table: torch.Tensor,
    pos_index: torch.Tensor | None,
    res_table: torch.Tensor | None = None,
    res_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton version of :func:`ps3_kernels.patch_embed.sparse_patch_embed` on an image layout from
    :func:`ps3_kernels.patch_embed.image_layout` (arguments validated and dispatched there).

    Differentiable in weight, bias and both tables; the images get no gradient. Out-of-range
    token or table indices (only checked mode catches them on the GPU) are clamped by the kernel.
    """
    return _embed_op(pixels, geometry, tokens.image, tokens.scale, tokens.row, tokens.col, weight, bias,
                     pos_table, pos_index, res_table, res_index)
