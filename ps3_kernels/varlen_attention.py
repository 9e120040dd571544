"""Varlen attention with a per-sequence key/value prefix (PS3's high-res looks).

Packed queries ``q`` of many sequences (flash-attn ``cu_seqlens`` convention) attend,
non-causally, to ``[prefix_k[prefix_index[s]]; k[s]]``: the low-res KV cache of the image the
sequence belongs to, followed by the sequence's own keys. No concatenated or padded K/V is
built by the Triton path; the PyTorch reference below pads, which is simple and exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import resolve_backend


def _check_inputs(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a (total_tokens, num_heads, head_dim) tensor")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens must be a 1-D integer tensor of length num_seqs + 1")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("prefix_k and prefix_v must be given together")
    if prefix_k is not None:
        if prefix_k.dim() != 4 or prefix_k.shape != prefix_v.shape:
            raise ValueError("prefix_k and prefix_v must be (num_prefixes, num_heads, P, head_dim) tensors of one shape")
        if prefix_k.shape[1] != q.shape[1] or prefix_k.shape[3] != q.shape[2]:
            raise ValueError(
                f"prefix heads/head_dim {tuple(prefix_k.shape[1::2])} do not match q's {tuple(q.shape[1:])}"
            )
        if prefix_index is None and prefix_k.shape[0] != cu_seqlens.numel() - 1:
            raise ValueError("without prefix_index, prefix_k needs one row per sequence")
    elif prefix_index is not None:
        raise ValueError("prefix_index needs prefix_k and prefix_v")


def varlen_prefix_attention_reference(
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
    """Pure-PyTorch reference: pad every sequence to ``max_seqlen`` and run masked SDPA."""
    total, heads, dim = q.shape
    num_seqs = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    if max_seqlen is None:
        max_seqlen = int(lengths.max()) if num_seqs > 0 else 0
    if total == 0 or num_seqs == 0:
        return q.new_empty(q.shape)
    seq_id = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), lengths, output_size=total)
    pos = torch.arange(total, device=q.device) - cu[seq_id]

    def pad(x):
        out = x.new_zeros(num_seqs, max_seqlen, heads, dim)
        out[seq_id, pos] = x
        return out.transpose(1, 2)  # (S, H, L, D)

    qp, kp, vp = pad(q), pad(k), pad(v)
    key_valid = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]
    if prefix_k is not None:
        index = prefix_index.to(q.device, torch.long) if prefix_index is not None else torch.arange(num_seqs, device=q.device)
        kp = torch.cat([prefix_k[index].to(q.dtype), kp], dim=2)
        vp = torch.cat([prefix_v[index].to(q.dtype), vp], dim=2)
        prefix_valid = key_valid.new_ones(num_seqs, prefix_k.shape[2])
        key_valid = torch.cat([prefix_valid, key_valid], dim=1)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=key_valid[:, None, None, :], scale=softmax_scale)
    return out.transpose(1, 2)[seq_id, pos]


def varlen_prefix_attention(
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
    """Attention of packed sequences to ``[prefix; own keys]``.

    Args:
        q, k, v: ``(total_tokens, num_heads, head_dim)``, sequences packed back to back.
        cu_seqlens: int32 ``(num_seqs + 1,)`` cumulative lengths; empty sequences allowed.
        prefix_k, prefix_v: ``(num_prefixes, num_heads, P, head_dim)`` or ``None``.
        softmax_scale: defaults to ``head_dim ** -0.5``.
        prefix_index: int ``(num_seqs,)``, which prefix row each sequence uses (default: row
            ``s`` for sequence ``s``). Lets several looks of one image share its cache.
        max_seqlen: longest sequence, if known on the host (saves a device sync).

    Returns:
        ``(total_tokens, num_heads, head_dim)`` in ``q``'s dtype.
    """
    _check_inputs(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index)
    backend = resolve_backend(q, k, v, prefix_k)
    if backend == "triton":
        from .triton.varlen_attention import varlen_prefix_attention_triton

        return varlen_prefix_attention_triton(
            q, k, v, cu_seqlens, prefix_k, prefix_v, softmax_scale, prefix_index, max_seqlen
        )
    return varlen_prefix_attention_reference(
        q, k, v, cu_seqlens, prefix_k, prefix_v, softmax_scale, prefix_index, max_seqlen
    )
