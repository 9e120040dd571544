"""Image and token-grid sizes at PS3's scales, and PS3's resize. Sizes depend only on an image's
height and width, never on its pixels, so the forward lays everything out in host ints (no sync)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

from ps3_kernels.layout import device_table

Grid = tuple[int, int]


@dataclass(frozen=True)
class ScaleGeometry:
    """PS3's scales (``scales[0]`` the square low-res one) over a ViT with ``patch`` px patches."""

    scales: tuple[int, ...]
    patch: int

    def __post_init__(self) -> None:
        s, p = list(self.scales), self.patch
        if len(s) < 2:
            raise ValueError(f"config.ps3_scales needs a low-res and at least one high-res scale, got {s}")
        if s[0] % p or any(x % s[0] for x in s):
            raise ValueError(f"config.ps3_scales={s} must be multiples of the patch size {p} and of the first scale")

    def image_size(self, hw: Sequence[int], scale_idx: int) -> Grid:
        """Pixel size of an ``(H, W)`` image at ``scale_idx``: square at scale 0; above it the
        longer side is the scale and the shorter keeps the aspect ratio in whole low-res patches."""
        s0, p = self.scales[0], self.patch
        if scale_idx == 0:
            return (s0, s0)
        h, w = hw
        zoom = self.scales[scale_idx] // s0
        if h >= w:
            return (s0 * zoom, max(int(s0 / h * w) // p, 1) * p * zoom)
        return (max(int(s0 / w * h) // p, 1) * p * zoom, s0 * zoom)

    def grid(self, hw: Sequence[int], scale_idx: int) -> Grid:
        """Token grid of an ``(H, W)`` image at ``scale_idx``."""
        h, w = self.image_size(hw, scale_idx)
        return (max(h // self.patch, 1), max(w // self.patch, 1))

    def highres_grids(self, hw: Sequence[int]) -> tuple[Grid, ...]:
        """Token grid of an ``(H, W)`` image at every high-res scale."""
        return tuple(self.grid(hw, s) for s in range(1, len(self.scales)))


def group_by(keys: Sequence[Hashable]) -> dict:
    """Indices of equal keys, in first-seen order (equal-size items are processed together)."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def resize_bicubic(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(B, C, H, W)`` bicubic resize as upstream PS3 does it: computed in fp32,
    ``align_corners=False``, no antialias, cast back to ``x``'s dtype (identity at equal size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=tuple(size), mode="bicubic").to(x.dtype)


def resize_all(images: torch.Tensor | list[torch.Tensor], size: Grid) -> torch.Tensor:
    """A ``(B, 3, H, W)`` batch, or ``(3, H, W)`` images of any sizes, resized to one
    ``(B, 3, *size)`` batch: one resize per input size, and for a batch or a single size nothing
    copied besides the resize (at 1512 px a copy of the batch is ~27 MB per image)."""
    if isinstance(images, torch.Tensor):
        return resize_bicubic(images, size)
    groups = group_by([im.shape for im in images])
    if len(groups) == 1:
        return resize_bicubic(torch.stack(images), size)
    x = torch.cat([resize_bicubic(torch.stack([images[i] for i in idx]), size) for idx in groups.values()])
    order = [i for idx in groups.values() for i in idx]
    if order != sorted(order):
        x = x[device_table(sorted(range(len(order)), key=order.__getitem__), x.device)]  # back to input order
    return x
