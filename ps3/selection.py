"""Which patches the looks take: the selection probabilities of the encoder's low-res grid on
every high-res grid, as upstream gives them (:func:`per_scale`), then each look's patches and
all looks packed as one varlen batch (:class:`LookLayout`)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F

from ps3_kernels import assign_looks
from ps3_kernels.layout import device_table
from ps3_kernels.patch_embed import PatchTokens

from .geometry import Grid, group_by

PerScale = list[list[torch.Tensor]]  # [scale][image] (h, w) maps


@dataclass
class SelectionProbs:
    """``chosen`` drives the looks (top-down when prompted, gt maps and smoothing applied);
    ``bottomup`` and ``topdown`` are the prior's and the prompt's maps as upstream returns them."""

    chosen: PerScale
    bottomup: PerScale
    topdown: PerScale | None


def per_scale(probs: torch.Tensor, grids: list[tuple[Grid, ...]], gt_maps: list[torch.Tensor] | None = None,
              smooth: bool = False) -> PerScale:
    """``(B, g, g)`` low-res ``probs`` on every image's high-res ``grids`` (one resize per group of equal geometry)."""
    out = [[None] * len(grids) for _ in grids[0]]
    gt_shapes = [tuple(g.shape) for g in gt_maps] if gt_maps is not None else [None] * len(grids)
    for (grid, _), idx in group_by(list(zip(grids, gt_shapes))).items():
        p = probs if len(idx) == len(grids) else probs[device_table(idx, probs.device)]
        gt = None
        if gt_maps is not None:
            gt = torch.stack([gt_maps[i] for i in idx])
            gt = F.interpolate(gt[:, None].float(), size=grid[0], mode="area")[:, 0].to(gt.dtype)
        for s, size in enumerate(grid):
            ps = F.interpolate(p[:, None].float(), size=size, mode="nearest")[:, 0].to(p.dtype)
            if gt is not None:
                gs = F.interpolate(gt[:, None].float(), size=size, mode="nearest")[:, 0].to(gt.dtype)
                ps = (gs > 0) * 1 + (gs <= 0) * ps
            if smooth:
                ps = F.interpolate(F.interpolate(ps[:, None], size=(6, 6), mode="area"), size=size, mode="nearest")[:, 0]
            for j, b in enumerate(idx):
                out[s][b] = ps[j]
    return out


@dataclass
class LookLayout:
    """Every look of a batch, selected and packed. ``look_maps``: per scale ``(B, n_max)`` int64,
    the look that took each patch (-1: none), raster order padded to the batch's largest grid;
    ``tokens``: the packed tokens; ``key``: each token's place in the output,
    ``image * stride + scale_off[scale] + raster``; ``lengths``, ``seq_image``: tokens and image of
    each sequence (one per image and look); ``grids``: ``[image][scale]`` token grids."""

    look_maps: list[torch.Tensor]
    tokens: PatchTokens
    key: torch.Tensor
    lengths: list[int]
    seq_image: list[int]
    grids: list[tuple[Grid, ...]]
    scale_off: list[int]
    stride: int

    @classmethod
    def select(cls, probs: PerScale, plans: list[list[list[int]]], grids: list[tuple[Grid, ...]]) -> "LookLayout":
        """Give each look its quota ``plans[image][look][scale]`` of patches (one stable sort
        per scale for all looks) and pack the selected patches."""
        device, dtype = probs[0][0].device, probs[0][0].dtype
        B, num_high = len(grids), len(grids[0])
        n_max = [max(g[s][0] * g[s][1] for g in grids) for s in range(num_high)]
        max_looks = max([0] + [len(p) for p in plans])
        look_maps = []
        for s in range(num_high):
            flat = torch.full((B, n_max[s]), float("-inf"), device=device, dtype=dtype)
            for idx in group_by([probs[s][b].numel() for b in range(B)]).values():
                # Equal counts, not equal shapes: a portrait and a landscape grid may share a count.
                flat[device_table(idx, device), : probs[s][idx[0]].numel()] = torch.stack([probs[s][b].flatten() for b in idx])
            quotas = [[p[l][s] if l < len(p) else 0 for l in range(max_looks)] for p in plans]
            look_maps.append(assign_looks(flat, device_table(quotas, device)))
        return cls.pack(look_maps, plans, grids)

    @classmethod
    def pack(cls, look_maps: list[torch.Tensor], plans: list[list[list[int]]], grids: list[tuple[Grid, ...]]) -> "LookLayout":
        """Pack the patches of ``look_maps`` (per scale ``(B, n_max)``: the look that took each patch,
        -1 none), of which look ``l`` of image ``b`` takes ``plans[b][l][s]`` from scale ``s``."""
        device, B = look_maps[0].device, len(grids)
        n_max = [m.shape[1] for m in look_maps]
        # Sort keys seq * stride + scale_off + raster put the selected patches in packed order.
        seq_image = [b for b in range(B) for _ in plans[b]]
        seq_base = device_table(list(itertools.accumulate((len(p) for p in plans), initial=0))[:-1], device)
        lengths = [sum(look) for p in plans for look in p]
        stride, scale_off = sum(n_max), list(itertools.accumulate(n_max, initial=0))[:-1]
        unselected = torch.iinfo(torch.long).max
        keys = [torch.where(m >= 0, (seq_base[:, None] + m) * stride + scale_off[s] + torch.arange(n_max[s], device=device),
                            torch.full_like(m, unselected)) for s, m in enumerate(look_maps)]
        total = sum(lengths)
        packed = torch.sort(torch.cat(keys, dim=1).flatten()).values[:total]
        seq, rem = packed // stride, packed % stride
        scale_off_t = device_table(scale_off, device)
        scale = torch.searchsorted(scale_off_t, rem, right=True) - 1
        raster = rem - scale_off_t[scale]
        image = device_table(seq_image, device)[seq] if total else seq
        width = device_table([[w for _, w in g] for g in grids], device)[image, scale]
        tokens = PatchTokens(image=image, scale=scale, row=raster // width, col=raster % width)
        return cls(look_maps, tokens, image * stride + rem, lengths, seq_image, grids, scale_off, stride)

    def grid_rows(self, tables: Iterable[torch.Tensor], which: list[list[int]], widths: list[list[int]]) -> torch.Tensor:
        """Each token's row of ``tables[which[image][scale]]``, a row-major ``(rows, C)`` grid
        ``widths[image][scale]`` wide: ``(T, C)``. The tables are read in place one at a time (an
        iterator may make each on demand): no concatenated copy (PS3-4K's would be ~400 MB), and each
        table's gradient is one table-sized buffer (an embedding lookup's backward)."""
        at = (self.tokens.image, self.tokens.scale)
        device = self.key.device
        index = self.tokens.row * device_table(widths, device)[at] + self.tokens.col
        table_of = device_table(which, device)[at]
        rows = None
        for t, table in enumerate(tables):
            got = F.embedding(index.clamp(max=len(table) - 1), table)
            rows = got if rows is None else torch.where((table_of == t)[:, None], got, rows)
            del table, got  # before the next table is made
        return rows

    def per_image(self, maps: list[torch.Tensor]) -> PerScale:
        """Padded ``(B, n_max)`` maps per scale as ``[scale][image]`` ``(h, w)`` views."""
        return [[m[b, : g[s][0] * g[s][1]].view(g[s]) for b, g in enumerate(self.grids)] for s, m in enumerate(maps)]

    def gt_cover(self, gt_maps: list[torch.Tensor], key: torch.Tensor) -> torch.Tensor:
        """Whether the tokens at ``key`` lie where their image's gt map, area-resized to their
        scale's grid, is non-zero."""
        gt_flat = torch.zeros(len(self.grids), self.stride, device=key.device)
        for b, gt in enumerate(gt_maps):  # tiny (h, w) maps of the pre-training path
            for s, size in enumerate(self.grids[b]):
                m = F.interpolate(gt[None, None].float(), size=size, mode="area")[0, 0].to(gt.dtype)
                gt_flat[b, self.scale_off[s] : self.scale_off[s] + m.numel()] = m.flatten().float()
        return gt_flat.flatten()[key] != 0
