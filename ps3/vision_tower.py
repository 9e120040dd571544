"""VILA/LLaVA-style vision tower around PS3, and a loader for VILA-HD checkpoint folders.

``PS3VisionTower`` has the constructor, attributes and ``forward`` of VILA's
``llava/model/multimodal_encoder/ps3_encoder.py`` (with its ``VisionTower`` base), so VILA
uses it by changing one import. ``load_vila_hd`` reads VILA's save layout: a top-level
``config.json`` plus ``llm/``, ``vision_tower/`` and ``mm_projector/`` (the prompt head and the
high-res embeddings are part of the ``mm_projector`` weights).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file

from .configuration_ps3 import PS3VisionConfig
from .image_processing_ps3 import PS3ImageProcessor
from .modeling_ps3 import PS3VisionModel
from .vila_hd import DOWNSAMPLE_RATIO, LookCloseSettings, VilaHDPipeline, VilaHDProjector

__all__ = ["PS3VisionTower", "load_vila_hd"]

SELECT_FEATURES = ("cls_patch",)  # PS3 has no class token: VILA-HD keeps every token


def _cfg(config: Any, key: str, default: Any = None) -> Any:
    """``config.key`` for config objects or dicts; None counts as unset (VILA stores None)."""
    if config is None:
        return default
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return default if value is None else value


def _dtype(value: Any) -> torch.dtype | None:
    """VILA stores ``model_dtype`` as a string like ``"torch.bfloat16"`` (it ``eval``s it)."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    raise ValueError(f"model_dtype must be a torch dtype or a name like 'torch.bfloat16', got {value!r}")


class PS3VisionTower(nn.Module):
    """VILA's PS3 vision tower: ``PS3VisionTower(model_name_or_path, config)``.

    ``config`` is VILA's LLaVA config (or any object/dict) and may set ``model_dtype``,
    ``mm_vision_select_layer`` (default -2), ``mm_vision_select_feature`` (``"cls_patch"``)
    and ``ps3_grad_checkpointing``. ``model_name_or_path`` may also be a loaded
    ``PS3VisionModel``. ``delay_load=True`` reads only the config until ``load_model()``,
    as LLaVA's towers do.
    """

    def __init__(self, model_name_or_path: str | os.PathLike | PS3VisionModel, config: Any = None,
                 delay_load: bool = False, image_processor: PS3ImageProcessor | None = None):
        super().__init__()
        self.is_loaded = False
        self.cfg_only: PS3VisionConfig | None = None
        self.select_layer = int(_cfg(config, "mm_vision_select_layer", -2))
        self.select_feature = _cfg(config, "mm_vision_select_feature", "cls_patch")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(f"mm_vision_select_feature must be 'cls_patch' for PS3 (no class token to drop), got {self.select_feature!r}")
        self._model_dtype = _dtype(_cfg(config, "model_dtype"))
        self._grad_checkpointing = bool(_cfg(config, "ps3_grad_checkpointing", False))
        if isinstance(model_name_or_path, PS3VisionModel):
            self.vision_tower_name = model_name_or_path.name_or_path
            self._attach(model_name_or_path, image_processor or PS3ImageProcessor(image_size=model_name_or_path.config.ps3_scales[-1]))
        elif isinstance(model_name_or_path, (str, os.PathLike)):
            self.vision_tower_name = str(model_name_or_path)
            self._image_processor_arg = image_processor
            if delay_load:
                self.cfg_only = PS3VisionConfig.from_pretrained(self.vision_tower_name)
            else:
                self.load_model()
        else:
            raise TypeError(f"model_name_or_path must be a path or a PS3VisionModel, got {type(model_name_or_path).__name__}")

    def load_model(self, device_map: Any = None) -> None:
        """Load the PS3 weights and image processor (no-op when loaded)."""
        if self.is_loaded:
            return
        kwargs = {} if self._model_dtype is None else {"dtype": self._model_dtype}
        if device_map is not None:
            kwargs["device_map"] = device_map
        model = PS3VisionModel.from_pretrained(self.vision_tower_name, **kwargs)
        processor = self._image_processor_arg
        if processor is None:
            if (Path(self.vision_tower_name) / "preprocessor_config.json").exists() or not Path(self.vision_tower_name).exists():
                processor = PS3ImageProcessor.from_pretrained(self.vision_tower_name)
            else:
                processor = PS3ImageProcessor(image_size=model.config.ps3_scales[-1])
        self._attach(model, processor)

    def _attach(self, model: PS3VisionModel, image_processor: PS3ImageProcessor) -> None:
        self.vision_tower = model
        self.image_processor = image_processor
        # VILA keeps the last two layers: the default select layer -2 is the second-to-last.
        model.vision_model.num_hidden_layers_to_return = 2
        self.cfg_only = None
        self.is_loaded = True
        self.set_grad_checkpointing(self._grad_checkpointing)

    # ----- attributes VILA / LLaVA read -----

    @property
    def config(self) -> PS3VisionConfig:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.vision_tower.vision_model.width if self.is_loaded else self.cfg_only.hidden_size

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vision_tower.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.vision_tower.parameters()).device

    @property
    def num_patches_per_side(self) -> int:
        return self.config.image_size // self.config.patch_size

    @property
    def num_patches(self) -> int:
        return self.num_patches_per_side**2

    @property
    def dummy_feature(self) -> torch.Tensor:
        return torch.zeros(1, self.hidden_size, device=self.device, dtype=self.dtype)

    @property
    def num_hidden_layers_to_return(self) -> int:
        return self.vision_tower.vision_model.num_hidden_layers_to_return

    @num_hidden_layers_to_return.setter
    def num_hidden_layers_to_return(self, value: int) -> None:
        depth = self.vision_tower.vision_model.layers
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= depth:
            raise ValueError(f"num_hidden_layers_to_return must be an int in [1, {depth}], got {value!r}")
        self.vision_tower.vision_model.num_hidden_layers_to_return = value

    @property
    def grad_checkpointing(self) -> bool:
        return self._grad_checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute trunk blocks in backward (VILA's ``ps3_grad_checkpointing``)."""
        self._grad_checkpointing = bool(enable)
        if self.is_loaded:
            self.vision_tower.vision_model.trunk.set_grad_checkpointing(self._grad_checkpointing)

    # ----- forward -----

    def feature_select(self, outputs) -> Any:
        """``hidden_states[select_layer]``: ``(B, N, C)``, or per image for list inputs."""
        hidden = outputs.hidden_states
        per_image = bool(hidden) and isinstance(hidden[0], (list, tuple))
        layers = len(hidden[0]) if per_image else len(hidden)
        if not -layers <= self.select_layer < layers:
            raise ValueError(f"select_layer {self.select_layer} is out of range: PS3 returned {layers} layers "
                             "(raise num_hidden_layers_to_return)")
        return [h[self.select_layer] for h in hidden] if per_image else hidden[self.select_layer]

    def forward(
        self,
        images,
        top_down_prompts: torch.Tensor | None = None,
        num_look_close: int | str | None = 1,
        num_token_look_close: int | list[int] | None = None,
        smooth_selection_prob: bool = False,
        gt_selection_maps: torch.Tensor | None = None,
        only_select_first_n_scale: int | list[int] | None = None,
    ):
        """VILA's PS3 tower call: ``(image_features, selection_maps, selection_probs)``.

        ``images`` is ``(B, 3, H, W)`` or a list of ``(3, H, W)`` (then features and maps are
        per-image lists). ``num_token_look_close``, when given, replaces ``num_look_close``.
        Features come back in the images' dtype, as in VILA.
        """
        if not self.is_loaded:
            raise ValueError("the vision tower is not loaded; call load_model() first")
        if num_token_look_close is not None:
            num_look_close = None
        if isinstance(images, torch.Tensor):
            in_dtype = images.dtype
            pixels = images.to(device=self.device, dtype=self.dtype)
        elif isinstance(images, (list, tuple)) and images and all(isinstance(im, torch.Tensor) for im in images):
            in_dtype = images[0].dtype
            pixels = [im.to(device=self.device, dtype=self.dtype) for im in images]
        else:
            raise TypeError("images must be a (B, 3, H, W) tensor or a non-empty list of (3, H, W) tensors")
        out = self.vision_tower(
            pixels, num_look_close=num_look_close, num_token_look_close=num_token_look_close, prompt=top_down_prompts,
            gt_selection_maps=gt_selection_maps, smooth_selection_prob=smooth_selection_prob,
            only_select_first_n_scale=only_select_first_n_scale, output_hidden_states=True,
        )
        features = self.feature_select(out)
        features = features.to(in_dtype) if isinstance(features, torch.Tensor) else [f.to(in_dtype) for f in features]
        return features, out.selection_maps, out.selection_probs


# ----- VILA-HD checkpoint folders -----


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
    load_dtype = _dtype(dtype) or _dtype(config.get("model_dtype"))

    tower_config = dict(config, model_dtype=load_dtype)
    tower = PS3VisionTower(_subfolder(root, config, "vision_tower"), tower_config)
    encoder = tower.vision_tower.vision_model

    projector_dir = _subfolder(root, config, "mm_projector")
    projector_cfg = config.get("mm_projector_cfg")
    kind = projector_cfg if isinstance(projector_cfg, str) and projector_cfg in DOWNSAMPLE_RATIO else None
    if (projector_dir / "config.json").exists():
        kind = json.loads((projector_dir / "config.json").read_text()).get("mm_projector_type", kind)
    elif isinstance(projector_cfg, dict):
        kind = projector_cfg.get("mm_projector_type", kind)
    if kind is None:
        raise ValueError(f"cannot find mm_projector_type in {projector_dir / 'config.json'} or config.json")
    llm_cfg = config.get("llm_cfg") if isinstance(config.get("llm_cfg"), dict) else {}
    dims = dict(
        config,
        hidden_size=config.get("hidden_size") or llm_cfg.get("hidden_size"),
        mm_hidden_size=config.get("mm_hidden_size") or encoder.width,
        mm_low_res_token_num=config.get("mm_low_res_token_num") or encoder.low_res_token_num,
        mm_scale_num=config.get("mm_scale_num") or len(encoder.ps3_scales),
    )
    projector = VilaHDProjector.from_vila_config(kind, dims)
    state = _load_weights(projector_dir)
    expected = projector.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = {k: (tuple(v.shape), tuple(state[k].shape)) for k, v in expected.items() if k in state and v.shape != state[k].shape}
    if missing or unexpected or shapes:  # checked before loading, which would raise a bare RuntimeError
        raise ValueError(f"{projector_dir} does not match a {kind} projector for this config: "
                         f"missing {missing}, unexpected {unexpected}, shape mismatches {shapes}")
    projector.load_state_dict(state)
    if load_dtype is not None:
        projector.to(load_dtype)

    if llm is None:
        from transformers import AutoModelForCausalLM

        llm_dir = _subfolder(root, config, "llm")
        llm = AutoModelForCausalLM.from_pretrained(llm_dir, **({} if load_dtype is None else {"dtype": load_dtype}))
        if tokenizer is None and (llm_dir / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(llm_dir)
    if device is not None:
        tower.to(device)
        projector.to(device)
        llm.to(device)
    for module in (tower, projector, llm):
        module.eval()

    has_head = hasattr(projector, "top_down_prompt_head")
    defaults = LookCloseSettings(
        num_look_close=_cfg(config, "num_look_close", 1),
        num_token_look_close=config.get("num_token_look_close"),
        look_close_mode=_cfg(config, "look_close_mode", "after_prompt" if has_head else "after_image"),
    )
    pipeline_kwargs.setdefault("defaults", defaults)
    pipeline_kwargs.setdefault("dynamic_aspect_ratio", bool(config.get("ps3_dynamic_aspect_ratio", False)))
    return VilaHDPipeline(tower, projector, llm, tokenizer, **pipeline_kwargs)
