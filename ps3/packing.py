"""Helpers for running images of mixed sizes together: grouping and PS3's resize."""

from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

from ps3_kernels.layout import device_table


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


def host_tensor(data, device: torch.device | str, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """A read-only tensor of host ints (geometry, offsets) on ``device``, sent there once per
    distinct content and reused: a repeated forward at fixed shapes copies nothing from the host
    (see :func:`ps3_kernels.layout.device_table`)."""
    return device_table(data, device, dtype)
