"""Record the Triton launches a piece of host code makes, keyed the way Triton specialises them.

Triton compiles one binary per *specialisation* of a kernel: its constexpr values, the dtype of
every pointer, for each tensor whether its address is a multiple of 16 bytes, for each integer
whether it equals 1 (then it becomes a constant) or is a multiple of 16, and the launch options
(``num_warps``, ``num_stages``). Arguments named in ``do_not_specialize`` keep only their type;
those in ``do_not_specialize_on_alignment`` lose the multiple-of-16 part.
:func:`spec_key` writes that as a readable string without touching Triton's internals, so the
same key comes out of any Triton version and of the CPU interpreter; a GPU window pays one
compile per distinct key (plus, on Triton 3.x, one C launcher build per new signature).

:func:`recorded_launches` replaces ``JITFunction.run`` (and the interpreter's) by a recorder for
the duration of a block: every launch becomes a :class:`Launch` (kernel, arguments, grid, key)
instead of running, or is handed to ``on_launch`` (the precompile workers compile some of them).
Outputs of recorded kernels stay uninitialised; the few whose values later index other work
(the look assignment) or feed a checked loss (the selection probabilities) are filled by
:data:`VALUE_KERNELS` with PyTorch, so host code that uses them (the encoder's look layout, the
pre-training step's losses) runs on.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
          torch.bool: "i1"}


@dataclass
class Launch:
    fn: Any  # a JITFunction or an InterpretedFunction
    args: tuple
    kwargs: dict
    grid: Any
    key: str

    @property
    def kernel(self) -> str:
        return self.fn.__name__

    @property
    def spec_id(self) -> str:
        return spec_id(self.key)


def spec_id(key: str) -> str:
    """Short stable id of a specialisation key (for tables and file names)."""
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _params(fn: Any) -> list[tuple[str, bool, bool, bool]]:
    """(name, is_constexpr, specialised on its value, specialised on 16-byte alignment / divisibility by
    16) of each kernel parameter, for both kinds of kernel object."""
    if hasattr(fn, "params"):  # JITFunction
        return [(p.name, p.is_constexpr, not p.do_not_specialize,
                 not p.do_not_specialize and not p.do_not_specialize_on_alignment) for p in fn.params]
    kwargs = getattr(fn, "kwargs", {}) or {}
    dns, dnsa = (set(kwargs.get(k) or ()) for k in ("do_not_specialize", "do_not_specialize_on_alignment"))
    out = []
    for i, p in enumerate(inspect.signature(fn.fn).parameters.values()):
        value = i not in dns and p.name not in dns
        out.append((p.name, "constexpr" in str(p.annotation), value, value and i not in dnsa and p.name not in dnsa))
    return out


def _arg_tag(value: Any, specialised: bool, aligned: bool) -> str:
    if isinstance(value, torch.Tensor):
        tag = "*" + _TYPES.get(value.dtype, str(value.dtype).replace("torch.", ""))
        return tag + (":16" if aligned and value.data_ptr() % 16 == 0 else "")
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        kind = "i32" if -2**31 <= value < 2**31 else "i64" if -2**63 <= value < 2**63 else "u64"
        if not specialised:
            return kind
        if value == 1:
            return "=1"
        return kind + (":16" if aligned and value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return "=None"
    return type(value).__name__


def _constexpr(value: Any) -> str:
    value = getattr(value, "value", value)  # tl.constexpr wrappers
    return str(value) if not isinstance(value, str) else repr(value)


def spec_key(fn: Any, args: tuple, kwargs: dict) -> str:
    """``kernel(runtime args; constexprs; options)`` as Triton would specialise this launch."""
    params = _params(fn)
    bound = dict(zip((p[0] for p in params), args))
    bound.update({k: v for k, v in kwargs.items() if k in {p[0] for p in params}})
    runtime, constexprs = [], []
    for name, is_constexpr, specialised, aligned in params:
        if name not in bound:
            continue  # a default
        if is_constexpr:
            constexprs.append(f"{name}={_constexpr(bound[name])}")
        else:
            runtime.append(f"{name}:{_arg_tag(bound[name], specialised, aligned)}")
    options = sorted((k, v) for k, v in kwargs.items() if k not in bound)
    return (f"{fn.__name__}({' '.join(runtime)}; {' '.join(constexprs)}; "
            f"{' '.join(f'{k}={v}' for k, v in options)})")


def signature_key(key: str) -> str:
    """The part of a key that decides Triton's C launcher (argument types and constants):
    specialisations that differ only in constexpr values or options share one launcher build."""
    runtime = key.split("(", 1)[1].split(";", 1)[0]
    return " ".join(part.split(":16")[0] for part in runtime.split())


# ----------------------------------------------------------------------------- value kernels


def _fill_assign(out: torch.Tensor, order: torch.Tensor, quotas: torch.Tensor, n: int, *rest: Any) -> None:
    """``_assign_kernel``: the look of each patch from its rank (see ps3_kernels/triton/selection.py)."""
    num_looks = quotas.shape[1]
    bounds = quotas.cumsum(1)
    look = (torch.arange(n, device=out.device)[None, :, None] >= bounds[:, None, :]).sum(-1)
    out.scatter_(1, order, torch.where(look < num_looks, look, -1))


def _fill_probs(out: torch.Tensor, logit: torch.Tensor, argmax: torch.Tensor, *rest: Any) -> None:
    """``_probs_kernel``: valid stand-in values (probability 0.5, logit 0, each bin's first cell), so
    a loss on the probabilities (the pre-training step's cross-entropy) and the backward run on."""
    out.fill_(0.5)
    logit.zero_()
    argmax.zero_()  # the logit itself when there is no high-res map


# Kernels whose outputs index or feed checked work: recorded like the others, their outputs then
# computed (or given valid values) here.
VALUE_KERNELS: dict[str, Callable[..., None]] = {"_assign_kernel": _fill_assign, "_probs_kernel": _fill_probs}


# ----------------------------------------------------------------------------- recording


def _kernel_classes() -> list[type]:
    from triton.runtime.jit import JITFunction

    classes = [JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        classes.append(InterpretedFunction)
    except ImportError:
        pass
    return classes


@contextlib.contextmanager
def recorded_launches(on_launch: Callable[[Launch, Callable[..., Any]], None] | None = None,
                      fake_cuda: bool = False) -> Iterator[list[Launch]]:
    """Record every Triton launch inside the block instead of running it.

    ``on_launch(launch, real_run)``, if given, is called for each launch with the kernel class's
    real ``run`` (``real_run(fn, *args, grid=..., warmup=True, **kwargs)`` compiles without
    launching). ``fake_cuda``: CPU tensors report ``is_cuda`` so the ops take their GPU paths
    (the offline compile report); on a GPU host, record with CUDA tensors instead.
    """
    launches: list[Launch] = []
    originals = {cls: cls.run for cls in _kernel_classes()}

    def recorder(real_run):
        def run(self, *args, grid, warmup, **kwargs):
            if warmup:
                return real_run(self, *args, grid=grid, warmup=warmup, **kwargs)
            launch = Launch(self, args, kwargs, grid, spec_key(self, args, kwargs))
            launches.append(launch)
            if on_launch is not None:
                on_launch(launch, real_run)
            fill = VALUE_KERNELS.get(self.__name__)
            if fill is not None:
                fill(*args)
            return None
        return run

    for cls, real in originals.items():
        cls.run = recorder(real)
    if fake_cuda:
        torch.Tensor.is_cuda = property(lambda self: True)  # shadows TensorBase.is_cuda for Python callers
    try:
        yield launches
    finally:
        for cls, real in originals.items():
            cls.run = real
        if fake_cuda:
            del torch.Tensor.is_cuda

