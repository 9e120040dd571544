"""VILA's PS3 vision tower: the constructor, attributes and ``forward`` of VILA's
``llava/model/multimodal_encoder/ps3_encoder.py`` (with its ``VisionTower`` base), so VILA uses
it by changing one import (``from ps3.vision_tower import PS3VisionTower``)."""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch
import torch.nn as nn

from ..configuration_ps3 import PS3VisionConfig
from ..demo import image_processor
from ..image_processing_ps3 import PS3ImageProcessor
from ..modeling_ps3 import PS3VisionEncoder, PS3VisionModel
from .settings import config_value, parse_dtype

SELECT_FEATURES = ("cls_patch",)  # PS3 has no class token: VILA-HD keeps every token


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
        self.select_layer = int(config_value(config, "mm_vision_select_layer", -2))
        self.select_feature = config_value(config, "mm_vision_select_feature", "cls_patch")
        if self.select_feature not in SELECT_FEATURES:
            raise ValueError(f"mm_vision_select_feature must be 'cls_patch' for PS3 (no class token to drop), got {self.select_feature!r}")
        self._model_dtype = parse_dtype(config_value(config, "model_dtype"))
        self._grad_checkpointing = bool(config_value(config, "ps3_grad_checkpointing", False))
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
            processor = image_processor(self.vision_tower_name, model.config.ps3_scales)
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
    def encoder(self) -> PS3VisionEncoder:
        """The PS3 encoder: ``vision_tower.vision_model`` (VILA's name for the model, then upstream's)."""
        return self.vision_tower.vision_model

    @property
    def config(self) -> PS3VisionConfig:
        return self.vision_tower.config if self.is_loaded else self.cfg_only

    @property
    def hidden_size(self) -> int:
        return self.encoder.width if self.is_loaded else self.cfg_only.hidden_size

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
        return self.encoder.num_hidden_layers_to_return

    @num_hidden_layers_to_return.setter
    def num_hidden_layers_to_return(self, value: int) -> None:
        depth = self.encoder.layers
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= depth:
            raise ValueError(f"num_hidden_layers_to_return must be an int in [1, {depth}], got {value!r}")
        self.encoder.num_hidden_layers_to_return = value

    @property
    def grad_checkpointing(self) -> bool:
        return self._grad_checkpointing

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute trunk blocks in backward (VILA's ``ps3_grad_checkpointing``)."""
        self._grad_checkpointing = bool(enable)
        if self.is_loaded:
            self.encoder.trunk.set_grad_checkpointing(self._grad_checkpointing)

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
        *,
        select_num_each_scale: Sequence[int] | None = None,
    ):
        """VILA's PS3 tower call: ``(image_features, selection_maps, selection_probs)``.

        ``images`` is ``(B, 3, H, W)`` or a list of ``(3, H, W)`` (then features and maps are
        per-image lists). ``num_token_look_close``, when given, replaces ``num_look_close``;
        ``select_num_each_scale`` replaces the per-look quota per high-res scale for this call
        (VILA sets it on the model instead). Features come back in the images' dtype, as in VILA.
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
            select_num_each_scale=select_num_each_scale,
        )
        features = self.feature_select(out)
        features = features.to(in_dtype) if isinstance(features, torch.Tensor) else [f.to(in_dtype) for f in features]
        return features, out.selection_maps, out.selection_probs
