"""VILA-HD around PS3: VILA's projector and prompt head, the high-res token path, a two-pass driver.

Module and parameter names follow VILA (``llava/model/multimodal_projector/base_projector.py``)
so the ``mm_projector`` weights of VILA-HD checkpoints load unchanged. Behaviour follows
``LlavaTopDownMetaForCausalLM`` (``llava/model/llava_arch.py``): pass 1 encodes the low-res view
only and reads the top-down prompt off the LLM; pass 2 encodes with that prompt and feeds the
LLM ``[low-res tokens; kept high-res tokens; "\\n"]`` per image. The high-res path here is one
batched scatter + downsample + gather (VILA loops over images), and the MLP runs only on the
tokens that are kept.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vit import Mlp

if TYPE_CHECKING:
    from .vision_tower import PS3VisionTower

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for an image in ``input_ids``
DOWNSAMPLE_RATIO = {"mlp_downsample": 2, "mlp_downsample_2x2_fix": 2, "mlp_downsample_3x3_fix": 3}
LOOK_CLOSE_MODES = ("after_prompt", "after_image")
PROMPT_HEAD_TYPES = ("linear", "mlp")

__all__ = [
    "IMAGE_TOKEN_INDEX",
    "LookCloseSettings",
    "TokenDownsample",
    "VilaHDInputs",
    "VilaHDPipeline",
    "VilaHDProjector",
    "downsample_tokens",
    "first_n_scales_for_sizes",
    "parse_look_close_env",
    "resolve_look_close_settings",
    "tokenize_with_images",
]


# ----- projector -----


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
        def get(key, default=None):
            value = config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)
            return default if value is None else value

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


# ----- look-close settings (VILA's environment variables) -----


@dataclass(frozen=True)
class LookCloseSettings:
    """VILA-HD's inference knobs. ``num_token_look_close``, when set, replaces
    ``num_look_close`` (as in VILA); ``select_num_each_scale`` replaces PS3's per-look quota
    per high-res scale; ``look_close_mode="after_image"`` skips pass 1 (bottom-up selection)."""

    num_look_close: int | str = 1
    num_token_look_close: int | None = None
    select_num_each_scale: tuple[int, ...] | None = None
    look_close_mode: str = "after_prompt"
    smooth_selection_prob: bool = False

    def __post_init__(self):
        if not (self.num_look_close == "all" or (isinstance(self.num_look_close, int) and not isinstance(self.num_look_close, bool) and self.num_look_close >= 0)):
            raise ValueError(f"num_look_close must be an int >= 0 or 'all', got {self.num_look_close!r}")
        if self.num_token_look_close is not None and (isinstance(self.num_token_look_close, bool) or not isinstance(self.num_token_look_close, int) or self.num_token_look_close < 0):
            raise ValueError(f"num_token_look_close must be an int >= 0 or None, got {self.num_token_look_close!r}")
        if self.select_num_each_scale is not None:
            quotas = tuple(self.select_num_each_scale)
            if not quotas or any(isinstance(q, bool) or not isinstance(q, int) or q < 0 for q in quotas):
                raise ValueError(f"select_num_each_scale must be ints >= 0, got {self.select_num_each_scale!r}")
            object.__setattr__(self, "select_num_each_scale", quotas)
        if self.look_close_mode not in LOOK_CLOSE_MODES:
            raise ValueError(f"look_close_mode must be one of {LOOK_CLOSE_MODES}, got {self.look_close_mode!r}")
        if not isinstance(self.smooth_selection_prob, bool):
            raise TypeError(f"smooth_selection_prob must be a bool, got {type(self.smooth_selection_prob).__name__}")

    def vision_kwargs(self) -> dict[str, Any]:
        """``num_look_close`` / ``num_token_look_close`` as VILA passes them to the tower."""
        if self.num_token_look_close is not None:
            return {"num_look_close": None, "num_token_look_close": self.num_token_look_close}
        return {"num_look_close": self.num_look_close, "num_token_look_close": None}


def _env_int(name: str, raw: str) -> int | str:
    if name == "NUM_LOOK_CLOSE" and raw.strip() == "all":
        return "all"
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None


def parse_look_close_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The look-close knobs set in the environment, parsed as VILA's ``vila-infer`` does:
    ``NUM_LOOK_CLOSE`` / ``NUM_TOKEN_LOOK_CLOSE`` ints (``"all"`` also accepted for the
    former, as PS3 takes it), ``SELECT_NUM_EACH_SCALE`` as ``"512+2048"``, ``LOOK_CLOSE_MODE``
    as is, ``SMOOTH_SELECTION_PROB`` ``true``/``false`` (any case). Unset variables are absent."""
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    if env.get("NUM_LOOK_CLOSE") is not None:
        out["num_look_close"] = _env_int("NUM_LOOK_CLOSE", env["NUM_LOOK_CLOSE"])
    if env.get("NUM_TOKEN_LOOK_CLOSE") is not None:
        out["num_token_look_close"] = _env_int("NUM_TOKEN_LOOK_CLOSE", env["NUM_TOKEN_LOOK_CLOSE"])
    if env.get("SELECT_NUM_EACH_SCALE") is not None:
        raw = env["SELECT_NUM_EACH_SCALE"]
        if not re.fullmatch(r"\s*\d+\s*(\+\s*\d+\s*)*", raw):
            raise ValueError(f"SELECT_NUM_EACH_SCALE must look like '512+2048', got {raw!r}")
        out["select_num_each_scale"] = tuple(int(x) for x in raw.split("+"))
    if env.get("LOOK_CLOSE_MODE") is not None:
        out["look_close_mode"] = env["LOOK_CLOSE_MODE"]
    if env.get("SMOOTH_SELECTION_PROB") is not None:
        raw = env["SMOOTH_SELECTION_PROB"]
        if raw.lower() not in ("true", "false"):
            raise ValueError(f"SMOOTH_SELECTION_PROB must be 'true' or 'false', got {raw!r}")
        out["smooth_selection_prob"] = raw.lower() == "true"
    return out


def resolve_look_close_settings(
    base: LookCloseSettings | None = None,
    environ: Mapping[str, str] | None = None,
    **explicit: Any,
) -> LookCloseSettings:
    """Explicit arguments (None = not given) over environment variables over ``base``.

    An explicit ``num_look_close`` also clears a ``num_token_look_close`` that came from the
    environment or ``base``, since the token count would otherwise win.
    """
    fields = set(LookCloseSettings.__dataclass_fields__)
    unknown = set(explicit) - fields
    if unknown:
        raise TypeError(f"unknown look-close settings {sorted(unknown)}; known: {sorted(fields)}")
    given = {k: v for k, v in explicit.items() if v is not None}
    if "num_look_close" in given and "num_token_look_close" in given:
        raise ValueError("give num_look_close or num_token_look_close, not both")
    values = {**parse_look_close_env(environ), **given}
    if "num_look_close" in given:
        values["num_token_look_close"] = None
    return replace(base or LookCloseSettings(), **values)


def first_n_scales_for_sizes(ps3_scales: Sequence[int], original_image_sizes: Sequence[tuple[int, int]]) -> list[int]:
    """VILA's ``ps3_dynamic_aspect_ratio`` rule: images whose long side is below the midpoint
    of the two largest scales skip the largest scale (only for models above 2000 px)."""
    scales = list(ps3_scales)
    if len(scales) < 3:
        raise ValueError(f"dynamic aspect ratio needs at least two high-res scales, got {scales}")
    thresholds = [(scales[i] + scales[i + 1]) / 2 for i in range(1, len(scales) - 1)]
    return [
        len(thresholds) + 1 if max(size) > thresholds[-1] or scales[-1] <= 2000 else len(thresholds)
        for size in original_image_sizes
    ]


# ----- two-pass driver -----


@dataclass
class VilaHDInputs:
    """What pass 2 hands the LLM, plus the selection it made."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    selection_maps: Any
    selection_probs: Any
    top_down_prompts: torch.Tensor | None


def tokenize_with_images(tokenizer, question: str, num_images: int = 1, image_token_id: int = IMAGE_TOKEN_INDEX,
                         image_token: str = "<image>") -> torch.Tensor:
    """``(1, L)`` ids of a one-turn chat (images first, then the question, as VILA writes
    it) with one ``image_token_id`` per image; needs a tokenizer with a chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat_template; build input_ids yourself with image_token_id placeholders")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": image_token * num_images + question}], add_generation_prompt=True, tokenize=False
    )
    ids: list[int] = []
    for i, piece in enumerate(text.split(image_token)):
        if i:
            ids.append(image_token_id)
        ids.extend(tokenizer(piece, add_special_tokens=False).input_ids)
    return torch.tensor([ids])


class VilaHDPipeline:
    """VILA-HD inference around any Hugging Face causal LM.

    ``input_ids`` carry one ``image_token_id`` per image (images are consumed in row-major
    order). Pass 1 (``after_prompt``) runs the LLM over ``[low-res image tokens; text]`` up to
    the look-close position (by default the end of the user turn, found from the tokenizer's
    chat template as VILA does, else the last real token) and turns its last hidden state
    there into a PS3 prompt with ``top_down_prompt_head``. Pass 2 encodes with that prompt and
    returns the LLM inputs. Knobs: explicit arguments > VILA's environment variables
    (read at each call) > ``defaults`` (e.g. the checkpoint's config).
    """

    def __init__(
        self,
        vision_tower: "PS3VisionTower",
        projector: VilaHDProjector,
        llm: nn.Module,
        tokenizer: Any = None,
        *,
        image_token_id: int = IMAGE_TOKEN_INDEX,
        image_end_token_ids: Sequence[int] | None = None,
        padding_side: str = "left",
        defaults: LookCloseSettings | None = None,
        dynamic_aspect_ratio: bool = False,
    ):
        for name in ("get_input_embeddings", "generate"):
            if not callable(getattr(llm, name, None)):
                raise TypeError(f"llm must be a Hugging Face causal LM (no {name}())")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.vision_tower = vision_tower
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        if image_end_token_ids is None:  # VILA's BasicImageEncoder appends "\n" to every image
            if tokenizer is None:
                raise ValueError(
                    "a VilaHDPipeline without a tokenizer needs image_end_token_ids (VILA's '\\n' after each "
                    "image; pass [] to append nothing)"
                )
            image_end_token_ids = tokenizer("\n", add_special_tokens=False).input_ids
        self.image_end_token_ids = list(image_end_token_ids)
        self.padding_side = padding_side
        self.defaults = defaults or LookCloseSettings()
        self.dynamic_aspect_ratio = dynamic_aspect_ratio

    # ----- pieces -----

    @contextmanager
    def _quotas(self, settings: LookCloseSettings) -> Iterator[None]:
        """Apply ``select_num_each_scale`` for one call (VILA sets it on the model for good)."""
        encoder = self.vision_tower.vision_tower.vision_model
        if settings.select_num_each_scale is None:
            yield
            return
        quotas = list(settings.select_num_each_scale)
        if len(quotas) != len(encoder.ps3_scales) - 1:
            raise ValueError(f"select_num_each_scale needs one quota per high-res scale ({len(encoder.ps3_scales) - 1}), got {quotas}")
        saved = encoder.max_select_num_each_scale
        encoder.max_select_num_each_scale = quotas
        try:
            yield
        finally:
            encoder.max_select_num_each_scale = saved

    def encode_images(
        self,
        images,
        settings: LookCloseSettings,
        top_down_prompts: torch.Tensor | None = None,
        look_close: bool = True,
        gt_selection_maps=None,
        original_image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[list[torch.Tensor], Any, Any]:
        """Images -> per-image LLM token embeddings (with the end tokens), maps, probs.
        ``look_close=False`` is pass 1: low-res tokens only."""
        tower, encoder = self.vision_tower, self.vision_tower.vision_tower.vision_model
        first_n = None
        if look_close and self.dynamic_aspect_ratio and original_image_sizes is not None:
            first_n = first_n_scales_for_sizes(encoder.ps3_scales, original_image_sizes)
        kwargs = settings.vision_kwargs() if look_close else {"num_look_close": 0, "num_token_look_close": None}
        with self._quotas(settings):
            features, maps, probs = tower(
                images, top_down_prompts, kwargs["num_look_close"], kwargs["num_token_look_close"],
                settings.smooth_selection_prob, gt_selection_maps, first_n,
            )
        dtype = self.projector.layers[1].weight.dtype
        if not look_close or maps is None:
            low = features if isinstance(features, torch.Tensor) else torch.cat([f.reshape(1, *f.shape[-2:]) for f in features])
            embeds = list(self.projector.embed_low_res(low.to(dtype)).unbind(0))
        else:
            features = features.to(dtype) if isinstance(features, torch.Tensor) else [f.to(dtype) for f in features]
            embeds = self.projector.embed_ps3_features(features, maps, encoder.low_res_token_num)
        if self.image_end_token_ids:
            embed = self.llm.get_input_embeddings()
            end = embed(torch.tensor(self.image_end_token_ids, device=embed.weight.device))
            embeds = [torch.cat([e, end.to(e)]) for e in embeds]
        return embeds, maps, probs

    def splice(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               image_embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replace each image token by its embeddings, drop padding, re-pad on ``padding_side``.

        Returns ``inputs_embeds``, ``attention_mask`` and, for every input position, the
        output position of its last row (to map look-close positions).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        is_image = (input_ids == self.image_token_id) & mask
        if int(is_image.sum()) != len(image_embeds):
            raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens (id {self.image_token_id}) but {len(image_embeds)} images were given")
        embed = self.llm.get_input_embeddings()
        text = embed(input_ids.masked_fill(is_image | ~mask, 0))
        B, device = input_ids.shape[0], input_ids.device
        image_len = torch.tensor([e.shape[0] for e in image_embeds], device=device, dtype=torch.long)
        lens = mask.long()
        lens[is_image] = image_len
        ends = lens.cumsum(1)
        total = ends[:, -1]
        width = int(total.max())
        offset = (width - total) if self.padding_side == "left" else torch.zeros_like(total)
        ends = ends + offset[:, None]
        starts = ends - lens
        out = text.new_zeros(B, width, text.shape[-1])
        b, t = (mask & ~is_image).nonzero(as_tuple=True)
        out[b, starts[b, t]] = text[b, t]
        if len(image_embeds):
            b, t = is_image.nonzero(as_tuple=True)
            rows = torch.arange(int(image_len.sum()), device=device)
            first_row = (image_len.cumsum(0) - image_len).repeat_interleave(image_len)
            out[b.repeat_interleave(image_len), starts[b, t].repeat_interleave(image_len) + rows - first_row] = (
                torch.cat(list(image_embeds)).to(out)
            )
        pos = torch.arange(width, device=device)
        new_mask = (pos >= offset[:, None]) & (pos < (offset + total)[:, None])
        return out, new_mask.long(), ends - 1

    def find_look_close_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per row, the last token of the user turn: the token before the first occurrence of
        the chat template's post-user text (VILA's ``get_user_prompt_end_id_pos``), else the
        last real token."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        idx = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = torch.where(mask, idx, -1).max(1).values
        ending = self._user_turn_end_ids()
        n = len(ending)
        if not n or n > input_ids.shape[1]:
            return last
        windows = input_ids.unfold(1, n, 1) == torch.tensor(ending, device=input_ids.device)
        hit = windows.all(-1) & mask[:, n - 1:]
        first = torch.where(hit, idx[: hit.shape[1]], input_ids.shape[1]).min(1).values
        return torch.where(hit.any(1), (first - 1).clamp(min=0), last)

    def _user_turn_end_ids(self) -> list[int]:
        tok = self.tokenizer
        if tok is None or getattr(tok, "chat_template", None) is None:
            return []
        dummy = "Here is the prompt."
        text = tok.apply_chat_template([{"role": "user", "content": dummy}], add_generation_prompt=True, tokenize=False)
        return tok(text.split(dummy)[-1].strip(), add_special_tokens=False).input_ids

    def top_down_prompts(
        self,
        images,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        look_close_positions: torch.Tensor | None = None,
        settings: LookCloseSettings | None = None,
    ) -> torch.Tensor:
        """Pass 1: one PS3 prompt per image, ``(num_images, vision width)``; every image of a
        row gets that row's prompt."""
        settings = settings or self.defaults
        if look_close_positions is None:
            look_close_positions = self.find_look_close_positions(input_ids, attention_mask)
        look_close_positions = torch.as_tensor(look_close_positions, device=input_ids.device).long()
        if look_close_positions.shape != (input_ids.shape[0],):
            raise ValueError(f"look_close_positions must hold one index per row ({input_ids.shape[0]})")
        if ((look_close_positions < 0) | (look_close_positions >= input_ids.shape[1])).any():
            raise ValueError("look_close_positions must index into input_ids")
        embeds, _, _ = self.encode_images(images, settings, look_close=False)
        inputs_embeds, mask, row_end = self.splice(input_ids, attention_mask, embeds)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        at = row_end[rows, look_close_positions]
        cut = int(at.max()) + 1
        with torch.no_grad():
            out = self.llm(inputs_embeds=inputs_embeds[:, :cut], attention_mask=mask[:, :cut],
                           output_hidden_states=True, use_cache=False)
        states = out.hidden_states[-1][rows, at]
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        per_row = ((input_ids == self.image_token_id) & real).sum(1)
        prompts = self.projector(states.to(self.projector.layers[1].weight.dtype), forward_top_down_prompt_head=True)
        return prompts.repeat_interleave(per_row, dim=0)

    # ----- entry points -----

    def prepare_inputs(
        self,
        images,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        look_close_positions: torch.Tensor | None = None,
        gt_selection_maps=None,
        original_image_sizes: Sequence[tuple[int, int]] | None = None,
        num_look_close: int | str | None = None,
        num_token_look_close: int | None = None,
        select_num_each_scale: Sequence[int] | None = None,
        look_close_mode: str | None = None,
        smooth_selection_prob: bool | None = None,
    ) -> VilaHDInputs:
        """Both passes: the LLM's ``inputs_embeds`` and ``attention_mask`` for ``images``
        (``(N, 3, H, W)`` or a list of ``(3, H, W)``) placed at the image tokens of ``input_ids``."""
        settings = resolve_look_close_settings(
            self.defaults, num_look_close=num_look_close, num_token_look_close=num_token_look_close,
            select_num_each_scale=None if select_num_each_scale is None else tuple(select_num_each_scale),
            look_close_mode=look_close_mode, smooth_selection_prob=smooth_selection_prob,
        )
        prompts = None
        if settings.look_close_mode == "after_prompt":
            if not hasattr(self.projector, "top_down_prompt_head"):
                raise ValueError("look_close_mode='after_prompt' needs a top_down_prompt_head; use 'after_image'")
            prompts = self.top_down_prompts(images, input_ids, attention_mask, look_close_positions, settings)
        embeds, maps, probs = self.encode_images(images, settings, prompts, True, gt_selection_maps, original_image_sizes)
        inputs_embeds, mask, _ = self.splice(input_ids, attention_mask, embeds)
        return VilaHDInputs(inputs_embeds, mask, maps, probs, prompts)

    @torch.inference_mode()
    def generate(
        self,
        images,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        return_selection_probs: bool = False,
        look_close_positions: torch.Tensor | None = None,
        gt_selection_maps=None,
        original_image_sizes: Sequence[tuple[int, int]] | None = None,
        num_look_close: int | str | None = None,
        num_token_look_close: int | None = None,
        select_num_each_scale: Sequence[int] | None = None,
        look_close_mode: str | None = None,
        smooth_selection_prob: bool | None = None,
        **generation_kwargs: Any,
    ):
        """Both passes, then ``llm.generate``: the new token ids, or with
        ``return_selection_probs`` ``(ids, selection_maps, selection_probs)`` as VILA returns."""
        inputs = self.prepare_inputs(
            images, input_ids, attention_mask, look_close_positions=look_close_positions,
            gt_selection_maps=gt_selection_maps, original_image_sizes=original_image_sizes,
            num_look_close=num_look_close, num_token_look_close=num_token_look_close,
            select_num_each_scale=select_num_each_scale, look_close_mode=look_close_mode,
            smooth_selection_prob=smooth_selection_prob,
        )
        ids = self.llm.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, **generation_kwargs)
        return (ids, inputs.selection_maps, inputs.selection_probs) if return_selection_probs else ids
