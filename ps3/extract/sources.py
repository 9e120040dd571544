"""Where ``ps3-extract`` gets its images: a folder, a list file or webdataset tars, cut into parts.

A *part* is the unit of work a rank owns: ``shard_size`` consecutive images of a folder or
list (one shard), or one tar file (one shard per ``shard_size`` samples, in tar order). Parts
depend only on the input and ``shard_size``, never on the number of ranks, so every rank
derives the same split and a rerun, with any number of ranks, finds the same shards.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "jp2")
_TAR = re.compile(r"\.(tar|tgz|tar\.gz)$")


@dataclass(frozen=True)
class Sample:
    """One input image before decoding: its id and its file path or encoded bytes."""

    image_id: str
    data: str | bytes


@dataclass(frozen=True)
class Failure:
    """An input that yielded no image (unreadable file, sample without an image, broken tar)."""

    image_id: str
    reason: str


@dataclass(frozen=True)
class ImageInput:
    """The images to encode, in a fixed order. ``files`` holds ``(image id, path)`` pairs for a
    folder or list; ``urls`` the tar files (local paths or anything webdataset opens)."""

    kind: str  # "folder", "list" or "webdataset"
    location: str
    files: tuple[tuple[str, str], ...] = ()
    urls: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """Hash of the ordered ids and paths (or tar urls): a resumed run must see the same input."""
        digest = hashlib.sha256()
        for entry in self.files or self.urls:
            digest.update(repr(entry).encode())
        return digest.hexdigest()

    def num_parts(self, shard_size: int) -> int:
        return len(self.urls) if self.kind == "webdataset" else -(-len(self.files) // shard_size)

    def part_size(self, part: int, shard_size: int) -> int | None:
        """Number of inputs in ``part`` (unknown for a tar until it is read)."""
        if self.kind == "webdataset":
            return None
        return len(self.files[part * shard_size : (part + 1) * shard_size])

    def samples(self, part: int, shard_size: int, failures: list[Failure]) -> Iterator[Sample]:
        """The samples of ``part`` in order; a tar's stream errors are appended to ``failures``."""
        if self.kind != "webdataset":
            for image_id, path in self.files[part * shard_size : (part + 1) * shard_size]:
                yield Sample(image_id, path)
            return
        yield from _tar_samples(self.urls[part], failures)


def open_input(specs: list[str]) -> ImageInput:
    """``INPUT`` as given on the command line: one folder (searched recursively), one text file
    listing image paths (one a line, relative to the file's folder; the line is the image id),
    or webdataset tar files (brace patterns like ``shards/{0000..0099}.tar`` expand)."""
    if not specs:
        raise ValueError("INPUT: give a folder of images, a text file listing image paths, or webdataset .tar files")
    urls = _expand_braces(specs)
    if all(_TAR.search(u) for u in urls):
        try:
            import webdataset  # noqa: F401  (fail here, not in a DataLoader worker)
        except ImportError as err:
            raise ValueError(f"INPUT: webdataset tars need the webdataset extra: pip install 'ps3-kernels[webdataset]' ({err})") from err
        return ImageInput("webdataset", " ".join(specs), urls=tuple(urls))
    if len(specs) != 1:
        raise ValueError(f"INPUT: several inputs are only accepted as webdataset .tar files, got {specs}")
    path = Path(specs[0])
    if path.is_dir():
        return ImageInput("folder", str(path.resolve()), files=tuple(_folder_files(path)))
    if path.is_file():
        return ImageInput("list", str(path.resolve()), files=tuple(_listed_files(path)))
    raise OSError(f"INPUT {specs[0]!r} is neither a folder, a list file nor a .tar file")


def _expand_braces(specs: list[str]) -> list[str]:
    if not any("{" in s for s in specs):
        return list(specs)
    try:
        from braceexpand import braceexpand  # installed with webdataset
    except ImportError as err:
        raise ValueError("INPUT: brace patterns need the webdataset extra: pip install 'ps3-kernels[webdataset]'") from err
    return [u for s in specs for u in braceexpand(s)]


def _folder_files(root: Path) -> list[tuple[str, str]]:
    """Image files under ``root`` (hidden entries skipped), sorted by their relative path, which is the id."""
    found = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith(".") and name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                path = Path(folder) / name
                found.append((path.relative_to(root).as_posix(), str(path)))
    if not found:
        raise OSError(f"INPUT folder {str(root)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)


def _listed_files(list_file: Path) -> list[tuple[str, str]]:
    base = list_file.resolve().parent
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise OSError(f"INPUT {str(list_file)!r} is not a text file listing image paths (nor a folder or .tar)") from err
    files, seen = [], set()
    for line in (ln.strip() for ln in lines):
        if not line:
            continue
        if line in seen:
            raise ValueError(f"INPUT list {str(list_file)!r} names {line!r} twice; every image id must be unique")
        seen.add(line)
        files.append((line, str(base / line)))
    if not files:
        raise OSError(f"INPUT list {str(list_file)!r} names no image")
    return files


def _tar_samples(url: str, failures: list[Failure]) -> Iterator[Sample]:
    import webdataset as wds  # presence checked by open_input

    def record(exn: Exception) -> bool:
        failures.append(Failure(url, f"unreadable tar stream: {type(exn).__name__}: {exn}"))
        return True

    for sample in wds.tarfile_samples([{"url": url}], handler=record):
        key = sample["__key__"]
        fields = [k for k in sample if not k.startswith("__")]
        image = next((k for ext in IMAGE_EXTENSIONS for k in fields if k.lower().rsplit(".", 1)[-1] == ext), None)
        if image is None:
            failures.append(Failure(key, f"no image in sample (fields: {', '.join(sorted(fields)) or 'none'})"))
            continue
        yield Sample(key, sample[image])


def open_image(data: str | bytes):
    """A fully decoded PIL image (``load`` here, so truncated files fail here, not later)."""
    from PIL import Image

    image = Image.open(data if isinstance(data, str) else io.BytesIO(data))
    image.load()
    return image


class Chunker:
    """Cuts a stream into consecutive chunks lazily, knowing at each chunk's end whether it was the last."""

    def __init__(self, items: Iterable):
        self._items = iter(items)
        self._peeked: list = []

    def take(self, n: int) -> Iterator:
        """The next up to ``n`` items (consume the iterator before calling :meth:`exhausted`)."""
        yield from self._peeked[:n]
        taken = len(self._peeked[:n])
        self._peeked = self._peeked[n:]
        yield from islice(self._items, n - taken)

    def exhausted(self) -> bool:
        if not self._peeked:
            self._peeked = list(islice(self._items, 1))
        return not self._peeked


@dataclass
class Pending:
    """A decoded image waiting for a batch."""

    image_id: str
    pixels: torch.Tensor  # uint8 (3, H, W), at the size the model gets
    tokens: int

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.pixels.shape)


def token_batches(images: Iterable[Pending], budget: int) -> Iterator[list[Pending]]:
    """Batches of at most ``budget`` encoder tokens (an image over budget goes alone).

    Images wait in a pool of about two budgets; each batch is filled from the image size with
    the most pending tokens first, then from the others, so batches hold few distinct sizes
    while images of any size still share a forward. The result depends only on the images'
    order, sizes and token counts, not on timing or on how the input was split over ranks.
    """
    pool: list[Pending] = []
    pending = 0
    for image in images:
        pool.append(image)
        pending += image.tokens
        while pending >= 2 * budget:
            batch = _take_batch(pool, budget)
            pending -= sum(im.tokens for im in batch)
            yield batch
    while pool:
        yield _take_batch(pool, budget)


def _take_batch(pool: list[Pending], budget: int) -> list[Pending]:
    from ..geometry import group_by

    groups = sorted(group_by([im.shape for im in pool]).values(), key=lambda idx: -sum(pool[i].tokens for i in idx))
    taken, total = [], 0
    for idx in groups:
        for i in idx:
            if not taken or total + pool[i].tokens <= budget:
                taken.append(i)
                total += pool[i].tokens
    chosen = set(taken)
    batch = [pool[i] for i in taken]
    pool[:] = [im for i, im in enumerate(pool) if i not in chosen]
    return batch

