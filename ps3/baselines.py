"""Dense high-resolution baselines on PS3's own ViT: AnyRes, S2 and LLaVA-UHD slicing.

They exist to measure what PS3's selective encoding saves. Every baseline runs the *same*
trunk (same weights, same attention kernel) densely over crops of the image, so token
counts, FLOPs, latency and memory compare the strategies, not two implementations. All
resizes are bicubic in fp32 without antialias, as in PS3's own preprocessing.

Each ``*_encode`` function keeps only the requested layer's output (``layer``, default the
last): holding every layer of 100 crops would dominate memory and say nothing about the
strategy. Geometry helpers (``*_geometry``) describe the sequences a method encodes without
running anything, which is how token and attention-FLOP counts are computed.
"""

from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modeling_ps3 import PS3VisionEncoder
from .geometry import group_by, resize_bicubic

POS_MODES = ("crop", "exact")


@dataclass(frozen=True)
class SequenceGroup:
    """``count`` sequences (per image) of ``length`` tokens each, encoded densely."""

    count: int
    length: int


# ----------------------------------------------------------------------------- helpers


def _check_images(images: torch.Tensor, name: str = "images") -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch")
    if not images.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {images.dtype}")


def _check_encoder(encoder: PS3VisionEncoder) -> None:
    if not isinstance(encoder, PS3VisionEncoder):
        raise TypeError(f"encoder must be a PS3VisionEncoder (model.vision_model), got {type(encoder).__name__}")


def trunk_pos_embed(encoder: PS3VisionEncoder, grid: tuple[int, int], pos_mode: str = "crop") -> torch.Tensor:
    """The trunk's absolute position embedding for an ``(h, w)`` token grid, ``(h*w, C)``.

    ``"crop"`` resamples the square table to ``max(h, w)`` and crops ``[:h, :w]`` (what PS3
    and :meth:`PS3VisionEncoder.encode_dense` do); ``"exact"`` resamples it straight to
    ``(h, w)`` (what LLaVA-UHD does for slices of native aspect). Bicubic with antialias,
    in fp32, like PS3's table. A C-RADIO trunk crops its native table to ``[:h, :w]`` in both
    modes, as upstream's cropped position embedding does.
    """
    if pos_mode not in POS_MODES:
        raise ValueError(f"pos_mode must be one of {POS_MODES}, got {pos_mode!r}")
    return encoder.pos_embed_for_grid(*grid, exact=pos_mode == "exact")


def dense_features(
    encoder: PS3VisionEncoder, pixel_values: torch.Tensor, layer: int = -1, pos_mode: str = "crop"
) -> torch.Tensor:
    """One layer's output of the dense ViT pass over ``(B, 3, H, W)`` images, ``(B, h*w, C)``.

    :meth:`PS3VisionEncoder.encode_dense` keeping only the layers from ``layer`` on, so
    that memory measurements of the baselines are not swamped by unused hidden states.
    """
    _check_encoder(encoder)
    _check_images(pixel_values, "pixel_values")
    p = encoder.patch_size
    B, _, H, W = pixel_values.shape
    if H % p or W % p:
        raise ValueError(f"image sides must be multiples of the patch size {p}, got {H}x{W}")
    depth = encoder.layers
    if not -depth <= layer < depth:
        raise ValueError(f"layer={layer} is out of range for a {depth}-layer trunk")
    keep = depth - layer if layer >= 0 else -layer
    if pos_mode not in POS_MODES:
        raise ValueError(f"pos_mode must be one of {POS_MODES}, got {pos_mode!r}")
    x = pixel_values.to(encoder.trunk.pos_embed.dtype)
    hidden, _ = encoder.encode_dense(x, keep_layers=keep, exact_pos_embed=pos_mode == "exact")
    return hidden[0]


def _tile(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``(B, C, rows*h, cols*w)`` -> ``(B, rows*cols, C, h, w)``, tiles in raster order."""
    B, C, H, W = x.shape
    h, w = H // rows, W // cols
    return x.reshape(B, C, rows, h, cols, w).permute(0, 2, 4, 1, 3, 5).reshape(B, rows * cols, C, h, w)


def _untile(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`_tile`: ``(B, rows*cols, C, h, w)`` -> ``(B, C, rows*h, cols*w)``."""
    B, _, C, h, w = x.shape
    return x.reshape(B, rows, cols, C, h, w).permute(0, 3, 1, 4, 2, 5).reshape(B, C, rows * h, cols * w)


# ----------------------------------------------------------------------------- AnyRes


def anyres_grid(s0: int, grid: tuple[int, int] | None = None, resolution: int | tuple[int, int] | None = None) -> tuple[int, int]:
    """Crop grid ``(rows, cols)`` from an explicit grid or a target resolution (multiples of ``s0``)."""
    if (grid is None) == (resolution is None):
        raise ValueError("give exactly one of grid=(rows, cols) or resolution")
    if grid is not None:
        if len(grid) != 2 or any(not isinstance(g, int) or g < 1 for g in grid):
            raise ValueError(f"grid must be two positive ints (rows, cols), got {grid!r}")
        return tuple(grid)
    res = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(res) != 2 or any(not isinstance(r, int) or r < s0 or r % s0 for r in res):
        raise ValueError(f"resolution must be a positive multiple of the crop size {s0} (or an (H, W) pair of them), got {resolution!r}")
    return (res[0] // s0, res[1] // s0)


def anyres_geometry(s0: int, patch: int, grid: tuple[int, int]) -> list[SequenceGroup]:
    """Sequences per image: the thumbnail and ``rows*cols`` crops, each ``(s0/patch)^2`` tokens."""
    return [SequenceGroup(1 + grid[0] * grid[1], (s0 // patch) ** 2)]


def anyres_encode(
    encoder: PS3VisionEncoder,
    images: torch.Tensor,
    grid: tuple[int, int] | None = None,
    *,
    resolution: int | tuple[int, int] | None = None,
    layer: int = -1,
) -> torch.Tensor:
    """LLaVA-NeXT AnyRes: a global ``s0`` thumbnail plus ``s0 x s0`` crops of the image resized
    to ``(rows*s0, cols*s0)``, all crops of the batch encoded in one dense pass.

    Returns ``(B, (1 + rows*cols) * t, C)`` with ``t = (s0/patch)^2``: the thumbnail's tokens
    first, then the crops in raster order (row by row), each crop's tokens in raster order.
    The image is resized straight to the grid (LLaVA-NeXT pads to keep the aspect ratio,
    which changes neither token count nor cost). 1512 -> 16+1 crops, 3780 -> 100+1.
    """
    _check_encoder(encoder)
    _check_images(images)
    s0 = encoder.ps3_scales[0]
    rows, cols = anyres_grid(s0, grid, resolution)
    B = images.shape[0]
    thumb = resize_bicubic(images, (s0, s0))[:, None]
    crops = _tile(resize_bicubic(images, (rows * s0, cols * s0)), rows, cols)
    feats = dense_features(encoder, torch.cat([thumb, crops], dim=1).flatten(0, 1), layer)
    return feats.reshape(B, -1, feats.shape[-1])


# ----------------------------------------------------------------------------- S2


def _int_arg(name: str, value) -> int:
    """An int or numpy integer (not a bool or a float)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {value!r}") from None


def _positive_int(name: str, value) -> int:
    """A pixel size: an int or numpy integer >= 1."""
    value = _int_arg(name, value)
    if value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _s2_sizes(x: torch.Tensor, scales, img_sizes) -> list[int]:
    """Pixel size of every scale: ``img_sizes`` when given (it wins over ``scales``, as in
    s2wrapper), else ``int(side * scale)`` of the square input."""
    if img_sizes is not None and len(img_sizes):
        return [_positive_int("img_sizes", s) for s in img_sizes]
    if scales is None or not len(scales):
        raise ValueError("give scales (multipliers of the input side) or img_sizes (pixels)")
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"scales multiply a square input's side; got {x.shape[-2]}x{x.shape[-1]} (use img_sizes)")
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not s > 0:
            raise ValueError(f"scales must be positive numbers, got {list(scales)}")
    return [_positive_int("scales * input side", int(x.shape[-1] * s)) for s in scales]


def s2_splits(img_sizes: Sequence[int], max_split_size: int | None = None) -> list[int]:
    """Crops per side at each scale: ``ceil(size / max_split_size)``.

    Without ``max_split_size`` the split is the smallest size, i.e. crops of the ViT's own
    input as :func:`s2_encode` uses them (:func:`s2_forward` defaults to the input's side).
    """
    split = _positive_int("max_split_size", max_split_size if max_split_size is not None else min(img_sizes))
    splits = [math.ceil(s / split) for s in img_sizes]
    for s, n in zip(img_sizes, splits):
        if s % n:
            raise ValueError(f"scale {s} cannot be cut into {n}x{n} equal crops (max_split_size={split})")
    return splits


def s2_geometry(img_sizes: Sequence[int], patch: int, max_split_size: int | None = None) -> list[SequenceGroup]:
    """Sequences per image: ``n*n`` crops of ``(size/n/patch)^2`` tokens at each scale."""
    return [SequenceGroup(n * n, (s // n // patch) ** 2) for s, n in zip(img_sizes, s2_splits(img_sizes, max_split_size))]


def s2_forward(
    model: Callable[[torch.Tensor], torch.Tensor],
    input: torch.Tensor,
    scales: Sequence[float] | None = None,
    img_sizes: Sequence[int] | None = None,
    max_split_size: int | None = None,
    resize_output_to_idx: int = 0,
    num_prefix_token: int = 0,
    output_shape: str = "bnc",
    split_forward: bool = False,
) -> torch.Tensor:
    """S2 ("scaling on scales") multi-scale features; a drop-in for s2wrapper's ``forward``
    (same arguments, order and defaults).

    For each scale (``img_sizes`` in pixels, else ``scales`` times the input side) the input
    is resized (bicubic, fp32), cut chessboard-wise into crops of at most ``max_split_size``
    (default: the input's own side), and the crops are encoded by ``model``. Each scale's
    crop features are stitched back, area-pooled to the grid of scale ``resize_output_to_idx``
    and concatenated along channels. ``model`` maps ``(N, C, h, w)`` crops to ``(N, tokens, D)``
    with ``num_prefix_token`` leading tokens (class tokens) and a square token grid
    (``output_shape="bnc"``), or to ``(N, D, gh, gw)`` maps (``"bchw"``). The result is
    ``(B, prefix + gh*gw, D*len(scales))`` (prefix tokens averaged over each scale's crops) or
    ``(B, D*len(scales), gh, gw)``.

    Crops are ordered split-major, batch-minor, as in s2wrapper. Crops of equal size (of all
    scales) go through ``model`` as one batch; ``split_forward=True`` instead runs one call per
    crop position, ``B`` crops at a time, to bound memory.
    """
    if not callable(model):
        raise TypeError(f"model must be callable, got {type(model).__name__}")
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() != 4 or 0 in input.shape:
        raise ValueError(f"input must be a non-empty (B, C, H, W) tensor, got shape {tuple(input.shape)}")
    if output_shape not in ("bnc", "bchw"):
        raise ValueError(f"output_shape must be 'bnc' or 'bchw', got {output_shape!r}")
    num_prefix_token = _int_arg("num_prefix_token", num_prefix_token)
    if num_prefix_token < 0 or (output_shape == "bchw" and num_prefix_token):
        raise ValueError(f"num_prefix_token must be >= 0, and 0 for output_shape='bchw', got {num_prefix_token}")
    if not isinstance(split_forward, bool):
        raise TypeError(f"split_forward must be True or False, got {split_forward!r}")
    sizes = _s2_sizes(input, scales, img_sizes)
    resize_output_to_idx = _int_arg("resize_output_to_idx", resize_output_to_idx)
    if not -len(sizes) <= resize_output_to_idx < len(sizes):
        raise ValueError(f"resize_output_to_idx={resize_output_to_idx} is out of range for {len(sizes)} scales")
    if max_split_size is None:
        if input.shape[-1] != input.shape[-2]:
            raise ValueError(f"a {input.shape[-2]}x{input.shape[-1]} input needs max_split_size (the default is a square input's side)")
        max_split_size = input.shape[-1]
    splits = s2_splits(sizes, max_split_size)
    B = input.shape[0]
    # (splits*B, C, h, w) per scale: crop position major, image minor.
    crops = [_tile(resize_bicubic(input, (s, s)), n, n).transpose(0, 1).flatten(0, 1) for s, n in zip(sizes, splits)]

    if split_forward:
        encoded = [torch.cat([_encode(model, c) for c in crop.split(B)]) for crop in crops]
    else:
        encoded = [None] * len(crops)
        for idx in group_by([tuple(c.shape[-2:]) for c in crops]).values():
            out = _encode(model, torch.cat([crops[i] for i in idx]))
            for i, part in zip(idx, out.split([crops[i].shape[0] for i in idx])):
                encoded[i] = part

    prefixes, maps = [], []
    for out, n in zip(encoded, splits):
        if output_shape == "bnc":
            prefixes.append(out[:, :num_prefix_token].unflatten(0, (n * n, B)).mean(0))
            out = out[:, num_prefix_token:]
            side = math.isqrt(out.shape[1])
            if side * side != out.shape[1] or side == 0:
                raise ValueError(
                    f"model must return (N, tokens, D) whose tokens after {num_prefix_token} prefix token(s) form a "
                    f"square grid, got {tuple(out.shape)}"
                )
            out = out.transpose(1, 2).unflatten(2, (side, side))
        elif out.dim() != 4:
            raise ValueError(f"model must return (N, D, h, w) for output_shape='bchw', got {tuple(out.shape)}")
        maps.append(_untile(out.unflatten(0, (n * n, B)).transpose(0, 1), n, n))

    side = maps[resize_output_to_idx].shape[-2]
    pooled = [m if m.shape[-2:] == (side, side) else F.interpolate(m.float(), size=(side, side), mode="area").to(m.dtype) for m in maps]
    out = torch.cat(pooled, dim=1)
    if output_shape == "bchw":
        return out
    out = out.flatten(2).transpose(1, 2)
    return torch.cat([torch.cat(prefixes, dim=-1), out], dim=1) if num_prefix_token else out


def _encode(model: Callable[[torch.Tensor], torch.Tensor], crops: torch.Tensor) -> torch.Tensor:
    out = model(crops)
    if not isinstance(out, torch.Tensor) or out.dim() not in (3, 4) or out.shape[0] != crops.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model must return one feature tensor per crop ({crops.shape[0]} crops), got {shape}")
    return out


def s2_encode(
    encoder: PS3VisionEncoder,
    images: torch.Tensor,
    scales: Sequence[int],
    max_split_size: int | None = None,
    *,
    layer: int = -1,
) -> torch.Tensor:
    """S2 on PS3's trunk; ``scales`` are pixel sizes, e.g. ``[378, 756, 1512, 3780]``.

    Returns ``(B, t0, C * len(scales))`` on the smallest scale's token grid.
    3780 -> 1+4+16+100 = 121 crops of 729 tokens.
    """
    _check_encoder(encoder)
    _check_images(images)
    split = max_split_size if max_split_size is not None else min(scales)
    return s2_forward(lambda crops: dense_features(encoder, crops, layer), images, img_sizes=list(scales),
                      max_split_size=split)


# ----------------------------------------------------------------------------- LLaVA-UHD


def llava_uhd_slices(H: int, W: int, s0: int, max_slices: int | None = None) -> tuple[int, int]:
    """LLaVA-UHD's partition ``(rows, cols)`` of an ``H x W`` image for a ViT of input ``s0``.

    The ideal slice count is ``N = ceil(H*W / s0^2)`` (capped at ``max_slices``; the paper
    uses 6). Among factorisations with ``N-1``, ``N`` or ``N+1`` slices, the one whose slices
    have the aspect ratio closest (in log space) to the ViT's square input wins; ties go to
    the count closest to ``N``, then to fewer rows. ``N <= 1`` means no slicing.
    """
    for name, v in (("H", H), ("W", W), ("s0", s0)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if max_slices is not None and (not isinstance(max_slices, int) or max_slices < 1):
        raise ValueError(f"max_slices must be a positive int or None, got {max_slices!r}")
    ideal = math.ceil(H * W / (s0 * s0))
    if max_slices is not None:
        ideal = min(ideal, max_slices)
    if ideal <= 1:
        return (1, 1)
    best = None
    for count in (ideal - 1, ideal, ideal + 1):
        if count < 2 or (max_slices is not None and count > max_slices):
            continue
        for rows in range(1, count + 1):
            if count % rows:
                continue
            cols = count // rows
            # rounded so that mirror-image partitions tie exactly
            key = (round(abs(math.log((W / cols) / (H / rows))), 9), abs(count - ideal), rows)
            if best is None or key < best[0]:
                best = (key, (rows, cols))
    return best[1]


def llava_uhd_token_grid(h: float, w: float, s0: int, patch: int) -> tuple[int, int]:
    """Token grid of an ``h x w`` region resized, aspect kept, to an area of about ``s0^2``."""
    r = s0 / math.sqrt(h * w)
    return (max(1, round(h * r / patch)), max(1, round(w * r / patch)))


@dataclass(frozen=True)
class UHDLayout:
    """Where LLaVA-UHD's tokens come from: the overview's grid, then ``rows x cols`` slices."""

    rows: int
    cols: int
    overview_grid: tuple[int, int]
    slice_grid: tuple[int, int] | None  # None when the image is not sliced

    def groups(self) -> list[SequenceGroup]:
        out = [SequenceGroup(1, self.overview_grid[0] * self.overview_grid[1])]
        if self.slice_grid is not None:
            out.append(SequenceGroup(self.rows * self.cols, self.slice_grid[0] * self.slice_grid[1]))
        return out


def llava_uhd_geometry(H: int, W: int, s0: int, patch: int, max_slices: int | None = None) -> UHDLayout:
    """Slicing and token grids LLaVA-UHD uses for an ``H x W`` image."""
    rows, cols = llava_uhd_slices(H, W, s0, max_slices)
    overview = llava_uhd_token_grid(H, W, s0, patch)
    sliced = llava_uhd_token_grid(H / rows, W / cols, s0, patch) if rows * cols > 1 else None
    return UHDLayout(rows, cols, overview, sliced)


def _sincos_2d(h: int, w: int, dim: int, device, dtype) -> torch.Tensor:
    """Fixed 2D sin-cos position code ``(h*w, dim)``: half the channels for rows, half for columns."""
    quarter = dim // 4
    freq = 1.0 / (10000 ** (torch.arange(quarter, device=device, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        angle = coord[:, None] * freq[None]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).to(dtype)


class UHDResampler(nn.Module):
    """Perceiver-style compression of one slice's tokens to ``num_queries`` (LLaVA-UHD).

    Learned queries cross-attend (one layer) to the slice's tokens, whose keys carry a 2D
    sin-cos code of their grid position, so slices of any aspect ratio compress to a fixed
    count. Input ``(N, h*w, width)`` plus the grid ``(h, w)``; output ``(N, num_queries, out_dim)``.
    """

    def __init__(self, width: int, num_queries: int, num_heads: int | None = None, out_dim: int | None = None):
        super().__init__()
        if width < 4 or width % 4:
            raise ValueError(f"width must be a positive multiple of 4 (2D sin-cos code), got {width}")
        if num_queries < 1:
            raise ValueError(f"num_queries must be positive, got {num_queries}")
        num_heads = num_heads if num_heads is not None else (width // 64 if width % 64 == 0 else 1)
        if width % num_heads:
            raise ValueError(f"width={width} is not divisible by num_heads={num_heads}")
        self.width = width
        self.queries = nn.Parameter(torch.randn(num_queries, width) * width**-0.5)
        self.norm_q = nn.LayerNorm(width)
        self.norm_kv = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm_out = nn.LayerNorm(width)
        self.proj = nn.Linear(width, out_dim or width)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.width or x.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"expected (N, {grid[0]}*{grid[1]}, {self.width}) tokens, got {tuple(x.shape)}")
        kv = self.norm_kv(x)
        keys = kv + _sincos_2d(grid[0], grid[1], self.width, x.device, x.dtype)[None]
        q = self.norm_q(self.queries)[None].expand(x.shape[0], -1, -1)
        out, _ = self.attn(q, keys, kv, need_weights=False)
        return self.proj(self.norm_out(out))


def llava_uhd_encode(
    encoder: PS3VisionEncoder,
    images: torch.Tensor,
    max_slices: int | None = None,
    *,
    pos_mode: str = "exact",
    layer: int = -1,
    resampler: UHDResampler | None = None,
) -> torch.Tensor:
    """LLaVA-UHD: an overview plus ``rows x cols`` slices, each encoded at native aspect.

    Images of one batch share a size, hence one layout (:func:`llava_uhd_geometry`). The
    image is resized so that every slice's sides are patch multiples of area about
    ``s0^2``, then cut; all slices of the batch run as one dense pass with the position
    embedding resampled to the slice grid (``pos_mode="exact"``, LLaVA-UHD's choice;
    ``"crop"`` is PS3's max-side resample and crop). Returns ``(B, N, C)``: overview tokens,
    then slices in raster order; with a ``resampler`` each of those is compressed to
    ``num_queries`` tokens.
    """
    _check_encoder(encoder)
    _check_images(images)
    if resampler is not None and not isinstance(resampler, UHDResampler):
        raise TypeError(f"resampler must be a UHDResampler or None, got {type(resampler).__name__}")
    B, _, H, W = images.shape
    p = encoder.patch_size
    layout = llava_uhd_geometry(H, W, encoder.ps3_scales[0], p, max_slices)

    def encode(pixels: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        feats = dense_features(encoder, pixels, layer, pos_mode)
        return resampler(feats, grid) if resampler is not None else feats

    oh, ow = layout.overview_grid
    parts = [encode(resize_bicubic(images, (oh * p, ow * p)), layout.overview_grid)]
    if layout.slice_grid is not None:
        (sh, sw), rows, cols = layout.slice_grid, layout.rows, layout.cols
        slices = _tile(resize_bicubic(images, (rows * sh * p, cols * sw * p)), rows, cols).flatten(0, 1)
        feats = encode(slices, layout.slice_grid)
        parts.append(feats.reshape(B, -1, feats.shape[-1]))
    return torch.cat(parts, dim=1)


# ----------------------------------------------------------------------------- counting


def count_tokens(groups: Sequence[SequenceGroup]) -> int:
    """Encoder tokens per image of a method's sequence groups."""
    return sum(g.count * g.length for g in groups)


def attention_flops(groups: Sequence[SequenceGroup], width: int, depth: int, prefix: int = 0) -> int:
    """FLOPs of the attention core (``QK^T`` and ``PV``; 2 FLOPs per multiply-add) per image.

    Each query of a sequence of ``L`` tokens attends to ``prefix + L`` keys in every layer;
    ``width`` is ``heads * head_dim``. Projections and MLPs are not included.
    """
    return depth * sum(g.count * 4 * g.length * (prefix + g.length) * width for g in groups)
