"""Helpers for running images of mixed sizes together: grouping and PS3's resize."""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.nn.functional as F


def group_by(keys: Sequence[Hashable]) -> dict:
    """Indices of equal keys, in first-seen order (equal-size items are processed together)."""
    groups: dict = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    return groups


def resize_bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(B, C, H, W)`` bicubic resize as upstream PS3 does it: computed in fp32,
    ``align_corners=False``, no antialias, cast back to ``x``'s dtype (identity at equal size)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=tuple(size), mode="bicubic").to(x.dtype)


def host_tensor(data, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of host values (geometry, offsets) sent to ``device`` without a blocking copy."""
    return torch.tensor(data, dtype=dtype).to(device, non_blocking=True)
