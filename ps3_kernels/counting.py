"""Count what a piece of code launches: ATen ops that run a kernel, this package's custom ops, and
Triton kernel launches (how the tests check that a forward's launch count does not grow with the
number of images or looks, and how the launch counts in the README were measured).

Counts depend on shapes and layout, not on values or widths, so they can be taken on the CPU with
a narrow model; ``dry=`` names Triton kernels to record without running them (their outputs are
then left uninitialised: only kernels whose outputs never index anything), which makes large
geometries cheap to count under the interpreter.
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from torch.utils._python_dispatch import TorchDispatchMode

# ATen ops that allocate or alias but launch no kernel.
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "lift_fresh",
              "set_", "alias", "resize_", "promote_types", "_unsafe_view"}


@dataclass
class LaunchCounts:
    aten: collections.Counter = field(default_factory=collections.Counter)  # kernel-launching ATen ops
    views: collections.Counter = field(default_factory=collections.Counter)  # views and allocations
    custom: collections.Counter = field(default_factory=collections.Counter)  # ps3_kernels:: ops
    triton: collections.Counter = field(default_factory=collections.Counter)  # Triton launches, by kernel

    @property
    def launches(self) -> int:
        """GPU kernel launches: ATen kernels (those inside custom ops included) plus Triton launches."""
        return sum(self.aten.values()) + sum(self.triton.values())

    def summary(self) -> dict[str, int]:
        return dict(launches=self.launches, aten=sum(self.aten.values()), triton=sum(self.triton.values()),
                    custom_ops=sum(self.custom.values()), views=sum(self.views.values()))


class _Counter(TorchDispatchMode):
    def __init__(self, counts: LaunchCounts):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        namespace, name = func.namespace, func._schema.name.split("::")[-1]
        if namespace == "ps3_kernels":
            self.counts.custom[name] += 1
            from torch._library.custom_ops import OPDEFS  # private; a custom op's own function

            opdef = OPDEFS.get(func._schema.name)
            if opdef is not None:
                with self:  # run its body here, so the ATen ops inside count too
                    return opdef._init_fn(*args, **kwargs)
            return func(*args, **kwargs)
        if func.is_view or name in _NO_LAUNCH:
            self.counts.views[name] += 1
        else:
            self.counts.aten[name] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_launches(dry: Iterable[str] = ()) -> Iterator[LaunchCounts]:
    """Count launches inside the block; Triton kernels named in ``dry`` are counted but not run."""
    dry = set(dry)
    counts = LaunchCounts()
    patched = []
    try:
        import triton.runtime.interpreter as interpreter
        import triton.runtime.jit as jit

        patched = [(cls, cls.run) for cls in (jit.JITFunction, interpreter.InterpretedFunction)]
    except ImportError:
        pass

    def wrap(run):
        def counted(self, *args, grid, warmup, **kwargs):
            if not warmup:
                name = self.fn.__name__
                counts.triton[name] += 1
                if name in dry:
                    return None
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        return counted

    for cls, run in patched:
        cls.run = wrap(run)
    try:
        with _Counter(counts):
            yield counts
    finally:
        for cls, run in patched:
            cls.run = run
