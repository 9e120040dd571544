"""``load_vila_hd``: a VILA-HD checkpoint folder in VILA's save layout (a top-level
``config.json`` plus ``llm/``, ``vision_tower/`` and ``mm_projector/``; the prompt head and the
high-res embeddings are part of the ``mm_projector`` weights) -> a ready ``VilaHDPipeline``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ..modeling_ps3 import PS3VisionEncoder
from .pipeline import VilaHDPipeline
from .projector import DOWNSAMPLE_RATIO, VilaHDProjector
from .settings import LookCloseSettings, config_value, parse_dtype
from .tower import PS3VisionTower


def _load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """A Hugging Face weights folder: ``model.safetensors``, a sharded safetensors index, or
    ``pytorch_model.bin``."""
    single = folder / "model.safetensors"
    if single.exists():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for shard in shards for k, v in load_file(str(folder / shard)).items()}
    legacy = folder / "pytorch_model.bin"
    if legacy.exists():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"no model.safetensors, sharded index or pytorch_model.bin in {folder}")


def _subfolder(root: Path, config: dict, key: str) -> Path:
    """VILA's ``get_model_config``: a dict config lives in ``root/<name>``, a string is a path."""
    value = config.get(f"{key}_cfg")
    if isinstance(value, str):
        path = Path(value)
        return path if path.is_absolute() else root / path
    return root / key


def _projector_kind(folder: Path, config: dict) -> str:
    """``mm_projector_type`` from the projector's own config, else from the top-level one."""
    projector_cfg = config.get("mm_projector_cfg")
    kind = projector_cfg if isinstance(projector_cfg, str) and projector_cfg in DOWNSAMPLE_RATIO else None
    if (folder / "config.json").exists():
        kind = json.loads((folder / "config.json").read_text()).get("mm_projector_type", kind)
    elif isinstance(projector_cfg, dict):
        kind = projector_cfg.get("mm_projector_type", kind)
    if kind is None:
        raise ValueError(f"cannot find mm_projector_type in {folder / 'config.json'} or config.json")
    return kind


def _load_projector(folder: Path, config: dict, encoder: PS3VisionEncoder) -> VilaHDProjector:
    """The projector the config describes (dimensions it leaves out come from the encoder and
    the LLM's config), with weights that must match it exactly."""
    kind = _projector_kind(folder, config)
    llm_cfg = config.get("llm_cfg") if isinstance(config.get("llm_cfg"), dict) else {}
    dims = dict(
        config,
        hidden_size=config.get("hidden_size") or llm_cfg.get("hidden_size"),
        mm_hidden_size=config.get("mm_hidden_size") or encoder.width,
        mm_low_res_token_num=config.get("mm_low_res_token_num") or encoder.low_res_token_num,
        mm_scale_num=config.get("mm_scale_num") or len(encoder.ps3_scales),
    )
    projector = VilaHDProjector.from_vila_config(kind, dims)
    state = _load_weights(folder)
    expected = projector.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = {k: (tuple(v.shape), tuple(state[k].shape)) for k, v in expected.items() if k in state and v.shape != state[k].shape}
    if missing or unexpected or shapes:  # checked before loading, which would raise a bare RuntimeError
        raise ValueError(f"{folder} does not match a {kind} projector for this config: "
                         f"missing {missing}, unexpected {unexpected}, shape mismatches {shapes}")
    projector.load_state_dict(state)
    return projector


def load_vila_hd(
    folder: str | os.PathLike,
    *,
    llm: nn.Module | None = None,
    tokenizer: Any = None,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    **pipeline_kwargs: Any,
) -> VilaHDPipeline:
    """A VILA-HD checkpoint folder -> ready ``VilaHDPipeline``.

    Reads ``config.json`` (``ps3``, ``hidden_size``, ``mm_hidden_size``, ``look_close_mode``,
    ``num_look_close``, ``num_token_look_close``, ``top_down_prompt_head_type``,
    ``high_res_pos_embed``, ``mm_low_res_token_num``, ``mm_scale_num``, ``model_dtype``,
    ``mm_vision_select_*``, ``ps3_dynamic_aspect_ratio``), the PS3 tower from ``vision_tower/``,
    the projector (with prompt head and high-res embeddings) from ``mm_projector/``, and the
    LLM and tokenizer from ``llm/`` unless ``llm`` / ``tokenizer`` are given. Weights must
    match exactly. ``pipeline_kwargs`` go to ``VilaHDPipeline``.
    """
    root = Path(folder)
    config_path = root / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{root} has no config.json (not a VILA checkpoint folder)")
    config = json.loads(config_path.read_text())
    if not config.get("ps3"):
        raise ValueError(f"{root} is not a VILA-HD checkpoint: its config.json does not set ps3=true")
    load_dtype = parse_dtype(dtype) or parse_dtype(config.get("model_dtype"))

    tower = PS3VisionTower(_subfolder(root, config, "vision_tower"), dict(config, model_dtype=load_dtype))
    projector = _load_projector(_subfolder(root, config, "mm_projector"), config, tower.encoder)
    if load_dtype is not None:
        projector.to(load_dtype)
    if llm is None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        llm_dir = _subfolder(root, config, "llm")
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, **({} if load_dtype is None else {"dtype": load_dtype}))
        if tokenizer is None and (llm_dir / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    for module in (tower, projector, llm):
        if device is not None:
            module.to(device)
        module.eval()

    has_head = hasattr(projector, "top_down_prompt_head")
    defaults = LookCloseSettings(
        num_look_close=config_value(config, "num_look_close", 1),
        num_token_look_close=config.get("num_token_look_close"),
        look_close_mode=config_value(config, "look_close_mode", "after_prompt" if has_head else "after_image"),
    )
    pipeline_kwargs.setdefault("defaults", defaults)
    pipeline_kwargs.setdefault("dynamic_aspect_ratio", bool(config.get("ps3_dynamic_aspect_ratio", False)))
    return VilaHDPipeline(tower, projector, llm, tokenizer, **pipeline_kwargs)
