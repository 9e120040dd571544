"""VILA-HD around PS3, under VILA's module and parameter names so its checkpoints load unchanged:
``tower`` (VILA's vision tower), ``projector`` (its ``mm_projector``), ``settings`` (the
look-close knobs), ``pipeline`` (the two passes) and ``loading`` (checkpoint folders)."""

from .loading import load_vila_hd
from .pipeline import IMAGE_TOKEN_INDEX, VilaHDInputs, VilaHDPipeline, tokenize_with_images
from .projector import DOWNSAMPLE_RATIO, TokenDownsample, VilaHDProjector, downsample_tokens
from .settings import LookCloseSettings, first_n_scales_for_sizes, parse_look_close_env, resolve_look_close_settings
from .tower import PS3VisionTower

__all__ = [
    "DOWNSAMPLE_RATIO", "IMAGE_TOKEN_INDEX", "LookCloseSettings", "PS3VisionTower", "TokenDownsample", "VilaHDInputs",
    "VilaHDPipeline", "VilaHDProjector", "downsample_tokens", "first_n_scales_for_sizes", "load_vila_hd",
    "parse_look_close_env", "resolve_look_close_settings", "tokenize_with_images",
]
