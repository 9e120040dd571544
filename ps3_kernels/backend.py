"""Backend switch, dispatch rules and checked mode shared by every op.

``torch`` runs the PyTorch reference, ``triton`` the Triton kernels, ``auto`` (the default)
Triton on CUDA tensors whenever the op's Triton path can take the inputs -- including every
gradient they need -- and the reference otherwise. Each op describes its Triton path with a
:class:`TritonSupport` and lists, for given inputs, the reasons it cannot run them (in the
spirit of xformers' ``not_supported_reasons``): ``auto`` falls back with a one-time warning
naming them, an explicit ``triton`` raises :class:`TritonNotSupportedError` with them. An
explicit ``triton`` also runs on CPU tensors, which only works under ``TRITON_INTERPRET=1``
(how CI tests the kernels). Set the backend with ``PS3_KERNELS_BACKEND``, :func:`set_backend`
or :func:`use_backend`.

Checked mode (``checked=True`` on an op, or ``PS3_KERNELS_CHECKED=1``) also validates index
metadata that lives on the GPU, at the cost of a device sync. Metadata on the CPU is always
validated, since reading it costs no sync. Unchecked bad metadata never makes a kernel touch
memory outside its tensors (the kernels clamp every index), but the result is then undefined.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

BACKENDS = ("torch", "triton", "auto")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_backend: str | None = None


def _check(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def get_backend() -> str:
    """The configured backend name (not yet resolved against tensors)."""
    if _backend is not None:
        return _backend
    value = os.environ.get("PS3_KERNELS_BACKEND")
    if value is None:
        return "auto"
    if value.lower() not in BACKENDS:
        raise ValueError(f"PS3_KERNELS_BACKEND={value!r} is not a backend: set it to one of {BACKENDS} or unset it")
    return value.lower()


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


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    return _TRITON_INSTALLED


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------- what a Triton path supports


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class TritonNotSupportedError(NotImplementedError):
    """The Triton backend was asked for explicitly but cannot run these inputs; the message lists why."""


@dataclass(frozen=True)
class TritonSupport:
    """What one op's Triton path takes: the contract :func:`dispatch` enforces.

    ``differentiable`` names the inputs the Triton path gives gradients to (``auto`` runs the
    reference when another input needs one); ``limits`` are the remaining conditions in words;
    ``backward`` says how the gradients are computed.
    """

    op: str
    dtypes: tuple[torch.dtype, ...]
    differentiable: tuple[str, ...]
    limits: tuple[str, ...] = ()
    backward: str = ""
    devices: str = "CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"

    def __str__(self) -> str:
        dtypes = ", ".join(map(_dtype_name, self.dtypes))
        lines = [f"{self.op}: {self.devices}; dtypes {dtypes}",
                 f"  gradients: {', '.join(self.differentiable) or 'none (integer output)'}"
                 + (f"; backward: {self.backward}" if self.backward else "")]
        lines += [f"  {limit}" for limit in self.limits]
        return "\n".join(lines)


_SUPPORT: dict[str, tuple[TritonSupport, Callable[..., list[str]]]] = {}


def register_support(support: TritonSupport, reasons: Callable[..., list[str]]) -> None:
    """Register an op's Triton contract and its ``reasons(*op_args)`` function."""
    _SUPPORT[support.op] = (support, reasons)


def triton_support() -> dict[str, TritonSupport]:
    """What every op's Triton path supports, by op name (``print`` one for a summary)."""
    return {name: support for name, (support, _) in _SUPPORT.items()}


def not_supported_reasons(op: str, *args, **kwargs) -> list[str]:
    """Why op ``op``'s Triton path cannot run these arguments (the op's own); empty when it can."""
    if op not in _SUPPORT:
        raise ValueError(f"op must be one of {sorted(_SUPPORT)}, got {op!r}")
    return _SUPPORT[op][1](*args, **kwargs)


def dtype_reasons(support: TritonSupport, tensors: dict[str, torch.Tensor | None]) -> list[str]:
    """One reason per floating tensor whose dtype the Triton path does not take."""
    names = ", ".join(map(_dtype_name, support.dtypes))
    return [f"{name} is {_dtype_name(t.dtype)} (the Triton path takes {names})"
            for name, t in tensors.items()
            if t is not None and t.is_floating_point() and t.dtype not in support.dtypes]


def grad_reasons(support: TritonSupport, tensors: dict[str, torch.Tensor | None]) -> list[str]:
    """One reason per input that needs a gradient the Triton path does not compute."""
    if not torch.is_grad_enabled():
        return []
    return [f"{name} requires grad and the Triton path computes no gradient for it"
            for name, t in tensors.items()
            if t is not None and t.requires_grad and name not in support.differentiable]


def _on_gpu(tensors: list[torch.Tensor | None]) -> bool:
    """Whether ``auto`` considers Triton at all: only for CUDA tensors (the interpreter is for tests)."""
    return any(t is not None and t.is_cuda for t in tensors)


def device_reasons(tensors: Iterable[torch.Tensor | None]) -> list[str]:
    if not triton_available():
        return ["triton is not installed"]
    tensors = [t for t in tensors if t is not None]
    if not _on_gpu(tensors) and not triton_interpreted():
        devices = "/".join(sorted({t.device.type for t in tensors})) or "no device"
        return [f"the tensors are on {devices}; the kernels need CUDA tensors "
                "(or TRITON_INTERPRET=1, set before importing triton, for CPU tensors)"]
    return []


_warned: set[tuple[str, tuple[str, ...]]] = set()


def dispatch(support: TritonSupport, reasons: list[str], tensors: Iterable[torch.Tensor | None],
             backend: str | None = None) -> str:
    """``"triton"`` or ``"torch"`` for one call, given the op's reasons against these inputs.

    ``backend`` overrides the switch for this call (an op's ``impl="triton"``).
    """
    name = get_backend() if backend is None else _check(backend)
    if name == "torch":
        return "torch"
    tensors = list(tensors)
    reasons = device_reasons(tensors) + list(reasons)
    if name == "triton":
        if reasons:
            raise TritonNotSupportedError(
                f"{support.op}: backend 'triton' cannot run these inputs: " + "; ".join(reasons))
        return "triton"
    if not _on_gpu(tensors):
        return "torch"
    if reasons:
        key = (support.op, tuple(reasons))
        if key not in _warned and not torch.compiler.is_compiling():
            _warned.add(key)
            warnings.warn(f"{support.op} runs the PyTorch reference: " + "; ".join(reasons), stacklevel=3)
        return "torch"
    return "triton"


def resolve_backend(*tensors: torch.Tensor | None, supported: bool = True) -> str:
    """``"torch"`` or ``"triton"`` for an op outside this package whose inputs are ``tensors``.

    ``supported=False`` says the Triton kernel cannot take these inputs: ``auto`` then runs the
    reference and an explicit ``triton`` raises.
    """
    support = TritonSupport("this op", TRITON_DTYPES, ())
    return dispatch(support, [] if supported else ["the kernel has no path for these inputs"], tensors)


def promoted_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The promotion of the tensors' dtypes (``None`` skipped): what an op computes or returns in."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


# ----------------------------------------------------------------------------- checked mode


def checked_mode(checked: bool | None) -> bool:
    """``checked`` if given, else ``PS3_KERNELS_CHECKED`` (``1``/``true``/``yes``/``on``)."""
    if checked is None:
        return os.environ.get("PS3_KERNELS_CHECKED", "0").strip().lower() in ("1", "true", "yes", "on")
    if not isinstance(checked, bool):
        raise TypeError(f"checked must be a bool or None, got {type(checked).__name__}")
    return checked


def host_readable(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read without a device sync (a CPU tensor, outside tracing)."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def host_values(t: torch.Tensor | None, checked: bool) -> torch.Tensor | None:
    """``t`` as a CPU int64 tensor when validating it is free (CPU) or allowed (checked mode), else None."""
    if t is None or torch.compiler.is_compiling():
        return None
    if host_readable(t) or checked:
        return t.detach().to("cpu", torch.int64)
    return None
