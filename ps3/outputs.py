"""The vision forward's outputs in upstream's layout: low-res tokens then each image's
high-res tokens, pooled embeddings, per-scale maps, and masked feature maps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers.modeling_outputs import BaseModelOutputWithNoAttention

from ps3_kernels.layout import device_table

from .selection import PerScale, SelectionProbs


@dataclass
class PS3VisionModelOutput(BaseModelOutputWithNoAttention):
    """Upstream's output fields, plus ``look_maps`` (only with ``output_look_maps=True``):
    per high-res scale, ``(B, h, w)`` int64, the look that selected each patch (-1 where none
    did); ``selection_maps`` is its union. For a list input, each field is a list with one
    entry per image, equal to that field of the image encoded alone (batch dimension 1)."""

    last_hidden_state: Any = None
    hidden_states: Any = None
    pooled_output: Any = None
    selection_maps: Any = None
    selection_probs: Any = None
    bottomup_selection_probs: Any = None
    topdown_selection_probs: Any = None
    look_maps: Any = None


def join_layer(low: torch.Tensor, high: torch.Tensor, counts: list[int], batched: bool):
    """Low-res ``(B, n, C)`` then each image's ``counts[b]`` high-res tokens: ``(B, N, C)``, or ``(1, N_b, C)`` each."""
    if batched:  # equal counts: one copy, no per-image pieces
        if len(set(counts)) > 1:
            raise ValueError(f"the images of this batch select different numbers of tokens {counts} (upstream fails here "
                             "too); pass pixel_values as a list of images to get per-image outputs")
        return torch.cat([low, high.view(low.shape[0], counts[0], -1)], dim=1)
    return [torch.cat([lo, hi], dim=0)[None] for lo, hi in zip(low, high.split(counts))]


def pool_each(pool: Callable, tokens: list[torch.Tensor], cover: list[torch.Tensor] | None = None) -> torch.Tensor:
    """``pool`` (the MAP head) over each image's ``(n_b, C)`` tokens, ``(B, C)``; with ``cover``
    (bool per token) over the covered tokens only (all of them where an image covers none)."""
    pad = torch.nn.utils.rnn.pad_sequence
    padded = pad(list(tokens), batch_first=True)
    lengths = device_table([len(t) for t in tokens], padded.device)
    mask = torch.arange(padded.shape[1], device=padded.device)[None] < lengths[:, None]
    if cover is not None:
        covered = pad(list(cover), batch_first=True)
        mask = torch.where(covered.any(dim=1, keepdim=True), covered, mask)
    return pool(padded, mask)


def _stack(maps: PerScale | None, batched: bool):
    """``[scale][image]`` maps as upstream's ``[scale]`` ``(B, h, w)``, or per image ``[image][scale]`` ``(1, h, w)``."""
    if maps is None or batched:
        return None if maps is None else [torch.stack(s) for s in maps]
    return [[s[b][None] for s in maps] for b in range(len(maps[0]))]


def assemble(batched: bool, layers: list | None, pooled, maps: PerScale | None, probs: SelectionProbs,
             looks: PerScale | None = None) -> PS3VisionModelOutput:
    """Upstream's batched layout for a tensor input, per-image lists for a list input (``layers``,
    the kept hidden layers, and ``pooled`` come already in that layout)."""
    return PS3VisionModelOutput(
        last_hidden_state=None if layers is None else layers[-1],
        hidden_states=layers if batched or layers is None else [list(per) for per in zip(*layers)],
        pooled_output=pooled,
        selection_maps=_stack(maps, batched),
        selection_probs=_stack(probs.chosen, batched),
        bottomup_selection_probs=_stack(probs.bottomup, batched),
        topdown_selection_probs=_stack(probs.topdown, batched),
        look_maps=_stack(looks, batched),
    )


def feature_maps(features: torch.Tensor, selection_maps: list[torch.Tensor], low_grid: int,
                 num_high: int) -> list[torch.Tensor]:
    """Scatter ``(B, N, C)`` features (the ``low_grid`` x ``low_grid`` low-res tokens first) into
    zero-filled ``(B, C, h, w)`` maps per scale (``PS3VisionEncoder.format_features_into_feature_maps``)."""
    if not isinstance(features, torch.Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"features must be a (B, N, C) tensor, got {shape}")
    B, N, C = features.shape
    if not isinstance(selection_maps, (list, tuple)) or len(selection_maps) != num_high:
        raise ValueError(f"selection_maps must be a list of {num_high} (B, h, w) tensors, one per high-res scale")
    for i, m in enumerate(selection_maps):
        if not isinstance(m, torch.Tensor) or m.dim() != 3 or m.shape[0] != B:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"selection_maps[{i}] must be a (B={B}, h, w) tensor like features' batch, got {shape}")
        if m.device != features.device:
            raise ValueError(f"selection_maps[{i}] is on {m.device} but features are on {features.device}")
    masks = [torch.ones(B, low_grid, low_grid, device=features.device, dtype=torch.bool), *(m.bool() for m in selection_maps)]
    flat = torch.cat([m.flatten(1) for m in masks], dim=1)
    counts = flat.sum(1)
    if not torch.all(counts == N):
        raise ValueError(f"features has {N} tokens per image but the selection maps select {counts.tolist()}")
    full = features.new_zeros(B, flat.shape[1], C)
    full[flat] = features.reshape(-1, C)
    parts = full.split([m[0].numel() for m in masks], dim=1)
    return [part.transpose(1, 2).reshape(B, C, *m.shape[1:]) for part, m in zip(parts, masks)]
