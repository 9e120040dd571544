"""Sparse patch gather + embed: tokens for only the selected high-res patches.

For every selected patch (image ``b``, scale ``s``, grid cell ``(row, col)``) the token is
``unfold(resize(image_b, size[b][s]))[cell] @ W^T + bias + pos_table[pos_index] (+ res_table[res_index])``
where ``resize`` is ``F.interpolate(mode="bicubic", align_corners=False)`` computed in fp32,
as upstream PS3 tokenises. The reference below materialises each resized image once per call
(what upstream does); the Triton path samples the selected patches' pixels directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .backend import resolve_backend, triton_dtypes


@dataclass
class PatchTokens:
    """Which patches to embed, packed in output order. All ``(T,)`` int64 on one device."""

    image: torch.Tensor
    scale: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor

    def __len__(self) -> int:
        return self.image.numel()


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def _check_table(name: str, table: torch.Tensor, index: torch.Tensor, name_index: str, c_out: int, n: int) -> None:
    if not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != c_out:
        raise ValueError(f"{name} must be a (rows, {c_out}) tensor, got {_shape(table)}")
    if not isinstance(index, torch.Tensor) or index.shape != (n,):
        raise ValueError(f"{name_index} must be ({n},) (one entry per token), got {_shape(index)}")
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"{name_index} must be an integer tensor, got {index.dtype}")


def _check(images, resized_sizes, tokens, weight, bias, pos_table, pos_index, res_table, res_index) -> None:
    """Validate shapes, dtypes and devices (host-side only: token ranges are not checked, that would sync)."""
    if not isinstance(images, (list, tuple)) or not all(isinstance(im, torch.Tensor) and im.dim() == 3 for im in images):
        raise TypeError("images must be a list of (C, H, W) tensors")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be (C_out, C_in, p, p), got {_shape(weight)}")
    c_out, c_in = weight.shape[:2]
    for i, im in enumerate(images):
        if im.shape[0] != c_in:
            raise ValueError(f"images[{i}] has {im.shape[0]} channels, weight expects {c_in}")
        if im.device != weight.device:
            raise ValueError(f"images[{i}] is on {im.device}, weight on {weight.device}")
        if not im.is_floating_point() or im.dtype != images[0].dtype:
            raise TypeError(f"images must share one floating dtype; images[{i}] is {im.dtype}, "
                            f"images[0] {images[0].dtype}")
    if len(resized_sizes) != len(images):
        raise ValueError(f"resized_sizes needs one entry per image ({len(images)}), got {len(resized_sizes)}")
    for i, sizes in enumerate(resized_sizes):
        for size in sizes:
            if len(size) != 2 or not all(isinstance(v, int) and v > 0 for v in size):
                raise ValueError(f"resized_sizes[{i}] must hold (height, width) pairs of positive ints, got {size!r}")
    if not isinstance(tokens, PatchTokens):
        raise TypeError(f"tokens must be a PatchTokens, got {type(tokens).__name__}")
    n = len(tokens)
    for field in ("image", "scale", "row", "col"):
        t = getattr(tokens, field)
        if t.shape != (n,) or t.dtype.is_floating_point or t.dtype == torch.bool or t.device != weight.device:
            raise ValueError(f"tokens.{field} must be an integer ({n},) tensor on {weight.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (c_out,)):
        raise ValueError(f"bias must be ({c_out},) or None, got {_shape(bias)}")
    _check_table("pos_table", pos_table, pos_index, "pos_index", c_out, n)
    if (res_table is None) != (res_index is None):
        raise ValueError("res_table and res_index must be given together")
    if res_table is not None:
        _check_table("res_table", res_table, res_index, "res_index", c_out, n)


def sparse_patch_embed_reference(
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
    """Pure-PyTorch reference: resize each image to each scale, gather the selected patches.

    Resized images go one after another into one flat buffer (no unfold, no concatenation
    copies), and each token's pixels are read from it by index.
    """
    p = weight.shape[-1]
    device = weight.device
    if len(tokens) == 0:
        return weight.new_zeros(0, weight.shape[0])
    num_scales = max(len(s) for s in resized_sizes)
    channels = images[0].shape[0]
    total = sum(channels * h * w for sizes in resized_sizes for h, w in sizes)
    buffer = torch.empty(total, dtype=images[0].dtype, device=device)
    base, heights, widths, offset = [], [], [], 0
    for image, sizes in zip(images, resized_sizes):
        pad = num_scales - len(sizes)
        base.append([])
        for h, w in sizes:
            resized = F.interpolate(image[None].float(), size=(h, w), mode="bicubic", align_corners=False)
            buffer[offset : offset + channels * h * w] = resized.to(image.dtype).flatten()
            base[-1].append(offset)
            offset += channels * h * w
        base[-1] += [0] * pad
        heights.append([h for h, _ in sizes] + [1] * pad)
        widths.append([w for _, w in sizes] + [1] * pad)

    def per_token(table):
        return torch.tensor(table).to(device, non_blocking=True)[tokens.image, tokens.scale].view(-1, 1, 1, 1)

    H, W = per_token(heights), per_token(widths)
    c = torch.arange(channels, device=device).view(1, -1, 1, 1)
    i = torch.arange(p, device=device).view(1, 1, -1, 1)
    j = torch.arange(p, device=device).view(1, 1, 1, -1)
    rows, cols = tokens.row.view(-1, 1, 1, 1), tokens.col.view(-1, 1, 1, 1)
    index = per_token(base) + c * H * W + (rows * p + i) * W + cols * p + j  # (T, C, p, p), unfold's order
    patches = buffer[index.flatten(1)]
    out = patches.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).t()
    if bias is not None:
        out = out + bias
    out = out + pos_table[pos_index]
    if res_table is not None:
        out = out + res_table[res_index]
    return out


def sparse_patch_embed(
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
    """Embed the selected patches of ``images`` at their scales; returns ``(T, C_out)``.

    Args:
        images: ``B`` tensors ``(3, H_b, W_b)`` (sizes may differ).
        resized_sizes: ``resized_sizes[b][s]`` is the ``(H', W')`` image ``b`` is resized to
            at high-res scale ``s`` (multiples of the patch size).
        tokens: the selected patches, in output order.
        weight, bias: the patch-embed convolution, ``(C_out, 3, p, p)`` and ``(C_out,)``.
        pos_table, pos_index: absolute position-embedding rows added to each token.
        res_table, res_index: optional second table (PS3's per-scale ``pos_emb_residual``).
    """
    _check(images, resized_sizes, tokens, weight, bias, pos_table, pos_index, res_table, res_index)
    supported = triton_dtypes(weight, bias, pos_table, res_table, *images)
    if resolve_backend(weight, *images, supported=supported) == "triton":
        from .triton.patch_embed import sparse_patch_embed_triton

        return sparse_patch_embed_triton(images, resized_sizes, tokens, weight, bias, pos_table, pos_index, res_table, res_index)
    return sparse_patch_embed_reference(images, resized_sizes, tokens, weight, bias, pos_table, pos_index, res_table, res_index)
