"""``ps3-extract``: dataset-scale PS3 feature extraction on torchrun, exactly once and resumable.

``python -m ps3.extract INPUT --out DIR`` (or ``torchrun ... -m ps3.extract``) writes the
features; :func:`read_features` reads a finished output back.
"""

from .cli import main
from .shards import read_features

__all__ = ["main", "read_features"]
