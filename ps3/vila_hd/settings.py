"""VILA-HD's knobs: the look-close settings (arguments over VILA's environment variables over
the checkpoint's config) and the values read from VILA's LLaVA config."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch

LOOK_CLOSE_MODES = ("after_prompt", "after_image")


def config_value(config: Any, key: str, default: Any = None) -> Any:
    """``config[key]`` for mappings, ``config.key`` for config objects; None counts as unset
    (VILA stores None)."""
    value = config.get(key) if isinstance(config, Mapping) else getattr(config, key, None)
    return default if value is None else value


def parse_dtype(value: Any) -> torch.dtype | None:
    """VILA stores ``model_dtype`` as a string like ``"torch.bfloat16"`` (it ``eval``s it)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(f"model_dtype must be a torch dtype or a name like 'torch.bfloat16', got {value!r}")


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
