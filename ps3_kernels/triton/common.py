"""Helpers shared by the Triton kernels: dot precision and dtype casts."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 gets exact fp32 dots (torch's default matmul precision), not tf32; under the CPU
    interpreter bf16 is multiplied as fp32 copies (it has no bf16 matmul). fp16/bf16 ignore it."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and triton_interpreted() else "tf32"


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr):
    """``acc + a @ b`` in fp32. PREC "upcast" multiplies fp32 copies: the CPU interpreter cannot multiply bf16."""
    if PREC == "upcast":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        out = tl.dot(a, b, acc, input_precision=PREC)
    return out


@triton.jit
def to_dtype_rtne(x, DTYPE: tl.constexpr):
    """Cast fp32 ``x`` to ``DTYPE`` rounding to nearest even, as torch's ``.to()`` does.

    bf16 is rounded through the bits: the CPU interpreter's own fp32 -> bf16 cast truncates,
    and this way compiled and interpreted runs execute the same arithmetic.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))  # NaN payloads must not round to 0
    return x.to(DTYPE)
