"""Triton flash attention over packed sequences with a per-sequence key/value prefix.

Sequence ``s`` (queries ``q[cu[s]:cu[s+1]]``) attends to ``[prefix_k[prefix_index[s]]; k[cu[s]:cu[s+1]]]``.
The kernels read the two key sources in place (two passes of one inner loop), so neither the
concatenated nor a padded K/V is ever built.

Layout of the work:

* Queries are cut into blocks per sequence; a small device-side table (:func:`_block_schedule`)
  maps a flat program id to ``(sequence, block)``. No host sync, no per-sequence Python loop,
  and no idle programs for short sequences beyond the table's upper bound.
* The head dimension is split into two power-of-two tiles (:func:`_head_tiles`): Triton's
  ``tl.arange``/``tl.dot`` need power-of-two extents of at least 16, and padding PS3's
  head_dim 72 to 128 would waste 44% of every matmul and load. 72 = 64 + 8 runs as a 64-wide
  and a 16-wide tile (80 lanes, 10% waste); 96 = 64 + 32 runs without waste.
* Forward: online softmax in the exp2 domain with fp32 accumulators; saves the per-row
  log-sum-exp (log2 domain) for the backward.
* Backward, deterministic, no atomics: one kernel computes ``delta = rowsum(dO * O)`` and dQ per
  query block; a second computes dK/dV per key block. A prefix key block is shared by every
  sequence whose ``prefix_index`` points at its row, so its program loops over those sequences
  (found through a sorted copy of ``prefix_index``) and sums their contributions in registers.
  These prefix programs are the longest ones, so they get the lowest program ids and are
  scheduled first, overlapping with the many short programs for the sequences' own keys.
"""

from __future__ import annotations

import weakref

import torch
import triton
import triton.language as tl

from ..backend import triton_interpreted
from ..layout import is_shared_table
from .common import dot_precision, mma, to_dtype_rtne

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- tile helpers


@triton.jit
def _tile_base(ptr, row, stride_row8, h, stride_h8):
    """Address of ``ptr[row, h, 0]``.

    All strides reach the kernels in units of 8 elements (the wrapper guarantees multiples of 8).
    Multiplying by the literal 8 here lets Triton prove 16-byte alignment (e.g. PS3's head stride
    72, which the launcher's divisible-by-16 specialisation misses), and only aligned loads are
    vectorised and software-pipelined.
    """
    return ptr + row * (stride_row8 * 8) + h * (stride_h8 * 8)


@triton.jit
def _load_tiles(base, rows, row_stride8, row_mask, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Load rows ``rows`` (``row_stride8 * 8`` elements apart) of ``base[:, :HEAD_DIM]`` as its
    (rows, D0) and (rows, D1) head-dim tiles, with zeros outside ``row_mask`` and ``HEAD_DIM``."""
    offs0 = tl.arange(0, D0)
    ptrs = base + rows[:, None] * (row_stride8 * 8)
    t0 = tl.load(ptrs + offs0[None, :], mask=row_mask[:, None], other=0.0)
    t1 = t0  # placeholder when the head dim is a single power-of-two tile
    if D1 > 0:
        offs1 = D0 + tl.arange(0, D1)
        t1 = tl.load(ptrs + offs1[None, :], mask=row_mask[:, None] & (offs1[None, :] < HEAD_DIM), other=0.0)
    return t0, t1


@triton.jit
def _store_tiles(base, rows, row_stride8, row_mask, x0, x1, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Inverse of :func:`_load_tiles`, casting fp32 tiles to the destination dtype (rounded to
    nearest even, also under the interpreter, whose own bf16 cast truncates)."""
    offs0 = tl.arange(0, D0)
    ptrs = base + rows[:, None] * (row_stride8 * 8)
    tl.store(ptrs + offs0[None, :], to_dtype_rtne(x0.to(tl.float32), base.dtype.element_ty), mask=row_mask[:, None])
    if D1 > 0:
        offs1 = D0 + tl.arange(0, D1)
        mask = row_mask[:, None] & (offs1[None, :] < HEAD_DIM)
        tl.store(ptrs + offs1[None, :], to_dtype_rtne(x1.to(tl.float32), base.dtype.element_ty), mask=mask)


@triton.jit
def _dot_nt(a0, a1, b0, b1, D1: tl.constexpr, PREC: tl.constexpr):
    """``a @ b.T`` contracted over both head-dim tiles, in fp32."""
    out = mma(a0, tl.trans(b0), None, PREC)
    if D1 > 0:
        out = mma(a1, tl.trans(b1), out, PREC)
    return out


@triton.jit
def _dot_acc(p, b0, b1, acc0, acc1, D1: tl.constexpr, PREC: tl.constexpr):
    """``acc += p @ b`` for each head-dim tile of ``b`` (``p`` is rounded to ``b``'s dtype first)."""
    p = p.to(b0.dtype)
    acc0 = mma(p, b0, acc0, PREC)
    if D1 > 0:
        acc1 = mma(p, b1, acc1, PREC)
    return acc0, acc1


@triton.jit
def _seq_span(CuSeqlens, seq, total):
    """First token and length of sequence ``seq``, clamped into ``[0, total)``: bad ``cu_seqlens``
    (not starting at 0, decreasing, past the tokens) gives wrong spans, never out-of-bounds ones."""
    start = tl.minimum(tl.maximum(tl.load(CuSeqlens + seq).to(tl.int64), 0), total)
    end = tl.minimum(tl.maximum(tl.load(CuSeqlens + seq + 1).to(tl.int64), start), total)
    return start, end - start


@triton.jit
def _query_block(BlockSeq, BlockStart, CuSeqlens, pid, total, BLOCK: tl.constexpr):
    """Sequence of flat block ``pid`` (``< 0``: a spare program), its first token and length, the
    block's row indices within the sequence and which of them are in it."""
    seq = tl.load(BlockSeq + pid)
    first = tl.maximum(pid - tl.load(BlockStart + tl.maximum(seq, 0)), 0) * BLOCK  # >= 0 even for a bad schedule
    start, length = _seq_span(CuSeqlens, tl.maximum(seq, 0), total)
    rows = first + tl.arange(0, BLOCK)
    return seq, start, length, rows, rows < length


@triton.jit
def _prefix_row(PrefixIndex, seq, num_prefixes):
    """Prefix row of sequence ``seq``, clamped to the rows that exist."""
    return tl.minimum(tl.maximum(tl.load(PrefixIndex + seq).to(tl.int64), 0), num_prefixes - 1)


# Launch integers that vary with the batch (token counts, prefix rows, strides) are not
# specialised: Triton would otherwise compile a new binary whenever one of them is 1 or changes
# divisibility by 16. Alignment comes from the literal 8 in ``_tile_base``/``_load_tiles``, so
# one binary per dtype, head dim, prefix flag and block shape serves every batch.
_STRIDES = ("stride_qt", "stride_qh", "stride_kt", "stride_kh", "stride_vt", "stride_vh",
            "stride_pkn", "stride_pkh", "stride_pkp", "stride_pvn", "stride_pvh", "stride_pvp")
_SEQ_INTS = ("total", "num_heads", "prefix_len")


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(acc0, acc1, m_i, l_i, q0, q1, k_base, v_base, stride_k, stride_v, n_keys, qk_scale,
               BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr,
               PREC: tl.constexpr):
    """Online-softmax pass over ``n_keys`` keys; run once for the prefix and once for own keys."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, n_keys, BLOCK_N):
        cols = n0 + offs_n
        valid = cols < n_keys
        k0, k1 = _load_tiles(k_base, cols, stride_k, valid, D0, D1, HEAD_DIM)
        s = _dot_nt(q0, q1, k0, k1, D1, PREC) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v0, v1 = _load_tiles(v_base, cols, stride_v, valid, D0, D1, HEAD_DIM)
        acc0, acc1 = _dot_acc(p, v0, v1, acc0 * alpha[:, None], acc1 * alpha[:, None], D1, PREC)
        m_i = m_new
    return acc0, acc1, m_i, l_i


@triton.jit(do_not_specialize=[*_STRIDES, *_SEQ_INTS, "num_prefixes"])
def _fwd_kernel(
    Q, K, V, PK, PV, Out, Lse, CuSeqlens, PrefixIndex, BlockSeq, BlockStart,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_pkn, stride_pkh, stride_pkp, stride_pvn, stride_pvh, stride_pvp,
    total, num_heads, num_prefixes, prefix_len, qk_scale,
    HAS_PREFIX: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """One (query block, head): attend to the sequence's prefix row, then to its own keys."""
    seq, start, length, rows, row_mask = _query_block(BlockSeq, BlockStart, CuSeqlens, tl.program_id(0), total,
                                                      BLOCK_M)
    if seq < 0:
        return
    h = tl.program_id(1)
    tokens = start + rows
    q0, q1 = _load_tiles(_tile_base(Q, start, stride_qt, h, stride_qh), rows, stride_qt, row_mask, D0, D1, HEAD_DIM)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc0 = tl.zeros((BLOCK_M, D0), tl.float32)
    acc1 = tl.zeros((BLOCK_M, D1 if D1 > 0 else 1), tl.float32)
    if HAS_PREFIX:
        p_row = _prefix_row(PrefixIndex, seq, num_prefixes)
        acc0, acc1, m_i, l_i = _fwd_inner(
            acc0, acc1, m_i, l_i, q0, q1,
            _tile_base(PK, p_row, stride_pkn, h, stride_pkh), _tile_base(PV, p_row, stride_pvn, h, stride_pvh),
            stride_pkp, stride_pvp, prefix_len, qk_scale, BLOCK_N, D0, D1, HEAD_DIM, PREC)
    acc0, acc1, m_i, l_i = _fwd_inner(
        acc0, acc1, m_i, l_i, q0, q1,
        _tile_base(K, start, stride_kt, h, stride_kh), _tile_base(V, start, stride_vt, h, stride_vh),
        stride_kt, stride_vt, length, qk_scale, BLOCK_N, D0, D1, HEAD_DIM, PREC)

    # Every valid row saw at least one key, so l_i > 0 there; padded rows are not stored.
    inv_l = 1.0 / tl.where(row_mask, l_i, 1.0)
    out_base = Out + h * HEAD_DIM
    _store_tiles(out_base, tokens, num_heads * (HEAD_DIM // 8), row_mask, acc0 * inv_l[:, None], acc1 * inv_l[:, None],
                 D0, D1, HEAD_DIM)
    tl.store(Lse + h * total + tokens, m_i + tl.log2(l_i), mask=row_mask)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _bwd_dq_inner(dq0, dq1, q0, q1, do0, do1, lse, delta, k_base, v_base, stride_k, stride_v, n_keys, qk_scale,
                  BLOCK_N: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr,
                  PREC: tl.constexpr):
    """dQ contribution of ``n_keys`` keys (prefix or own), recomputing P from the saved LSE."""
    offs_n = tl.arange(0, BLOCK_N)
    for n0 in range(0, n_keys, BLOCK_N):
        cols = n0 + offs_n
        valid = cols < n_keys
        k0, k1 = _load_tiles(k_base, cols, stride_k, valid, D0, D1, HEAD_DIM)
        v0, v1 = _load_tiles(v_base, cols, stride_v, valid, D0, D1, HEAD_DIM)
        p = tl.exp2(_dot_nt(q0, q1, k0, k1, D1, PREC) * qk_scale - lse[:, None])
        p = tl.where(valid[None, :], p, 0.0)
        ds = p * (_dot_nt(do0, do1, v0, v1, D1, PREC) - delta[:, None])
        dq0, dq1 = _dot_acc(ds, k0, k1, dq0, dq1, D1, PREC)
    return dq0, dq1


@triton.jit(do_not_specialize=[*_STRIDES, *_SEQ_INTS, "num_prefixes"])
def _bwd_dq_kernel(
    Q, K, V, PK, PV, Out, dOut, dQ, Lse, Delta, CuSeqlens, PrefixIndex, BlockSeq, BlockStart,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_pkn, stride_pkh, stride_pkp, stride_pvn, stride_pvh, stride_pvp,
    total, num_heads, num_prefixes, prefix_len, qk_scale, sm_scale,
    HAS_PREFIX: tl.constexpr, HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """One (query block, head): ``delta = rowsum(dO * O)`` (stored for the dK/dV kernel) and dQ."""
    seq, start, length, rows, row_mask = _query_block(BlockSeq, BlockStart, CuSeqlens, tl.program_id(0), total,
                                                      BLOCK_M)
    if seq < 0:
        return
    h = tl.program_id(1)
    tokens = start + rows
    packed = h * HEAD_DIM  # Out, dOut and dQ are contiguous (total, num_heads, HEAD_DIM)
    q0, q1 = _load_tiles(_tile_base(Q, start, stride_qt, h, stride_qh), rows, stride_qt, row_mask, D0, D1, HEAD_DIM)
    do0, do1 = _load_tiles(dOut + packed, tokens, num_heads * (HEAD_DIM // 8), row_mask, D0, D1, HEAD_DIM)
    o0, o1 = _load_tiles(Out + packed, tokens, num_heads * (HEAD_DIM // 8), row_mask, D0, D1, HEAD_DIM)
    delta = tl.sum(do0.to(tl.float32) * o0.to(tl.float32), 1)
    if D1 > 0:
        delta += tl.sum(do1.to(tl.float32) * o1.to(tl.float32), 1)
    tl.store(Delta + h * total + tokens, delta, mask=row_mask)
    lse = tl.load(Lse + h * total + tokens, mask=row_mask, other=0.0)

    dq0 = tl.zeros((BLOCK_M, D0), tl.float32)
    dq1 = tl.zeros((BLOCK_M, D1 if D1 > 0 else 1), tl.float32)
    if HAS_PREFIX:
        p_row = _prefix_row(PrefixIndex, seq, num_prefixes)
        dq0, dq1 = _bwd_dq_inner(
            dq0, dq1, q0, q1, do0, do1, lse, delta,
            _tile_base(PK, p_row, stride_pkn, h, stride_pkh), _tile_base(PV, p_row, stride_pvn, h, stride_pvh),
            stride_pkp, stride_pvp, prefix_len, qk_scale, BLOCK_N, D0, D1, HEAD_DIM, PREC)
    dq0, dq1 = _bwd_dq_inner(
        dq0, dq1, q0, q1, do0, do1, lse, delta,
        _tile_base(K, start, stride_kt, h, stride_kh), _tile_base(V, start, stride_vt, h, stride_vh),
        stride_kt, stride_vt, length, qk_scale, BLOCK_N, D0, D1, HEAD_DIM, PREC)
    _store_tiles(dQ + packed, tokens, num_heads * (HEAD_DIM // 8), row_mask, dq0 * sm_scale, dq1 * sm_scale,
                 D0, D1, HEAD_DIM)


@triton.jit
def _bwd_dkdv_inner(dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q, dOut, Lse, Delta, CuSeqlens, seq, h,
                    stride_qt, stride_qh, total, num_heads, qk_scale,
                    BLOCK_M: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, HEAD_DIM: tl.constexpr,
                    PREC: tl.constexpr):
    """dK/dV contribution of every query of sequence ``seq`` to one key block (kept transposed: keys x queries)."""
    start, length = _seq_span(CuSeqlens, seq, total)
    offs_m = tl.arange(0, BLOCK_M)
    q_base = _tile_base(Q, start, stride_qt, h, stride_qh)
    for m0 in range(0, length, BLOCK_M):
        rows = m0 + offs_m
        valid = rows < length
        tokens = start + rows
        q0, q1 = _load_tiles(q_base, rows, stride_qt, valid, D0, D1, HEAD_DIM)
        do0, do1 = _load_tiles(dOut + h * HEAD_DIM, tokens, num_heads * (HEAD_DIM // 8), valid, D0, D1, HEAD_DIM)
        # lse = +inf on padded rows makes their probabilities exactly zero.
        lse = tl.load(Lse + h * total + tokens, mask=valid, other=float("inf"))
        delta = tl.load(Delta + h * total + tokens, mask=valid, other=0.0)
        p_t = tl.exp2(_dot_nt(k0, k1, q0, q1, D1, PREC) * qk_scale - lse[None, :])
        dv0, dv1 = _dot_acc(p_t, do0, do1, dv0, dv1, D1, PREC)
        ds_t = p_t * (_dot_nt(v0, v1, do0, do1, D1, PREC) - delta[None, :])
        dk0, dk1 = _dot_acc(ds_t, q0, q1, dk0, dk1, D1, PREC)
    return dk0, dk1, dv0, dv1


@triton.jit(do_not_specialize=[*_STRIDES, *_SEQ_INTS, "num_prefix_programs", "own_blocks_per_head"])
def _bwd_dkdv_kernel(
    Q, K, V, PK, PV, dOut, dK, dV, dPK, dPV, Lse, Delta, CuSeqlens, BlockSeq, BlockStart, RowStart, SeqByRow,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_pkn, stride_pkh, stride_pkp, stride_pvn, stride_pvh, stride_pvp,
    total, num_heads, prefix_len, num_prefix_programs, own_blocks_per_head, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    """One key block of one head: a prefix block (first ``num_prefix_programs`` ids) or an own-key block."""
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    dk0 = tl.zeros((BLOCK_N, D0), tl.float32)
    dv0 = tl.zeros((BLOCK_N, D0), tl.float32)
    dk1 = tl.zeros((BLOCK_N, D1 if D1 > 0 else 1), tl.float32)
    dv1 = tl.zeros((BLOCK_N, D1 if D1 > 0 else 1), tl.float32)
    if pid < num_prefix_programs:
        num_blocks = tl.cdiv(prefix_len, BLOCK_N)
        block = pid % num_blocks
        h = (pid // num_blocks) % num_heads
        p_row = (pid // num_blocks // num_heads).to(tl.int64)
        cols = block * BLOCK_N + offs_n
        valid = cols < prefix_len
        k_base = _tile_base(PK, p_row, stride_pkn, h, stride_pkh)
        v_base = _tile_base(PV, p_row, stride_pvn, h, stride_pvh)
        k0, k1 = _load_tiles(k_base, cols, stride_pkp, valid, D0, D1, HEAD_DIM)
        v0, v1 = _load_tiles(v_base, cols, stride_pvp, valid, D0, D1, HEAD_DIM)
        # Sum over every sequence reading this prefix row (deterministic, no atomics).
        for j in range(tl.load(RowStart + p_row), tl.load(RowStart + p_row + 1)):
            dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q, dOut, Lse, Delta, CuSeqlens, tl.load(SeqByRow + j), h,
                stride_qt, stride_qh, total, num_heads, qk_scale, BLOCK_M, D0, D1, HEAD_DIM, PREC)
        dst = (p_row * num_heads + h) * prefix_len * HEAD_DIM  # dPK/dPV are contiguous
        _store_tiles(dPK + dst, cols, HEAD_DIM // 8, valid, dk0 * sm_scale, dk1 * sm_scale, D0, D1, HEAD_DIM)
        _store_tiles(dPV + dst, cols, HEAD_DIM // 8, valid, dv0, dv1, D0, D1, HEAD_DIM)
    else:
        own = pid - num_prefix_programs
        h = own // own_blocks_per_head
        seq, start, length, cols, valid = _query_block(BlockSeq, BlockStart, CuSeqlens, own % own_blocks_per_head,
                                                       total, BLOCK_N)
        if seq >= 0:
            k_base = _tile_base(K, start, stride_kt, h, stride_kh)
            v_base = _tile_base(V, start, stride_vt, h, stride_vh)
            k0, k1 = _load_tiles(k_base, cols, stride_kt, valid, D0, D1, HEAD_DIM)
            v0, v1 = _load_tiles(v_base, cols, stride_vt, valid, D0, D1, HEAD_DIM)
            dk0, dk1, dv0, dv1 = _bwd_dkdv_inner(
                dk0, dk1, dv0, dv1, k0, k1, v0, v1, Q, dOut, Lse, Delta, CuSeqlens, seq, h,
                stride_qt, stride_qh, total, num_heads, qk_scale, BLOCK_M, D0, D1, HEAD_DIM, PREC)
            tokens = start + cols
            _store_tiles(dK + h * HEAD_DIM, tokens, num_heads * (HEAD_DIM // 8), valid, dk0 * sm_scale, dk1 * sm_scale,
                         D0, D1, HEAD_DIM)
            _store_tiles(dV + h * HEAD_DIM, tokens, num_heads * (HEAD_DIM // 8), valid, dv0, dv1, D0, D1, HEAD_DIM)


# ----------------------------------------------------------------------------- host side


def _head_tiles(head_dim: int) -> tuple[int, int]:
    """Split ``head_dim`` into a power-of-two main tile and a power-of-two (>= 16, for tl.dot) rest tile."""
    main = 1 << (head_dim.bit_length() - 1)
    rest = head_dim - main
    return main, (max(16, triton.next_power_of_2(rest)) if rest else 0)


def _launch_config(head_dim: int, dtype: torch.dtype) -> dict[str, tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; tiny blocks under the CPU interpreter.

    Not autotuned (no GPU was at hand): a wide query block for the forward and dQ, a wide key
    block for dK/dV, as in the fused-attention tutorial; wider heads get half-size blocks.
    Offline sm_90a builds (ptxas of triton 3.9, ``benchmarks/results/aot-sm90.json``) at head_dim
    72 fit shared memory with no spills in bf16/fp16 (forward ~200 registers, dK/dV ~250); fp32
    dK/dV spills ~1 KB per thread: fp32 (exact FMA dots) is a correctness path, not a tuned one.
    """
    if triton_interpreted():
        return dict(fwd=(16, 16, 1, 1), dq=(16, 16, 1, 1), dkdv=(16, 16, 1, 1))
    if dtype == torch.float32:
        return dict(fwd=(32, 32, 4, 2), dq=(32, 32, 4, 2), dkdv=(32, 32, 4, 2))
    if sum(_head_tiles(head_dim)) > 128:
        return dict(fwd=(64, 64, 8, 2), dq=(64, 32, 8, 2), dkdv=(32, 32, 8, 2))
    return dict(fwd=(128, 64, 8, 3), dq=(128, 32, 8, 3), dkdv=(32, 128, 8, 3))


_SCHEDULES: dict[int, tuple[weakref.ref, dict]] = {}  # id(table) -> (its weakref, schedules by key)


def _kept(table: torch.Tensor, key: tuple, build):
    """``build()``, kept per ``table`` tensor while it lives when that is a layout's shared, read-only
    table (:func:`~ps3_kernels.layout.is_shared_table`): every layer of a pass, and every block
    recomputed under gradient checkpointing, then shares one schedule instead of a few small
    launches per layer. Anything else (a caller's buffer, refilled in place between CUDA-graph
    replays, say) gets ``build()`` every call; nothing is kept while a CUDA graph is being captured."""
    owner, schedules = _SCHEDULES.get(id(table), (None, {}))
    shared = is_shared_table(table)
    if shared and owner is not None and owner() is table and key in schedules:
        return schedules[key]
    schedule = build()
    capturing = table.is_cuda and torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
    if shared and not capturing:
        if owner is None or owner() is not table:
            schedules = {}
            _SCHEDULES[id(table)] = (weakref.ref(table), schedules)
            weakref.finalize(table, _SCHEDULES.pop, id(table), None)
        schedules[key] = schedule
    return schedule


def _block_schedule(
    cu: torch.Tensor, block: int, max_seqlen: int | None, total: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Map flat program ids to sequences, on the device and without a host sync.

    Returns ``(seq_of_program, first_program_of_seq, num_programs)``: ``num_programs`` is an upper
    bound on the number of ``block``-sized blocks over all sequences; the spare programs past the
    real ones get ``seq = -1`` and exit at once. Kept per ``cu_seqlens`` (:func:`_kept`).
    """
    def build():
        num_seqs = cu.numel() - 1
        bound = triton.cdiv(total, block) + num_seqs
        if max_seqlen is not None:
            bound = min(bound, num_seqs * triton.cdiv(max_seqlen, block))
        nblocks = (cu[1:] - cu[:-1] + block - 1) // block
        ends = torch.cumsum(nblocks, 0, dtype=torch.int32)
        pids = torch.arange(bound, device=cu.device, dtype=torch.int32)
        seq = torch.searchsorted(ends, pids, right=True, out_int32=True)
        return torch.where(seq < num_seqs, seq, -1), ends - nblocks, bound

    return _kept(cu, ("blocks", block, max_seqlen, total), build)


def _prefix_rows(index: torch.Tensor, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of the sequences per prefix row, ``(row_start, seq_by_row)`` (int32), so one program can own
    (and sum over) a prefix block. Clamped like the kernels clamp it, so bad rows get the gradient
    of the row they read. Kept per ``prefix_index`` (:func:`_kept`)."""
    def build():
        rows_sorted, seq_by_row = torch.sort(index.clamp(0, num_rows - 1), stable=True)
        rows = torch.arange(num_rows + 1, device=index.device, dtype=rows_sorted.dtype)
        return torch.searchsorted(rows_sorted, rows, out_int32=True), seq_by_row.to(torch.int32)

    return _kept(index, ("rows", num_rows), build)


def _strides(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None,
             prefix_v: torch.Tensor | None) -> tuple[int, ...]:
    """Token/head strides of q, k, v and row/head/position strides of the prefixes, in units of 8
    elements (see ``_tile_base``; :func:`_aligned` made them multiples of 8)."""
    pk = prefix_k.stride()[:3] if prefix_k is not None else (0, 0, 0)
    pv = prefix_v.stride()[:3] if prefix_v is not None else (0, 0, 0)
    return tuple(s // 8 for s in (*q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *pk, *pv))


def _aligned(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The kernels assume a unit head-dim stride and other strides in multiples of 8 (see
    ``_tile_base``); true for contiguous tensors and qkv splits. Anything else is copied once."""
    def ok(t: torch.Tensor) -> bool:
        return t.stride(-1) == 1 and all(s % 8 == 0 for s in t.stride()[:-1])

    return [t if t is None or ok(t) else t.contiguous() for t in tensors]


_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens, Tensor? prefix_k, Tensor? prefix_v, "
    "Tensor? prefix_index, float softmax_scale, SymInt? max_seqlen) -> (Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor cu_seqlens, "
    "Tensor? prefix_k, Tensor? prefix_v, Tensor? prefix_index, float softmax_scale, SymInt? max_seqlen) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op("ps3_kernels::varlen_prefix_attention", mutates_args=(), schema=_FWD_SCHEMA)
def _attention_op(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index, softmax_scale, max_seqlen):
    """Forward kernel launch; returns ``(out, lse)`` with ``lse`` (num_heads, total) in the log2 domain.

    Takes an int32 ``cu_seqlens`` and, with a prefix, an int32 ``prefix_index`` and prefixes in q's dtype
    (see :func:`varlen_prefix_attention_triton`, which prepares them outside the op).
    """
    q, k, v, prefix_k, prefix_v = _aligned(q, k, v, prefix_k, prefix_v)
    total, num_heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((num_heads, total), dtype=torch.float32, device=q.device)
    if total == 0:
        return out, lse
    d0, d1 = _head_tiles(head_dim)
    block_m, block_n, warps, stages = _launch_config(head_dim, q.dtype)["fwd"]
    block_seq, block_start, num_blocks = _block_schedule(cu_seqlens, block_m, max_seqlen, total)
    has_prefix = prefix_k is not None
    _fwd_kernel[(num_blocks, num_heads)](
        q, k, v, prefix_k if has_prefix else q, prefix_v if has_prefix else q, out, lse, cu_seqlens,
        prefix_index if has_prefix else cu_seqlens, block_seq, block_start,
        *_strides(q, k, v, prefix_k, prefix_v),
        total, num_heads, prefix_k.shape[0] if has_prefix else 1, prefix_k.shape[2] if has_prefix else 0,
        softmax_scale * _LOG2E,
        HAS_PREFIX=has_prefix, HEAD_DIM=head_dim, D0=d0, D1=d1, BLOCK_M=block_m, BLOCK_N=block_n,
        PREC=dot_precision(q.dtype), num_warps=warps, num_stages=stages,
    )
    return out, lse


@_attention_op.register_fake
def _(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index, softmax_scale, max_seqlen):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("ps3_kernels::varlen_prefix_attention_backward", mutates_args=(), schema=_BWD_SCHEMA)
def _attention_backward_op(grad_out, q, k, v, out, lse, cu_seqlens, prefix_k, prefix_v, prefix_index,
                           softmax_scale, max_seqlen):
    """Backward launches; returns ``(dq, dk, dv, dprefix_k, dprefix_v)`` (empty prefix grads without a prefix)."""
    q, k, v, prefix_k, prefix_v = _aligned(q, k, v, prefix_k, prefix_v)
    grad_out = grad_out.contiguous()  # the kernels index dOut like out: contiguous (total, heads, dim)
    total, num_heads, head_dim = q.shape
    has_prefix = prefix_k is not None
    dq, dk, dv = (torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(3))
    if not has_prefix:
        dpk, dpv = q.new_empty(0), q.new_empty(0)
    elif total == 0:  # no query reads the prefix; the kernel below would not run to write the zeros
        dpk, dpv = q.new_zeros(prefix_k.shape), q.new_zeros(prefix_v.shape)
    else:
        dpk, dpv = (torch.empty(prefix_k.shape, dtype=q.dtype, device=q.device) for _ in range(2))
    if total == 0:
        return dq, dk, dv, dpk, dpv

    d0, d1 = _head_tiles(head_dim)
    config = _launch_config(head_dim, q.dtype)
    prefix_len = prefix_k.shape[2] if has_prefix else 0
    common = dict(HEAD_DIM=head_dim, D0=d0, D1=d1, PREC=dot_precision(q.dtype))
    strides = _strides(q, k, v, prefix_k, prefix_v)
    pk, pv, index = (prefix_k, prefix_v, prefix_index) if has_prefix else (q, q, cu_seqlens)

    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    block_m, block_n, warps, stages = config["dq"]
    block_seq, block_start, num_blocks = _block_schedule(cu_seqlens, block_m, max_seqlen, total)
    _bwd_dq_kernel[(num_blocks, num_heads)](
        q, k, v, pk, pv, out, grad_out, dq, lse, delta, cu_seqlens, index, block_seq, block_start, *strides,
        total, num_heads, prefix_k.shape[0] if has_prefix else 1, prefix_len, softmax_scale * _LOG2E, softmax_scale,
        HAS_PREFIX=has_prefix, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common,
    )

    block_m, block_n, warps, stages = config["dkdv"]
    block_seq, block_start, own_blocks = _block_schedule(cu_seqlens, block_n, max_seqlen, total)
    if has_prefix:
        row_start, seq_by_row = _prefix_rows(index, prefix_k.shape[0])
        num_prefix_programs = prefix_k.shape[0] * num_heads * triton.cdiv(prefix_len, block_n)
    else:
        row_start = seq_by_row = cu_seqlens
        num_prefix_programs = 0
    _bwd_dkdv_kernel[(num_prefix_programs + num_heads * own_blocks,)](
        q, k, v, pk, pv, grad_out, dk, dv, dpk if has_prefix else dk, dpv if has_prefix else dv, lse, delta,
        cu_seqlens, block_seq, block_start, row_start, seq_by_row, *strides,
        total, num_heads, prefix_len, num_prefix_programs, own_blocks, softmax_scale * _LOG2E, softmax_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages, **common,
    )
    return dq, dk, dv, dpk, dpv


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, prefix_k, prefix_v, prefix_index, softmax_scale, max_seqlen):
    prefix_grads = [q.new_empty(p.shape) if p is not None else q.new_empty(0) for p in (prefix_k, prefix_v)]
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape), *prefix_grads


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index, softmax_scale, max_seqlen = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, prefix_k, prefix_v, prefix_index)
    ctx.softmax_scale, ctx.max_seqlen = softmax_scale, max_seqlen
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, cu_seqlens, prefix_k, prefix_v, prefix_index = ctx.saved_tensors
    dq, dk, dv, dpk, dpv = _attention_backward_op(
        grad_out, q, k, v, out, lse, cu_seqlens, prefix_k, prefix_v, prefix_index, ctx.softmax_scale, ctx.max_seqlen
    )
    has_prefix = prefix_k is not None
    return dq, dk, dv, None, dpk if has_prefix else None, dpv if has_prefix else None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


def varlen_prefix_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    prefix_index: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Triton implementation of :func:`ps3_kernels.varlen_prefix_attention` (differentiable).

    Inputs are validated and dispatched there (:data:`ps3_kernels.varlen_attention.SUPPORT`
    states the limits). Out-of-range ``cu_seqlens``/``prefix_index`` values, which only checked
    mode catches on the GPU, are clamped by the kernels: wrong results, no out-of-bounds access.
    """
    head_dim = q.shape[2]
    if prefix_k is not None:
        prefix_k, prefix_v = prefix_k.to(q.dtype), prefix_v.to(q.dtype)
        if prefix_index is None:
            prefix_index = torch.arange(cu_seqlens.numel() - 1, device=q.device, dtype=torch.int32)
        prefix_index = prefix_index.to(device=q.device, dtype=torch.int32)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    scale = float(softmax_scale) if softmax_scale is not None else head_dim**-0.5
    out, _ = _attention_op(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index, scale, max_seqlen)
    return out
