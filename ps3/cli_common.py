"""What ``ps3-encode``, ``ps3-extract`` and ``ps3-bench`` share: user errors as one line on stderr with exit
code 2 (no usage block, no traceback), and output paths checked before any work is done."""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

import torch


class UsageError(Exception):
    """A mistake in what the user asked for; the CLIs print it as one line and exit 2."""


def fail(prog: str, message: object) -> NoReturn:
    """Print ``prog: error: message`` on one line and exit with status 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (argparse prints the usage block too)."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)


def look_count(value: str) -> int | str:
    """argparse type of ``--num-look-close`` / ``--num-token-look-close``: an int >= 0 or "all"."""
    if value == "all":
        return value
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise argparse.ArgumentTypeError(f"expected an int >= 0 or 'all', got {value!r}")
    return count


def parse_device(name: str) -> torch.device:
    """``--device``: a torch device name, and a CUDA one only where there is a GPU."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA GPU is available (use --device cpu)")
    return device


def _writable_folder(folder: Path, flag: str, target: Path) -> None:
    """``folder`` (or its nearest existing parent, where it would be created) takes new files."""
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {target}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UsageError(f"{flag} {target}: cannot write in {existing} ({err.strerror or err})") from None


def check_output_file(path: str | Path, flag: str) -> Path:
    """Fail now if the file ``path`` could not be written later (missing folders are fine:
    they are created when the file is written)."""
    path = Path(path).expanduser().absolute()
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name")
    _writable_folder(path.parent, flag, path)
    if path.exists():
        try:
            with open(path, "r+b"):
                pass
        except OSError as err:
            raise UsageError(f"{flag} {path} cannot be overwritten ({err.strerror or err})") from None
    return path


def check_output_folder(path: str | Path, flag: str) -> Path:
    """Fail now if files could not be written into the folder ``path`` later."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder")
    _writable_folder(path, flag, path)
    return path


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars or loading reports on stderr (they would bury the
    one-line errors); the previous settings come back afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
