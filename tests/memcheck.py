"""A memory checker for Triton kernels run by the CPU interpreter (compute-sanitizer's memcheck, in small).

Inside :func:`memcheck`, every load and store a kernel issues must fall inside one of the tensors
passed to that launch (each tensor's own span, not its whole storage). Accesses outside are not
performed (so a bad kernel cannot crash the test process) and are reported when the block exits.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


def _span(t: torch.Tensor) -> tuple[int, int]:
    if t.numel() == 0:
        return (0, 0)
    extent = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return (t.data_ptr(), t.data_ptr() + extent * t.element_size())


@contextlib.contextmanager
def memcheck():
    from triton.runtime import interpreter

    state: dict = {"kernel": None, "spans": []}
    violations: list[str] = []
    executor_call = interpreter.GridExecutor.__call__
    builder = interpreter.interpreter_builder
    masked_load, masked_store = builder.create_masked_load, builder.create_masked_store

    def call(self, *args, **kwargs):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        saved = dict(state)
        state.update(kernel=self.fn.__name__, spans=[_span(t) for t in tensors])
        try:
            return executor_call(self, *args, **kwargs)
        finally:
            state.update(saved)

    def inside(ptrs, mask, itemsize: int, what: str):
        """The mask with out-of-bounds lanes switched off (each recorded)."""
        addr = ptrs.data.astype(np.uint64)
        lanes = np.broadcast_to(mask.data.astype(bool), addr.shape)
        ok = np.zeros(addr.shape, dtype=bool)
        for lo, hi in state["spans"]:
            ok |= (addr >= np.uint64(lo)) & (addr + np.uint64(itemsize) <= np.uint64(hi))
        bad = lanes & ~ok
        if bad.any():
            violations.append(f"{state['kernel']}: {int(bad.sum())} out-of-bounds {what}(s), e.g. address "
                              f"{int(addr[bad].flat[0]):#x}")
        return type(mask)(np.ascontiguousarray(lanes & ok), mask.dtype)

    def load(ptrs, mask, other, cache_policy, is_volatile):
        itemsize = np.dtype(interpreter._get_np_dtype(ptrs.get_element_ty())).itemsize
        return masked_load(ptrs, inside(ptrs, mask, itemsize, "load"), other, cache_policy, is_volatile)

    def store(ptrs, value, mask, cache_policy):
        return masked_store(ptrs, value, inside(ptrs, mask, value.data.dtype.itemsize, "store"), cache_policy)

    interpreter.GridExecutor.__call__ = call
    builder.create_masked_load, builder.create_masked_store = load, store
    try:
        yield violations
    finally:
        interpreter.GridExecutor.__call__ = executor_call
        builder.create_masked_load, builder.create_masked_store = masked_load, masked_store
    assert not violations, "\n".join(violations)
