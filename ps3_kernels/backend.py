"""Backend switch shared by every op: ``torch`` (reference), ``triton`` or ``auto``.

``auto`` runs Triton on CUDA tensors and the PyTorch reference otherwise; an explicit
``triton`` also runs on CPU tensors, which only works under ``TRITON_INTERPRET=1`` (how CI
tests the kernels). Set it with the environment variable ``PS3_KERNELS_BACKEND``,
:func:`set_backend`, or the :func:`use_backend` context manager.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch

BACKENDS = ("torch", "triton", "auto")

_backend: str | None = None


def _check(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The configured backend name (not yet resolved against tensors)."""
    if _backend is not None:
        return _backend
    return _check(os.environ.get("PS3_KERNELS_BACKEND", "auto"))


def set_backend(name: str | None) -> None:
    """Set the backend for this process; ``None`` falls back to ``PS3_KERNELS_BACKEND``."""
    global _backend
    _backend = None if name is None else _check(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run a block with another backend, restoring the previous setting after it."""
    global _backend
    previous = _backend
    _backend = _check(name)
    try:
        yield
    finally:
        _backend = previous


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_backend(*tensors: torch.Tensor | None, supported: bool = True) -> str:
    """Pick ``"torch"`` or ``"triton"`` for an op whose inputs are ``tensors``.

    ``supported=False`` says the Triton kernel cannot take these inputs (a dtype or shape it
    has no path for): ``auto`` then runs the reference, and an explicit ``triton`` still goes
    to the kernel, whose checks raise a clear error.
    """
    name = get_backend()
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if on_cuda and supported and triton_available() else "torch"
    if not triton_available():
        raise RuntimeError("backend 'triton' was requested but triton is not installed")
    if not on_cuda and not triton_interpreted():
        raise RuntimeError(
            "backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing triton)"
        )
    return "triton"


def triton_dtypes(*tensors: torch.Tensor | None) -> bool:
    """Whether every given floating tensor has a dtype the Triton kernels handle."""
    return all(t is None or not t.is_floating_point() or t.dtype in TRITON_DTYPES for t in tensors)
