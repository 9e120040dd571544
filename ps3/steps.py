"""What upstream's step-by-step encoder methods (``forward_low_res``, ``get_selection_maps``,
``forward_high_res``, ``aggregate_features``, ...) need beyond the forward's building blocks:
argument checks, upstream's KV-cache layout, one look packed from given selection maps, quotas
with upstream's carry-over computed on the device, and the merge of looks' features by sorting.

Upstream passes looks between these methods as dense ``(B, h, w)`` 0/1 maps per high-res scale;
the forward keeps them packed. The helpers convert between the two without host syncs where the
shapes are known from arguments; :func:`look_from_maps` needs one (see there).
"""

from __future__ import annotations

import torch

from ps3_kernels.layout import device_table

from .geometry import Grid
from .validation import values_checkable


def cache_views(kv: list[torch.Tensor], batch: int, n: int) -> list[torch.Tensor]:
    """The trunk's per-layer packed K/V, ``(2, batch * n, heads, head_dim)`` each, as per-layer
    ``(2, batch, heads, n, head_dim)`` views (no copy); ``torch.stack`` of them is upstream's cache
    ``(layers, 2, batch, heads, n, head_dim)``."""
    return [t.view(2, batch, n, *t.shape[2:]).transpose(2, 3) for t in kv]


def check_kv_cache(kv_cache, layers: int, batch: int, heads: int, head_dim: int, device: torch.device) -> None:
    """``kv_cache`` as upstream's ``forward_low_res``/``forward_high_res`` return it (or None)."""
    if kv_cache is None:
        return
    want = f"(layers={layers}, 2, B={batch}, heads={heads}, P, head_dim={head_dim})"
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 6:
        got = tuple(kv_cache.shape) if isinstance(kv_cache, torch.Tensor) else type(kv_cache).__name__
        raise ValueError(f"kv_cache must be a {want} tensor (forward_low_res(..., return_kv_cache=True)), got {got}")
    L, two, B, H, _, D = kv_cache.shape
    if (L, two, B, H, D) != (layers, 2, batch, heads, head_dim):
        raise ValueError(f"kv_cache must be {want}, got {tuple(kv_cache.shape)}")
    if not kv_cache.is_floating_point():
        raise TypeError(f"kv_cache must be floating point, got {kv_cache.dtype}")
    if kv_cache.device != device:
        raise ValueError(f"kv_cache is on {kv_cache.device} but the images are on {device}")


def check_maps(name: str, maps, batch: int, num: int, device: torch.device,
               grids: list[Grid] | tuple[Grid, ...] | None = None) -> list[torch.Tensor]:
    """``num`` real ``(batch, h, w)`` tensors, one per high-res scale (of the given ``grids`` when known)."""
    if not isinstance(maps, (list, tuple)) or len(maps) != num:
        got = f"{type(maps).__name__} of {len(maps)}" if isinstance(maps, (list, tuple)) else type(maps).__name__
        raise ValueError(f"{name} must be a list of {num} (B, h, w) tensors, one per high-res scale, got {got}")
    for i, m in enumerate(maps):
        want = (batch, *grids[i]) if grids is not None else None
        if not isinstance(m, torch.Tensor) or m.dim() != 3 or m.shape[0] != batch or (want and tuple(m.shape) != want):
            got = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"{name}[{i}] must be a {want or f'(B={batch}, h, w)'} tensor, got {got}")
        if m.is_complex():
            raise TypeError(f"{name}[{i}] must be real, got {m.dtype}")
        if m.device != device:
            raise ValueError(f"{name}[{i}] is on {m.device} but expected {device}")
    return list(maps)


def selected(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each map as a ``(B, h*w)`` bool "selected" mask (non-zero entries)."""
    return [m.reshape(m.shape[0], -1) != 0 for m in maps]


def look_from_maps(sel: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """One look per image from ``(B, n)`` masks: the look maps ``LookLayout.pack`` takes (0 where
    selected, -1 elsewhere) and the per-image, per-scale counts.

    The counts size the packed tokens, so they are read on the host: one device sync for GPU
    maps (upstream syncs on them too, several times).
    """
    counts = torch.stack([s.sum(1) for s in sel], dim=1).tolist()
    return [torch.where(s, 0, -1) for s in sel], [[c] for c in counts]


def carried_quotas(base: list[list[int]], available: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per-scale ``(B,)`` quotas: ``base[b][s]``, where a scale has fewer ``available`` patches than its
    quota the rest moves to the next scale (the last scale just takes what it has), as upstream's
    ``get_selection_maps`` does it; computed on the device (no sync)."""
    device = available[0].device
    want = device_table(base, device)
    extra = torch.zeros_like(want[:, 0])
    out = []
    for s, avail in enumerate(available):
        ask = want[:, s] + extra
        got = torch.minimum(ask, avail)
        extra = ask - got
        out.append(got)
    return out


def check_disjoint(name: str, first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    """Refuse overlapping masks where reading them costs no device sync (or in checked mode)."""
    for s, (a, b) in enumerate(zip(first, second)):
        if values_checkable(a):
            both = (a & b).nonzero()
            if both.numel():
                image, at = (int(v) for v in both[0])
                raise ValueError(f"{name} must be exclusive, but both select patch {at} of scale {s} of image {image}")


def check_steps(features_each_step, selection_maps_each_step) -> tuple[list[int], list[torch.Tensor]]:
    """``aggregate_features``' arguments: per look, a list of (B, n, C) features (one per layer, one
    ``n``) and its per-scale maps. Returns each look's ``n`` and its ``(B, N)`` mask over all scales;
    overlapping looks are refused where that needs no device sync."""
    steps, maps_each = features_each_step, selection_maps_each_step
    if not isinstance(steps, (list, tuple)) or not isinstance(maps_each, (list, tuple)) or not steps \
            or len(steps) != len(maps_each):
        raise ValueError("features_each_step and selection_maps_each_step must be lists with one entry per look")
    layers = len(steps[0]) if isinstance(steps[0], (list, tuple)) else 0
    first = steps[0][0] if layers else None
    if not isinstance(first, torch.Tensor) or first.dim() != 3:
        raise ValueError("features_each_step[0] must be a list of (B, n, C) tensors, one per layer")
    B, C, device = first.shape[0], first.shape[2], first.device
    for s, feats in enumerate(steps):
        if not isinstance(feats, (list, tuple)) or len(feats) != layers or not all(
                isinstance(f, torch.Tensor) and f.dim() == 3 and (f.shape[0], f.shape[2]) == (B, C)
                and f.shape[1] == feats[0].shape[1] and f.device == device for f in feats):
            raise ValueError(f"features_each_step[{s}] must be a list of {layers} (B={B}, n, C={C}) tensors on {device}, "
                             "one per layer, with one n for all layers")
    num = len(maps_each[0]) if isinstance(maps_each[0], (list, tuple)) else 0
    grids, sel = None, []
    for s, maps in enumerate(maps_each):
        maps = check_maps(f"selection_maps_each_step[{s}]", maps, B, num, device, grids)
        grids = [tuple(m.shape[1:]) for m in maps]
        sel.append(torch.cat(selected(maps), dim=1))
        if s and values_checkable(sel[s]):
            check_disjoint("selection_maps_each_step", [torch.stack(sel[:s]).any(0)], [sel[s]])
    return [feats[0].shape[1] for feats in steps], sel


def merge_order(sel_each_step: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """Where the looks' tokens go: ``sel_each_step`` are ``(B, N)`` masks over all scales of each
    look, each selecting ``counts[step]`` patches per image; returns the ``(B, sum(counts))``
    permutation that puts the looks' concatenated tokens in raster order of the union (scale,
    then row-major), sync-free: each look's positions are the first ``counts`` of a stable sort."""
    pos = []
    for sel, n in zip(sel_each_step, counts):
        if values_checkable(sel):
            got = sel.sum(1)
            if (got != n).any():
                raise ValueError(f"selection_maps_each_step select {got.tolist()} patches per image but the step's "
                                 f"features hold {n} tokens")
        pos.append(torch.sort((~sel).to(torch.uint8), dim=1, stable=True).indices[:, :n])
    return torch.argsort(torch.cat(pos, dim=1), dim=1)
