"""VILA's ``mm_projector`` for PS3: the token MLP, the top-down prompt head and the high-res
position/scale embeddings, with VILA's module and parameter names
(``llava/model/multimodal_projector/base_projector.py``), so the ``mm_projector`` weights of
VILA-HD checkpoints load unchanged. The high-res path is one batched scatter + downsample +
gather (VILA loops over images), and the MLP runs only on the tokens that are kept.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..vit import Mlp
from .settings import config_value

DOWNSAMPLE_RATIO = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}
PROMPT_HEAD_TYPES = ("linear", "mlp")


def downsample_tokens(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """``(B, H, W, C) -> (B, ceil(H/r), ceil(W/r), r*r*C)``: each r x r block concatenated in
    row-major order, zero-padded at the bottom/right (VILA's ``flat_square_2x2/3x3``)."""
    if x.dim() != 4:
        raise ValueError(f"expected a (B, H, W, C) tensor, got shape {tuple(x.shape)}")
    B, H, W, C = x.shape
    Hp, Wp = -(-H // ratio) * ratio, -(-W // ratio) * ratio
    if (Hp, Wp) != (H, W):
        x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
    x = x.reshape(B, Hp // ratio, ratio, Wp // ratio, ratio, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(B, Hp // ratio, Wp // ratio, ratio * ratio * C)


class TokenDownsample(nn.Module):
    """VILA's ``DownSampleBlock`` / ``DownSample{2x2,3x3}BlockFix`` (no parameters).

    VILA assumes a square grid; ``feature_size=(h, w)`` also allows rectangular ones.
    """

    def __init__(self, ratio: int):
        super().__init__()
        self.ratio = ratio

    def forward(self, x: torch.Tensor, feature_size: tuple[int, int] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        if feature_size is None:
            side = math.isqrt(N)
            if side * side != N:
                raise ValueError(f"{N} tokens are not a square grid; pass feature_size=(h, w)")
            feature_size = (side, side)
        h, w = feature_size
        if h * w != N:
            raise ValueError(f"feature_size {tuple(feature_size)} does not hold {N} tokens")
        return downsample_tokens(x.reshape(B, h, w, C), self.ratio).flatten(1, 2)


def _projector_layers(kind: str, vision_width: int, llm_width: int) -> nn.Sequential:
    c, d = vision_width, llm_width
    if kind in ("mlp_downsample", "mlp_downsample_2x2_fix"):
        return nn.Sequential(TokenDownsample(2), nn.LayerNorm(4 * c), nn.Linear(4 * c, d), nn.GELU(), nn.Linear(d, d))
    if kind == "mlp_downsample_3x3_fix":
        return nn.Sequential(
            TokenDownsample(3), nn.LayerNorm(9 * c), nn.Linear(9 * c, 3 * c), nn.GELU(),
            nn.LayerNorm(3 * c), nn.Linear(3 * c, d), nn.GELU(), nn.Linear(d, d),
        )
    raise ValueError(f"mm_projector_type must be one of {sorted(DOWNSAMPLE_RATIO)} for VILA-HD, got {kind!r}")


def _square_masks(selection_maps, batch: int) -> list[torch.Tensor]:
    """Per scale a ``(B, S, S)`` bool mask, each map padded bottom/right to the scale's
    longest side (as VILA does for mixed-size images). Accepts PS3's per-scale ``(B, h, w)``
    list or its per-image lists of ``(1, h, w)`` maps."""
    if not isinstance(selection_maps, (list, tuple)) or not selection_maps:
        raise TypeError("selection_maps must be PS3's list of per-scale maps (or per-image lists of them)")
    if isinstance(selection_maps[0], torch.Tensor):  # one tensor per scale: pad the batch at once
        if any(m.dim() != 3 or m.shape[0] != batch for m in selection_maps):
            raise ValueError(f"selection_maps must be (B={batch}, h, w) tensors")
        return [F.pad(m.bool(), (0, max(m.shape[1:]) - m.shape[2], 0, max(m.shape[1:]) - m.shape[1])) for m in selection_maps]
    if len(selection_maps) != batch or any(len(img) != len(selection_maps[0]) for img in selection_maps):
        raise ValueError(f"selection_maps must hold one list of per-scale maps per image ({batch})")
    masks = []
    for maps in zip(*selection_maps):  # ragged images: pad each to the scale's square
        maps = [m.reshape(m.shape[-2:]).bool() for m in maps]
        S = max(max(m.shape) for m in maps)
        masks.append(torch.stack([F.pad(m, (0, S - m.shape[1], 0, S - m.shape[0])) for m in maps]))
    return masks


def _split_features(features, low_res_token_num: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Low-res tokens ``(B, L, C)``, all images' high-res tokens ``(M, C)``, per-image counts."""
    L = low_res_token_num
    if isinstance(features, torch.Tensor):
        if features.dim() != 3:
            raise ValueError(f"features must be (B, N, C) or a list of (N, C), got shape {tuple(features.shape)}")
        B, N, C = features.shape
        return features[:, :L], features[:, L:].reshape(-1, C), [N - L] * B
    if not isinstance(features, (list, tuple)) or not features or not all(isinstance(f, torch.Tensor) for f in features):
        raise TypeError(f"features must be a tensor or a non-empty list of tensors, got {type(features).__name__}")
    per_image = [f.reshape(f.shape[-2:]) if f.dim() == 3 and f.shape[0] == 1 else f for f in features]
    if any(f.dim() != 2 for f in per_image):
        raise ValueError("features as a list must hold (N, C) or (1, N, C) tensors")
    low = torch.stack([f[:L] for f in per_image])
    return low, torch.cat([f[L:] for f in per_image]), [f.shape[0] - L for f in per_image]


class VilaHDProjector(nn.Module):
    """VILA's ``MultimodalProjector`` for PS3: ``layers`` (the ``mlp_downsample`` MLP),
    ``top_down_prompt_head`` (LLM width -> vision width) and the high-res position/scale
    embeddings (``high_res_pos_embed`` on the low-res grid, one ``high_res_scale_embed`` per
    PS3 scale, index 0 for the low-res tokens)."""

    def __init__(
        self,
        mm_projector_type: str,
        mm_hidden_size: int,
        hidden_size: int,
        top_down_prompt_head_type: str | None = "linear",
        mm_low_res_token_num: int | None = None,
        mm_scale_num: int | None = None,
    ):
        super().__init__()
        self.mm_projector_type = mm_projector_type
        self.layers = _projector_layers(mm_projector_type, mm_hidden_size, hidden_size)
        self.downsample_rate = DOWNSAMPLE_RATIO[mm_projector_type]
        if top_down_prompt_head_type is not None:
            if top_down_prompt_head_type == "linear":
                self.top_down_prompt_head = nn.Linear(hidden_size, mm_hidden_size)
            elif top_down_prompt_head_type == "mlp":
                self.top_down_prompt_head = Mlp(hidden_size, 2 * mm_hidden_size, mm_hidden_size, norm=True)
            else:
                raise ValueError(f"top_down_prompt_head_type must be one of {PROMPT_HEAD_TYPES} or None, got {top_down_prompt_head_type!r}")
            # VILA's init (uniform +-0.02 except norms), so training from scratch starts alike.
            for name, p in self.top_down_prompt_head.named_parameters():
                if "norm" not in name:
                    nn.init.uniform_(p, -0.02, 0.02)
        if (mm_low_res_token_num is None) != (mm_scale_num is None):
            raise ValueError("give both mm_low_res_token_num and mm_scale_num (high-res embeddings) or neither")
        if mm_low_res_token_num is not None:
            if math.isqrt(mm_low_res_token_num) ** 2 != mm_low_res_token_num or mm_scale_num < 2:
                raise ValueError(f"mm_low_res_token_num must be a square and mm_scale_num >= 2, got {mm_low_res_token_num}, {mm_scale_num}")
            self.high_res_pos_embed = nn.Parameter(torch.zeros(1, mm_low_res_token_num, hidden_size))
            self.high_res_scale_embed = nn.ParameterList([nn.Parameter(torch.zeros(1, 1, hidden_size)) for _ in range(mm_scale_num)])

    @classmethod
    def from_vila_config(cls, mm_projector_type: str, config: Mapping[str, Any] | Any) -> "VilaHDProjector":
        """Build as VILA does from its top-level LLaVA config (dict or config object): the
        head only for ``ps3`` with ``look_close_mode == "after_prompt"``, the embeddings only
        for ``high_res_pos_embed``."""
        get = partial(config_value, config)
        for key in ("mm_hidden_size", "hidden_size"):
            if get(key) is None:
                raise ValueError(f"the VILA config has no {key!r}")
        ps3 = bool(get("ps3", False))
        head = get("top_down_prompt_head_type", "linear") if ps3 and get("look_close_mode") == "after_prompt" else None
        embed = ps3 and bool(get("high_res_pos_embed", False))
        return cls(
            mm_projector_type, get("mm_hidden_size"), get("hidden_size"), head,
            get("mm_low_res_token_num") if embed else None, get("mm_scale_num") if embed else None,
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[1].weight.dtype

    @property
    def has_high_res_embed(self) -> bool:
        return hasattr(self, "high_res_pos_embed")

    def forward(self, x: torch.Tensor, forward_top_down_prompt_head: bool = False,
                feature_size: tuple[int, int] | None = None) -> torch.Tensor:
        """VILA's call convention: tokens ``(B, N, C)`` -> ``(B, N', D)``, or with
        ``forward_top_down_prompt_head=True`` LLM states ``(..., D)`` -> prompts ``(..., C)``."""
        if forward_top_down_prompt_head:
            if not hasattr(self, "top_down_prompt_head"):
                raise ValueError("this projector has no top_down_prompt_head (checkpoint trained with look_close_mode='after_image')")
            return self.top_down_prompt_head(x)
        return self.layers[1:](self.layers[0](x, feature_size))

    def _pos_embed(self, size: tuple[int, int]) -> torch.Tensor:
        """``high_res_pos_embed`` area-resized to ``size``, flattened: ``(h*w, D)``."""
        pe = self.high_res_pos_embed
        side = math.isqrt(pe.shape[1])
        grid = pe.reshape(1, side, side, -1).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=size, mode="area")[0].flatten(1).t()

    def embed_low_res(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res tokens ``(B, L, C)`` -> LLM tokens ``(B, L', D)`` plus position/scale 0 embedding."""
        x = self(low_res)
        if self.has_high_res_embed:
            side = math.isqrt(x.shape[1])
            x = x + self._pos_embed((side, side)) + self.high_res_scale_embed[0]
        return x

    def embed_ps3_features(self, features, selection_maps, low_res_token_num: int) -> list[torch.Tensor]:
        """PS3 tower output -> per image ``[low-res LLM tokens; kept high-res LLM tokens]``.

        Same result as VILA: scatter the high-res tokens into zero-filled per-scale maps,
        downsample r x r, keep a downsampled token where the area-resized selection map
        equals 1 (every token of its block selected), then project and add embeddings. Here
        only an index map is scattered, the kept blocks are gathered for all images at once,
        and the MLP sees only kept tokens. An image that keeps none gets its first low-res
        token instead (VILA's guard). ``features`` is ``(B, N, C)`` or a list of ``(N_i, C)``;
        ``selection_maps`` is PS3's per-scale list or its per-image lists.
        """
        low, high, counts = _split_features(features, low_res_token_num)
        B, C, r = low.shape[0], low.shape[-1], self.downsample_rate
        masks = _square_masks(selection_maps, B)
        flat = torch.cat([m.flatten(1) for m in masks], dim=1)
        selected = flat.sum(1).tolist()
        if selected != counts:
            raise ValueError(f"selection maps select {selected} tokens but features hold {counts} high-res tokens")
        low_out = self.embed_low_res(low)

        # 1 + row of each selected token in `high`; 0 (also the downsample padding) -> a zero row.
        index = torch.zeros(flat.shape, dtype=torch.long, device=flat.device)
        index[flat] = torch.arange(1, high.shape[0] + 1, device=flat.device)
        rows = torch.cat([high.new_zeros(1, C), high])
        gathered, image_of, cell_of, pos = [], [], [], []
        cell_offset = 0
        for s, (idx, mask) in enumerate(zip(index.split([m[0].numel() for m in masks], dim=1), masks)):
            S = mask.shape[-1]
            side = -(-S // r)
            keep = F.interpolate(mask[:, None].float(), size=(side, side), mode="area").flatten(1) == 1
            b, cell = keep.nonzero(as_tuple=True)
            blocks = downsample_tokens(idx.view(B, S, S, 1), r).view(B, side * side, r * r)
            gathered.append(rows[blocks[b, cell]].flatten(1))
            image_of.append(b)
            cell_of.append(cell + cell_offset)
            cell_offset += side * side
            if self.has_high_res_embed:
                pos.append(self._pos_embed((side, side)) + self.high_res_scale_embed[s + 1][0])
        image_of = torch.cat(image_of)
        order = torch.argsort(image_of, stable=True)  # image-major, then scale, then raster
        tokens = self.layers[1:](torch.cat(gathered)[order])
        if pos:
            tokens = tokens + torch.cat(pos)[torch.cat(cell_of)[order]]
        kept = tokens.split(torch.bincount(image_of, minlength=B).tolist())
        return [torch.cat([low_out[b], k if k.shape[0] else low_out[b, :1]]) for b, k in enumerate(kept)]
