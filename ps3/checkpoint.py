"""What ``from_pretrained`` checks in a checkpoint before transformers builds the model.

transformers reports a missing ``config.json`` as a config error, a foreign ``model_type`` as
a log line, and an unreadable ``model.safetensors`` as a ``SafetensorError`` that names no
file. These checks turn each into an error that says which file is wrong, and read the
trunk's position grid from the checkpoint (only the safetensors header is read).
"""

from __future__ import annotations

import json
import math
import os

from safetensors import safe_open

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
POS_EMBED_KEY = "vision_model.trunk.pos_embed"
_HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def _resolve(path: str, filename: str, kwargs: dict) -> str | None:
    """Local path of ``filename`` in a folder (or a cached hub repo), or None if absent."""
    subfolder = kwargs.get("subfolder") or ""
    if os.path.isdir(path):
        full = os.path.join(path, subfolder, filename)
        return full if os.path.isfile(full) else None
    from transformers.utils import cached_file

    try:
        return cached_file(
            path, filename, _raise_exceptions_for_missing_entries=False,
            **{k: kwargs[k] for k in _HUB_KWARGS if kwargs.get(k) is not None},
        )
    except Exception:  # not reachable or not a repo: transformers raises its own error later
        return None


def read_config(path: str, kwargs: dict) -> dict | None:
    """The checkpoint's ``config.json`` as a dict; ``OSError`` naming it when a folder has none."""
    file = _resolve(path, CONFIG_NAME, kwargs)
    if file is None:
        if os.path.isdir(path):
            raise OSError(f"{os.path.join(path, kwargs.get('subfolder') or '', CONFIG_NAME)} not found: "
                          "a PS3 checkpoint folder needs the config.json that save_pretrained writes")
        return None
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read {file}: {err}") from err
    if not isinstance(config, dict):
        raise OSError(f"{file} does not hold a JSON object")
    return config


def check_model_type(config: dict, accepted: tuple[str, ...], cls_name: str, where: str) -> None:
    """A checkpoint of another kind (text vs vision, or not PS3 at all) is an error, not a warning."""
    model_type = config.get("model_type")
    if model_type is not None and model_type not in accepted:
        raise ValueError(
            f"{where} holds a model_type={model_type!r} checkpoint; {cls_name} loads {' or '.join(map(repr, accepted))}"
        )


def weight_shapes(path: str, kwargs: dict) -> dict[str, list[int]] | None:
    """Shapes of every tensor in the checkpoint's safetensors file(s), from their headers.

    ``OSError`` naming the file when one is empty, truncated or not safetensors; None when the
    checkpoint has no safetensors file (transformers then looks for other formats).
    """
    files = []
    single = _resolve(path, WEIGHTS_NAME, kwargs)
    if single is not None:
        files.append(single)
    else:
        index = _resolve(path, WEIGHTS_INDEX_NAME, kwargs)
        if index is None:
            return None
        try:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise OSError(f"cannot read the shard index {index}: {err!r}") from err
        for shard in shards:
            file = _resolve(path, shard, kwargs)
            if file is None:
                raise OSError(f"{index} lists {shard}, which is missing")
            files.append(file)
    shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    shapes[key] = list(f.get_slice(key).get_shape())
        except Exception as err:  # safetensors raises its own error type, naming no file
            raise OSError(f"{file} is not a readable safetensors file (empty, truncated or corrupt): {err}") from err
    return shapes


def pos_embed_grid(shapes: dict[str, list[int]], where: str) -> int | None:
    """Side of the trunk's square position grid stored in the checkpoint, if it has one."""
    shape = shapes.get(POS_EMBED_KEY)
    if shape is None:
        return None
    side = math.isqrt(shape[1]) if len(shape) == 3 else 0
    if len(shape) != 3 or shape[0] != 1 or side * side != shape[1]:
        raise ValueError(f"{where}: {POS_EMBED_KEY} has shape {shape}; expected (1, side*side, width)")
    return side
