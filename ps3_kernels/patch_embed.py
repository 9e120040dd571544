"""Sparse patch gather + embed: tokens for only the selected high-res patches (checks, dispatch,
PyTorch reference).

For every selected patch (image ``b``, scale ``s``, grid cell ``(row, col)``) the token is
``unfold(resize(image_b, size[b][s]))[cell] @ W^T + bias + pos_table[pos_index] (+ res_table[res_index])``
(``pos_index`` None: ``pos_table`` holds one row per token, its own)
where ``resize`` is ``F.interpolate(mode="bicubic", align_corners=False)`` computed in fp32,
as upstream PS3 tokenises. The reference below materialises each resized image once per call
(what upstream does); the Triton path samples the selected patches' pixels directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .backend import (
    TRITON_DTYPES,
    TritonSupport,
    checked_mode,
    device_reasons,
    dispatch,
    dtype_reasons,
    grad_reasons,
    host_values,
    register_support,
)
from .layout import device_table

SUPPORT = TritonSupport(
    op="sparse_patch_embed",
    dtypes=TRITON_DTYPES,
    differentiable=("weight", "bias", "pos_table", "res_table"),
    limits=("each image spans fewer than 2**31 elements",),
    backward="a Triton kernel re-gathers the patches for the weight gradient (one matmul); bias and "
             "table gradients are a sum and an index_add",
)

Images = torch.Tensor | Sequence[torch.Tensor]


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


def _image_list(images: Images) -> list[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(f"images must be a (B, C, H, W) tensor or a list of (C, H, W) tensors, "
                             f"got shape {tuple(images.shape)}")
        return list(images.unbind(0))
    if not isinstance(images, (list, tuple)) or not all(
            isinstance(im, torch.Tensor) and im.dim() == 3 for im in images):
        raise TypeError("images must be a (B, C, H, W) tensor or a list of (C, H, W) tensors")
    return list(images)


def _check_table(name: str, table: torch.Tensor, index: torch.Tensor | None, name_index: str, c_out: int, n: int,
                 device: torch.device) -> None:
    """A ``(rows, c_out)`` table and its ``(n,)`` integer index, or (index None) one row per token."""
    if index is None:
        if not isinstance(table, torch.Tensor) or tuple(table.shape) != (n, c_out):
            raise ValueError(f"{name} must be ({n}, {c_out}) (a row per token) when {name_index} is None, "
                             f"got {_shape(table)}")
    elif not isinstance(table, torch.Tensor) or table.dim() != 2 or table.shape[1] != c_out or table.shape[0] == 0:
        raise ValueError(f"{name} must be a (rows >= 1, {c_out}) tensor, got {_shape(table)}")
    if not table.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {table.dtype}")
    if table.device != device:
        raise ValueError(f"{name} is on {table.device}, weight on {device}")
    if index is None:
        return
    if not isinstance(index, torch.Tensor) or index.shape != (n,):
        raise ValueError(f"{name_index} must be ({n},) (one entry per token), got {_shape(index)}")
    if index.dtype.is_floating_point or index.dtype == torch.bool:
        raise TypeError(f"{name_index} must be an integer tensor, got {index.dtype}")
    if index.device != device:
        raise ValueError(f"{name_index} is on {index.device}, weight on {device}")


def _check(images: list[torch.Tensor], resized_sizes, tokens, weight, bias, pos_table, pos_index, res_table,
           res_index) -> None:
    """Validate shapes, dtypes, devices and the host sizes (no tensor values are read here)."""
    if not images:
        raise ValueError("images holds no image")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        raise ValueError(f"weight must be (C_out, C_in, p, p), got {_shape(weight)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating point, got {weight.dtype}")
    c_out, c_in = weight.shape[:2]
    for i, im in enumerate(images):
        if im.shape[0] != c_in:
            raise ValueError(f"images[{i}] has {im.shape[0]} channels, weight expects {c_in}")
        if min(im.shape[1:]) < 1:
            raise ValueError(f"images[{i}] is empty, shape {tuple(im.shape)}")
        if im.device != weight.device:
            raise ValueError(f"images[{i}] is on {im.device}, weight on {weight.device}")
        if not im.is_floating_point() or im.dtype != images[0].dtype:
            raise TypeError(f"images must share one floating dtype; images[{i}] is {im.dtype}, "
                            f"images[0] {images[0].dtype}")
    p = weight.shape[-1]
    if not isinstance(resized_sizes, (list, tuple)) or len(resized_sizes) != len(images):
        raise ValueError(f"resized_sizes needs one list of sizes per image ({len(images)})")
    for i, sizes in enumerate(resized_sizes):
        if not isinstance(sizes, (list, tuple)) or not sizes:
            raise ValueError(f"resized_sizes[{i}] must be a non-empty list of (height, width) pairs, got {sizes!r}")
        for size in sizes:
            if (not isinstance(size, (list, tuple)) or len(size) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v >= p for v in size)):
                raise ValueError(f"resized_sizes[{i}] must hold (height, width) pairs of ints >= the patch size {p}, "
                                 f"got {size!r}")
    if not isinstance(tokens, PatchTokens):
        raise TypeError(f"tokens must be a PatchTokens, got {type(tokens).__name__}")
    n = len(tokens)
    for field in ("image", "scale", "row", "col"):
        t = getattr(tokens, field)
        if t.shape != (n,) or t.dtype.is_floating_point or t.dtype == torch.bool or t.device != weight.device:
            raise ValueError(f"tokens.{field} must be an integer ({n},) tensor on {weight.device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (c_out,):
            raise ValueError(f"bias must be ({c_out},) or None, got {_shape(bias)}")
        if not bias.is_floating_point() or bias.device != weight.device:
            raise TypeError(f"bias must be a floating tensor on {weight.device}, got {bias.dtype} on {bias.device}")
    _check_table("pos_table", pos_table, pos_index, "pos_index", c_out, n, weight.device)
    if (res_table is None) != (res_index is None):
        raise ValueError("res_table and res_index must be given together")
    if res_table is not None:
        _check_table("res_table", res_table, res_index, "res_index", c_out, n, weight.device)


def _first_bad(name: str, values: torch.Tensor, upper: torch.Tensor | int, what: str) -> None:
    """ValueError naming the first entry of ``values`` outside ``[0, upper)``."""
    bad = ((values < 0) | (values >= upper)).nonzero()
    if bad.numel():
        i = int(bad[0])
        limit = int(upper[i]) if isinstance(upper, torch.Tensor) else upper
        raise ValueError(f"{name}[{i}]={int(values[i])} is outside [0, {limit}) ({what})")


def _check_values(images, resized_sizes, tokens, patch, pos_table, pos_index, res_table, res_index, checked) -> None:
    """Token and table indices in range, where reading them needs no device sync (or ``checked``)."""
    image = host_values(tokens.image, checked)
    if image is not None:
        _first_bad("tokens.image", image, len(images), "the images")
        scales = torch.tensor([len(s) for s in resized_sizes])[image]
        scale = host_values(tokens.scale, checked)
        _first_bad("tokens.scale", scale, scales, "the scales of the token's image")
        num_scales = max(map(len, resized_sizes))
        grid = torch.tensor([[(h // patch, w // patch) for h, w in s] + [(0, 0)] * (num_scales - len(s))
                             for s in resized_sizes]).view(len(images), -1, 2)[image, scale]
        _first_bad("tokens.row", host_values(tokens.row, checked), grid[:, 0], "the patch rows of its resized image")
        _first_bad("tokens.col", host_values(tokens.col, checked), grid[:, 1], "the patch columns of its resized image")
    for name, table, index in (("pos_index", pos_table, pos_index), ("res_index", res_table, res_index)):
        values = host_values(index, checked)
        if values is not None:
            _first_bad(name, values, table.shape[0], f"the rows of {name.replace('index', 'table')}")


def image_geometry(images: list[torch.Tensor], resized_sizes, offsets: list[int]) -> list[list[int]]:
    """Rows of the device geometry table: element offset, channel/row/column strides, height, width,
    then (height, width) at every scale. Past an image's own scales its last size repeats: a real
    size of at least one patch, so even a token whose (unchecked) scale is out of range samples
    inside the image."""
    num_scales = max(len(s) for s in resized_sizes)
    rows = []
    for im, sizes, offset in zip(images, resized_sizes, offsets):
        padded = [v for size in [*sizes, *[sizes[-1]] * (num_scales - len(sizes))] for v in size]
        rows.append([offset, *im.stride(), im.shape[1], im.shape[2], *padded])
    return rows


def image_layout(images: Images, resized_sizes) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixels, geometry)``: one tensor every image is addressed from, and the device geometry table
    (:func:`image_geometry`, cached per layout).

    A ``(B, C, H, W)`` batch is used as is (image ``b`` at offset ``b * stride(0)``), and so is a
    list of views of one storage (e.g. ``x.unbind(0)``, crops of one image) outside tracing;
    any other list is copied once into a flat buffer.
    """
    if isinstance(images, torch.Tensor):
        pixels, images = images, list(images.unbind(0))
        offsets = [b * pixels.stride(0) for b in range(len(images))]
    elif len(images) == 1:
        pixels, offsets = images[0], [0]
    elif not torch.compiler.is_compiling() and len({im.untyped_storage().data_ptr() for im in images}) == 1:
        storage = images[0].untyped_storage()
        pixels = images[0].new_empty(0).set_(storage, 0, (storage.nbytes() // images[0].element_size(),), (1,))
        offsets = [im.storage_offset() for im in images]
    else:
        flat = [im.reshape(-1) for im in images]
        images = [f.view(im.shape) for f, im in zip(flat, images)]  # contiguous strides
        pixels = torch.cat(flat)
        offsets = [0]
        for f in flat[:-1]:
            offsets.append(offsets[-1] + f.numel())
    return pixels, device_table(image_geometry(images, resized_sizes, offsets), pixels.device)


def sparse_patch_embed_reference(
    images: Images,
    resized_sizes: Sequence[Sequence[tuple[int, int]]],
    tokens: PatchTokens,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_table: torch.Tensor,
    pos_index: torch.Tensor | None,
    res_table: torch.Tensor | None = None,
    res_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-PyTorch reference: resize the images to each scale, gather the selected patches.

    Images of one size going to one size are resized together (one call for a whole batch); each
    token's pixels are read from its group's resize by index, one group at a time, so only one
    resized group is alive at once (PS3-4K's 3780 px view is 171 MB an image).
    """
    batch = images if isinstance(images, torch.Tensor) else None
    images = _image_list(images)
    p = weight.shape[-1]
    device = weight.device
    if len(tokens) == 0:
        return weight.new_zeros(0, weight.shape[0])
    num_scales = max(len(s) for s in resized_sizes)
    channels = images[0].shape[0]
    groups: dict = {}
    for b, (image, sizes) in enumerate(zip(images, resized_sizes)):
        for s, size in enumerate(sizes):
            groups.setdefault((tuple(image.shape), tuple(size)), []).append((b, s))
    group_images = [sorted({b for b, _ in members}) for members in groups.values()]  # each group's images, in order
    geometry = [[[0, 1, 1, 0]] * num_scales for _ in images]  # per image and scale: offset in its group, H', W', group
    for g, (((_, (h, w)), members), idx) in enumerate(zip(groups.items(), group_images)):
        for b, s in members:
            geometry[b][s] = [idx.index(b) * channels * h * w, h, w, g]
    per_token = device_table(geometry, device)[tokens.image, tokens.scale]  # (T, 4)
    base, H, W = (per_token[:, i].view(-1, 1, 1, 1) for i in range(3))
    c = torch.arange(channels, device=device).view(1, -1, 1, 1)
    i = torch.arange(p, device=device).view(1, 1, -1, 1)
    j = torch.arange(p, device=device).view(1, 1, 1, -1)
    rows, cols = tokens.row.view(-1, 1, 1, 1), tokens.col.view(-1, 1, 1, 1)
    index = (base + c * H * W + (rows * p + i) * W + cols * p + j).flatten(1)  # (T, C*p*p), unfold's order
    patches = None
    for g, ((_, (h, w)), idx) in enumerate(zip(groups, group_images)):
        stack = batch if batch is not None and len(idx) == len(images) else torch.stack([images[b] for b in idx])
        resized = F.interpolate(stack.float(), size=(h, w), mode="bicubic", align_corners=False).to(stack.dtype).flatten()
        got = resized[index.clamp(max=resized.numel() - 1)]  # tokens of other groups read a clamped index, then drop
        patches = got if patches is None else torch.where(per_token[:, 3:4] == g, got, patches)
        del stack, resized
    out = patches.to(weight.dtype) @ weight.reshape(weight.shape[0], -1).t()
    if bias is not None:
        out = out + bias
    out = out + (pos_table if pos_index is None else pos_table[pos_index])
    if res_table is not None:
        out = out + res_table[res_index]
    return out


def _triton_reasons(images: list[torch.Tensor], weight, bias, pos_table, res_table) -> list[str]:
    params = {"weight": weight, "bias": bias, "pos_table": pos_table, "res_table": res_table}
    reasons = dtype_reasons(SUPPORT, {"images": images[0], **params})
    for i, im in enumerate(images):
        if sum((n - 1) * s for n, s in zip(im.shape, im.stride())) >= 2**31:
            reasons.append(f"images[{i}] spans 2**31 elements or more (the kernel indexes an image with int32)")
    reasons += grad_reasons(SUPPORT, params)
    if torch.is_grad_enabled() and any(im.requires_grad for im in images):
        reasons.append("images require grad and the Triton path computes no gradient for them")
    return reasons


def not_supported_reasons(images, resized_sizes, tokens, weight, bias, pos_table, pos_index, res_table=None,
                          res_index=None) -> list[str]:
    """Why the Triton path cannot run these inputs (empty when it can), devices included."""
    images = _image_list(images)
    return device_reasons([weight, *images]) + _triton_reasons(images, weight, bias, pos_table, res_table)


register_support(SUPPORT, not_supported_reasons)


def sparse_patch_embed(
    images: Images,
    resized_sizes: Sequence[Sequence[tuple[int, int]]],
    tokens: PatchTokens,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    pos_table: torch.Tensor,
    pos_index: torch.Tensor | None,
    res_table: torch.Tensor | None = None,
    res_index: torch.Tensor | None = None,
    *,
    checked: bool | None = None,
) -> torch.Tensor:
    """Embed the selected patches of ``images`` at their scales; returns ``(T, C_out)``.

    Args:
        images: a ``(B, C, H, W)`` batch, or ``B`` tensors ``(C, H_b, W_b)`` (sizes may differ).
        resized_sizes: ``resized_sizes[b][s]`` is the ``(H', W')`` image ``b`` is resized to
            at high-res scale ``s`` (at least one patch; PS3 uses multiples of the patch size).
        tokens: the selected patches, in output order: image in ``[0, B)``, scale in that
            image's scales, row/col inside that scale's patch grid.
        weight, bias: the patch-embed convolution, ``(C_out, C, p, p)`` and ``(C_out,)``.
        pos_table, pos_index: absolute position-embedding rows added to each token; ``pos_index``
            None: ``pos_table`` is ``(T, C_out)``, each token's own row (no index, and its gradient
            is the output's).
        res_table, res_index: optional second table (PS3's per-scale ``pos_emb_residual``).
        checked: also validate token and table indices that live on the GPU (a device sync);
            ``None`` reads ``PS3_KERNELS_CHECKED``. Indices on the CPU are always validated.
    """
    image_list = _image_list(images)
    _check(image_list, resized_sizes, tokens, weight, bias, pos_table, pos_index, res_table, res_index)
    _check_values(image_list, resized_sizes, tokens, weight.shape[-1], pos_table, pos_index, res_table, res_index,
                  checked_mode(checked))
    reasons = _triton_reasons(image_list, weight, bias, pos_table, res_table)
    if dispatch(SUPPORT, reasons, [weight, *image_list]) == "triton":
        from .triton.patch_embed import sparse_patch_embed_triton

        pixels, geometry = image_layout(images, resized_sizes)
        return sparse_patch_embed_triton(pixels, geometry, tokens, weight, bias, pos_table, pos_index, res_table,
                                         res_index)
    return sparse_patch_embed_reference(images, resized_sizes, tokens, weight, bias, pos_table, pos_index, res_table,
                                        res_index)
