"""``ps3-extract``'s output: safetensors shards written atomically, the index, ``read_features``.

Layout of an output folder::

    run.json          settings of the run (a resumed run must match them)
    shards/PPPPPP-CCCCC.safetensors
                      part P, chunk C: tensors "<row>/<feature>", and in the header metadata
                      the image ids of the rows, the images that failed, and whether it is
                      the part's last chunk
    index.jsonl       {"id", "shard", "keys": {feature: tensor name}} per encoded image
    errors.jsonl      {"id", "shard", "error"} per input that gave no image
    summary.json      counts and throughput of the run that finished the output

A shard exists under its final name only once it is complete (temporary name, fsync,
rename), so after a kill a rerun keeps every shard it finds and redoes the rest. The index
and the errors file are rebuilt from the shard headers at the end of every run.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import torch

SHARDS = "shards"
INDEX = "index.jsonl"
ERRORS = "errors.jsonl"
_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL",
}
METADATA_KEY = "ps3_extract"


def shard_name(part: int, chunk: int) -> str:
    return f"{part:06d}-{chunk:05d}.safetensors"


def parse_shard_name(name: str) -> tuple[int, int] | None:
    stem = name.removesuffix(".safetensors")
    if stem == name or name.startswith("."):
        return None
    part, _, chunk = stem.partition("-")
    return (int(part), int(chunk)) if part.isdigit() and chunk.isdigit() else None


def write_atomic(path: Path, text: str) -> None:
    """Write a small text file under a unique temporary name, then rename it into place
    (several ranks may write the same file at once)."""
    with _replacing(path) as f:
        f.write(text)


@contextmanager
def _replacing(path: Path):
    """A text file that replaces ``path`` when the block ends without an error."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # what open() would give, not mkstemp's 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class ShardWriter:
    """Streams tensors into one safetensors file, so a shard never has to fit in memory.

    Tensor bytes go to a side file as they arrive; :meth:`close` writes the header (which
    safetensors puts first) and the bytes into a temporary file, fsyncs it and renames it to
    its final name. Until then nothing under the final name exists.
    """

    def __init__(self, folder: Path, name: str):
        self.path = folder / name
        self._tmp = folder / f".{name}.tmp"
        self._data_path = folder / f".{name}.data.tmp"
        self._data = open(self._data_path, "wb")
        self._entries: dict[str, dict] = {}
        self._offset = 0
        self.image_ids: list[str] = []
        self.failures: list[tuple[str, str]] = []

    def add_image(self, image_id: str, features: dict[str, torch.Tensor]) -> None:
        row = len(self.image_ids)
        self.image_ids.append(image_id)
        for name, tensor in features.items():
            self._add_tensor(f"{row}/{name}", tensor)

    def _add_tensor(self, key: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        dtype = _SAFETENSORS_DTYPES.get(tensor.dtype)
        if dtype is None:
            raise TypeError(f"cannot store {tensor.dtype} tensors in a shard")
        data = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        self._data.write(data)
        self._entries[key] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [self._offset, self._offset + len(data)]}
        self._offset += len(data)

    def close(self, info: dict) -> None:
        """Finish the shard; ``info`` (JSON-able) goes into its header with the image ids and failures."""
        self._data.close()
        meta = dict(info, images=self.image_ids, failures=[list(f) for f in self.failures])
        header = json.dumps({"__metadata__": {METADATA_KEY: json.dumps(meta)}, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        with open(self._tmp, "wb") as out, open(self._data_path, "rb") as data:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(data, out, 1 << 22)
            out.flush()
            os.fsync(out.fileno())
        os.replace(self._tmp, self.path)
        self._data_path.unlink()


def shard_info(path: Path) -> tuple[dict, list[str]]:
    """A shard's metadata and tensor names, from its header only."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = (f.metadata() or {}).get(METADATA_KEY)
        keys = list(f.keys())
    if meta is None:
        raise ValueError(f"{path} is not a ps3-extract shard (no {METADATA_KEY!r} metadata)")
    return json.loads(meta), keys


def finished_shards(out: Path, parts: Iterable[int], kind: str) -> tuple[set[int], set[str]]:
    """Complete parts among ``parts``, and the names of every complete shard of those parts.

    A folder/list part has one shard; a tar part is complete once its last chunk's shard
    (marked in the header) exists.
    """
    wanted = set(parts)
    by_part: dict[int, list[str]] = {}
    folder = out / SHARDS
    for name in os.listdir(folder) if folder.is_dir() else []:
        parsed = parse_shard_name(name)
        if parsed is not None and parsed[0] in wanted:
            by_part.setdefault(parsed[0], []).append(name)
    done = set()
    for part, names in by_part.items():
        if kind != "webdataset" or shard_info(folder / max(names))[0].get("last"):
            done.add(part)
    return done, {n for names in by_part.values() for n in names}


@dataclass
class IndexTotals:
    images: int
    failures: int
    shards: int
    duplicate_ids: int


def build_index(out: Path, num_parts: int) -> IndexTotals:
    """Check that every part is complete, then write ``index.jsonl`` and ``errors.jsonl``
    (streamed: one shard header in memory at a time).

    Raises ``RuntimeError`` naming the incomplete parts (an interrupted run, or ranks on
    nodes that do not share the output folder).
    """
    folder = out / SHARDS
    chunks: dict[int, list[int]] = {}
    for name in os.listdir(folder) if folder.is_dir() else []:
        parsed = parse_shard_name(name)
        if parsed is not None:
            chunks.setdefault(parsed[0], []).append(parsed[1])
    missing = []
    for part in range(num_parts):
        found = sorted(chunks.get(part, []))
        if not found or found != list(range(len(found))) or not shard_info(folder / shard_name(part, found[-1]))[0].get("last"):
            missing.append(part)
    if missing:
        shown = ", ".join(str(p) for p in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise RuntimeError(
            f"{len(missing)} of {num_parts} parts have no complete shards in {folder} (parts {shown}); rerun the same "
            "command to finish them (with several nodes, --out must be a folder every node shares)"
        )
    totals = IndexTotals(0, 0, 0, 0)
    seen: set[str] = set()
    with _replacing(out / INDEX) as index, _replacing(out / ERRORS) as errors:
        for part in range(num_parts):
            for chunk in range(len(chunks[part])):
                name = shard_name(part, chunk)
                meta, keys = shard_info(folder / name)
                per_row: dict[int, dict[str, str]] = {}
                for key in keys:
                    row, _, feature = key.partition("/")
                    per_row.setdefault(int(row), {})[feature] = key
                rel = f"{SHARDS}/{name}"
                for row, image_id in enumerate(meta["images"]):
                    totals.duplicate_ids += image_id in seen
                    seen.add(image_id)
                    index.write(json.dumps({"id": image_id, "shard": rel, "keys": per_row.get(row, {})}) + "\n")
                for image_id, reason in meta["failures"]:
                    errors.write(json.dumps({"id": image_id, "shard": rel, "error": reason}) + "\n")
                totals.images += len(meta["images"])
                totals.failures += len(meta["failures"])
                totals.shards += 1
    return totals


def remove_stale_temporaries(out: Path) -> None:
    """Temporary files left by killed runs (call only when no rank is writing)."""
    folder = out / SHARDS
    for name in os.listdir(folder) if folder.is_dir() else []:
        if name.startswith(".") and name.endswith(".tmp"):
            (folder / name).unlink(missing_ok=True)


def read_features(out: str | os.PathLike, features: Iterable[str] | None = None) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Iterate ``(image_id, {feature: tensor})`` over a finished ``ps3-extract`` output, in index order.

    ``features`` limits which features are read (e.g. ``["pooled"]``); each shard is opened
    once and tensors are read one image at a time, so memory stays small.
    """
    from safetensors import safe_open

    out = Path(out)
    index = out / INDEX
    if not index.is_file():
        raise OSError(f"{out} has no {INDEX}: not a finished ps3-extract output (rerun the same command to finish it)")
    wanted = None if features is None else set(features)
    with open(index, encoding="utf-8") as lines:
        for shard, entries in groupby(map(json.loads, lines), key=lambda entry: entry["shard"]):
            with safe_open(str(out / shard), framework="pt") as f:
                for entry in entries:
                    keys = entry["keys"]
                    yield entry["id"], {name: f.get_tensor(key) for name, key in keys.items() if wanted is None or name in wanted}
