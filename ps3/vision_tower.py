"""VILA's import path for the PS3 vision tower (``from ps3.vision_tower import PS3VisionTower``,
one changed line in VILA's ``multimodal_encoder/builder.py``); the code is in ``ps3.vila_hd``."""

from .vila_hd.loading import load_vila_hd
from .vila_hd.tower import PS3VisionTower

__all__ = ["PS3VisionTower", "load_vila_hd"]
