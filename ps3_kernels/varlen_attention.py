"""Varlen attention with a per-sequence key/value prefix (PS3's high-res looks): checks, dispatch
and the PyTorch reference.

Packed queries ``q`` of many sequences attend, non-causally, to ``[prefix_k[prefix_index[s]]; k[s]]``:
the low-res KV cache of the image sequence ``s`` belongs to, followed by the sequence's own keys.
The sequences are described by a :class:`~ps3_kernels.layout.PackedSequences` or, flash-attn
style, by loose ``cu_seqlens`` / ``prefix_index`` / ``max_seqlen``. No concatenated or padded
K/V is built by the Triton path; the reference pads, which is simple and exact. Other
libraries' attention ("peers", for benchmarks and cross-checks) lives in
:mod:`ps3_kernels.attention_peers` and is selected with ``impl=``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
import torch.nn.functional as F

from . import attention_peers
from .backend import (
    TRITON_DTYPES,
    TritonSupport,
    checked_mode,
    device_reasons,
    dispatch,
    dtype_reasons,
    grad_reasons,
    host_values,
    register_support,
)
from .layout import PackedSequences

IMPLS = ("torch", "triton", "sdpa", "flex", "flash_attn", "xformers")

SUPPORT = TritonSupport(
    op="varlen_prefix_attention",
    dtypes=TRITON_DTYPES,
    differentiable=("q", "k", "v", "prefix_k", "prefix_v"),
    limits=("head_dim a multiple of 8 in [16, 256]",
            "prefixes of another floating dtype are cast to q's dtype (the reference does the same)"),
    backward="Triton kernels: dQ per query block, dK/dV per key block, deterministic, no atomics",
)


def _layout(cu_seqlens, prefix_index, max_seqlen) -> PackedSequences:
    """The call's layout: a given :class:`PackedSequences`, or one made of the loose arguments."""
    if isinstance(cu_seqlens, PackedSequences):
        if prefix_index is not None or max_seqlen is not None:
            raise ValueError("with a PackedSequences layout, prefix_index and max_seqlen come from the layout; "
                             "do not pass them separately")
        return cu_seqlens
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a tensor or a PackedSequences, got {type(cu_seqlens).__name__}")
    return PackedSequences(cu_seqlens, max_seqlen, prefix_index)


def _check_inputs(q, k, v, seqs: PackedSequences, prefix_k, prefix_v) -> None:
    """Shapes, dtypes, devices and host ints: everything checkable without reading tensor values."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a (total_tokens, num_heads, head_dim) tensor")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.is_floating_point():
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    cu = seqs.cu_seqlens
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor of length num_seqs + 1")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu.dtype}")
    total, num_seqs = q.shape[0], cu.numel() - 1
    if num_seqs == 0 and total:
        raise ValueError(f"cu_seqlens describes no sequence but q has {total} tokens")
    if seqs.lengths is not None and (len(seqs.lengths) != num_seqs or sum(seqs.lengths) != total):
        raise ValueError(f"the layout's {len(seqs.lengths)} sequences of {sum(seqs.lengths)} tokens do not match "
                         f"cu_seqlens ({num_seqs} sequences) and q ({total} tokens)")
    if seqs.host_prefix_index is not None and len(seqs.host_prefix_index) != num_seqs:
        raise ValueError(f"the layout's host_prefix_index has {len(seqs.host_prefix_index)} entries for "
                         f"{num_seqs} sequences")
    max_seqlen = seqs.max_seqlen
    if max_seqlen is not None:
        if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
            raise ValueError(f"max_seqlen must be an int >= 0 or None, got {max_seqlen!r}")
        if max_seqlen > total or max_seqlen * num_seqs < total:
            raise ValueError(f"max_seqlen={max_seqlen} cannot be the longest of {num_seqs} sequences "
                             f"holding q's {total} tokens")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together")
    index = seqs.prefix_index
    if prefix_k is not None:
        if prefix_k.dim() != 4 or prefix_k.shape != prefix_v.shape:
            raise ValueError("prefix_k and prefix_v must be (num_prefixes, num_heads, P, head_dim) tensors of one shape")
        if prefix_k.shape[1] != q.shape[1] or prefix_k.shape[3] != q.shape[2]:
            raise ValueError(
                f"prefix heads/head_dim {tuple(prefix_k.shape[1::2])} do not match q's {tuple(q.shape[1:])}"
            )
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
        if index is None and prefix_k.shape[0] != num_seqs:
            raise ValueError("without prefix_index, prefix_k needs one row per sequence")
        if num_seqs and prefix_k.shape[0] == 0:
            raise ValueError("prefix_k has no rows for the sequences to attend to")
    elif index is not None:
        raise ValueError("prefix_index needs prefix_k and prefix_v")
    if index is not None:
        if not isinstance(index, torch.Tensor) or index.shape != (num_seqs,):
            raise ValueError("prefix_index must be a (num_seqs,) tensor")
        if index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"prefix_index must be int32 or int64, got {index.dtype}")


def _check_values(seqs: PackedSequences, total: int, num_prefixes: int | None, checked: bool) -> PackedSequences:
    """Validate ``cu_seqlens`` and ``prefix_index`` values where that needs no device sync (or
    ``checked``); returns the layout with its host lengths and ``max_seqlen`` filled in when read."""
    if seqs.lengths is None:
        cu = host_values(seqs.cu_seqlens, checked)
        if cu is not None:
            if cu[0] != 0:
                raise ValueError(f"cu_seqlens must start at 0, got cu_seqlens[0]={int(cu[0])}")
            lengths = cu[1:] - cu[:-1]
            bad = (lengths < 0).nonzero()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(f"cu_seqlens must be non-decreasing, but cu_seqlens[{i + 1}]={int(cu[i + 1])} < "
                                 f"cu_seqlens[{i}]={int(cu[i])}")
            if cu[-1] != total:
                raise ValueError(f"cu_seqlens must end at q's number of tokens {total}, got {int(cu[-1])}")
            seqs = dataclasses.replace(seqs, lengths=tuple(lengths.tolist()))
    if seqs.lengths is not None:
        longest = max(seqs.lengths, default=0)
        if seqs.max_seqlen is None:
            seqs = dataclasses.replace(seqs, max_seqlen=longest)
        elif seqs.max_seqlen < longest:
            raise ValueError(f"max_seqlen={seqs.max_seqlen} is less than the longest sequence ({longest} tokens)")
    index = seqs.host_prefix_index
    if index is None:
        values = host_values(seqs.prefix_index, checked)
        index = None if values is None else values.tolist()
    if index is not None and num_prefixes is not None:
        bad = [i for i, row in enumerate(index) if not 0 <= row < num_prefixes]
        if bad:
            raise ValueError(f"prefix_index must lie in [0, {num_prefixes}) (the rows of prefix_k), "
                             f"got prefix_index[{bad[0]}]={index[bad[0]]}")
    return seqs


def varlen_prefix_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | PackedSequences,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    prefix_index: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Pure-PyTorch reference: pad every sequence to ``max_seqlen`` and run masked SDPA.

    When all sequences have the same length (known from host ints alone: ``total ==
    num_seqs * max_seqlen``) it needs no padding and no mask, which lets SDPA take its fused
    kernels instead of materialising the attention matrix.
    """
    seqs = _layout(cu_seqlens, prefix_index, max_seqlen)
    total, heads, dim = q.shape
    num_seqs = seqs.num_seqs
    cu = seqs.cu_seqlens.to(device=q.device, dtype=torch.long)
    max_len = seqs.max_seqlen
    if max_len is None:
        max_len = int((cu[1:] - cu[:-1]).max()) if num_seqs > 0 else 0
    if total == 0 or num_seqs == 0:
        return q.new_empty(q.shape)
    seqs = dataclasses.replace(seqs, cu_seqlens=cu, max_seqlen=max_len)
    uniform = total == num_seqs * max_len
    if uniform:
        def pad(x):
            return x.view(num_seqs, max_len, heads, dim).transpose(1, 2)  # (S, H, L, D)
    else:
        seq_id = seqs.seq_ids(total)
        pos = torch.arange(total, device=q.device) - cu[seq_id]

        def pad(x):
            out = x.new_zeros(num_seqs, max_len, heads, dim)
            out[seq_id, pos] = x
            return out.transpose(1, 2)

    qp, kp, vp = pad(q), pad(k), pad(v)
    plen = 0 if prefix_k is None else prefix_k.shape[2]
    mask = None if uniform else seqs.padding_mask(plen)
    if prefix_k is not None:
        index = seqs.prefix_index
        index = index.to(q.device, torch.long) if index is not None else torch.arange(num_seqs, device=q.device)
        kp = torch.cat([prefix_k[index].to(q.dtype), kp], dim=2)
        vp = torch.cat([prefix_v[index].to(q.dtype), vp], dim=2)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=None if mask is None else mask[:, None, None, :], scale=softmax_scale)
    out = out.transpose(1, 2)
    return out.reshape(total, heads, dim) if uniform else out[seq_id, pos]


def _triton_reasons(q, k, v, prefix_k, prefix_v) -> list[str]:
    head_dim = q.shape[-1]
    reasons = dtype_reasons(SUPPORT, {"q": q})
    if head_dim % 8 or not 16 <= head_dim <= 256:
        reasons.append(f"head_dim is {head_dim} (the Triton path needs a multiple of 8 in [16, 256])")
    return reasons + grad_reasons(SUPPORT, {"q": q, "k": k, "v": v, "prefix_k": prefix_k, "prefix_v": prefix_v})


def not_supported_reasons(q, k, v, cu_seqlens, prefix_k=None, prefix_v=None, softmax_scale=None,
                          prefix_index=None, max_seqlen=None) -> list[str]:
    """Why the Triton path cannot run these inputs (empty when it can), devices included."""
    return device_reasons([q, k, v, prefix_k, prefix_v]) + _triton_reasons(q, k, v, prefix_k, prefix_v)


register_support(SUPPORT, not_supported_reasons)


def available_impls() -> list[str]:
    """Names accepted by ``impl=`` whose packages import here (``triton`` still needs CUDA
    tensors, or ``TRITON_INTERPRET=1`` on CPU)."""
    names = []
    for impl in IMPLS:
        try:
            if impl in attention_peers.PACKAGES:
                attention_peers.import_peer(impl)
        except ImportError:
            continue
        names.append(impl)
    return names


def prepare_impl(
    impl: str | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | PackedSequences,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    prefix_index: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    *,
    checked: bool | None = None,
) -> Callable[[], torch.Tensor]:
    """Validate the inputs, build what ``impl`` needs, and return a call that runs it.

    The call returns what :func:`varlen_prefix_attention` would. Benchmarks time it alone
    (inputs prebuilt) or together with this preparation (what a caller of that library pays).
    ``impl``: ``None`` follows the backend switch; ``"torch"`` and ``"sdpa"`` are the padded-SDPA
    reference; ``"triton"`` the kernels; ``"flex"``, ``"flash_attn"`` and ``"xformers"`` the peers
    (see :mod:`ps3_kernels.attention_peers`).
    """
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"impl must be None or one of {IMPLS}, got {impl!r}")
    seqs = _layout(cu_seqlens, prefix_index, max_seqlen)
    _check_inputs(q, k, v, seqs, prefix_k, prefix_v)
    seqs = _check_values(seqs, q.shape[0], None if prefix_k is None else prefix_k.shape[0], checked_mode(checked))
    if impl in (None, "triton"):
        impl = dispatch(SUPPORT, _triton_reasons(q, k, v, prefix_k, prefix_v), [q, k, v, prefix_k, prefix_v], impl)
    if impl in ("torch", "sdpa"):
        return functools.partial(varlen_prefix_attention_reference, q, k, v, seqs, prefix_k, prefix_v, softmax_scale)
    if impl == "triton":
        from .triton.varlen_attention import varlen_prefix_attention_triton

        return functools.partial(varlen_prefix_attention_triton, q, k, v, seqs.cu_seqlens, prefix_k, prefix_v,
                                 softmax_scale, seqs.prefix_index, seqs.max_seqlen)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    return attention_peers.PREPARE[impl](q, k, v, seqs, prefix_k, prefix_v, scale)


def varlen_prefix_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor | PackedSequences,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    prefix_index: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    *,
    impl: str | None = None,
    checked: bool | None = None,
) -> torch.Tensor:
    """Attention of packed sequences to ``[prefix; own keys]``.

    Args:
        q, k, v: ``(total_tokens, num_heads, head_dim)``, sequences packed back to back.
        cu_seqlens: a :class:`~ps3_kernels.layout.PackedSequences` (which also carries
            ``prefix_index`` and ``max_seqlen``), or flash-attn style an int32 ``(num_seqs + 1,)``
            tensor of cumulative lengths starting at 0 and ending at ``total_tokens``; empty
            sequences allowed.
        prefix_k, prefix_v: ``(num_prefixes, num_heads, P, head_dim)`` or ``None``.
        softmax_scale: defaults to ``head_dim ** -0.5``.
        prefix_index: int ``(num_seqs,)`` in ``[0, num_prefixes)``, which prefix row each
            sequence uses (default: row ``s`` for sequence ``s``). Lets several looks of one
            image share its cache.
        max_seqlen: longest sequence, if known on the host (saves a device sync).
        impl: ``None`` follows the backend switch (:mod:`ps3_kernels.backend`); or one of
            :data:`IMPLS` (see :func:`prepare_impl`, :func:`available_impls`).
        checked: also validate ``cu_seqlens``/``prefix_index`` values that live on the GPU (a
            device sync); ``None`` reads ``PS3_KERNELS_CHECKED``. Values on the CPU are always
            validated.

    Returns:
        ``(total_tokens, num_heads, head_dim)`` in ``q``'s dtype.
    """
    return prepare_impl(impl, q, k, v, cu_seqlens, prefix_k, prefix_v, softmax_scale, prefix_index, max_seqlen,
                        checked=checked)()
