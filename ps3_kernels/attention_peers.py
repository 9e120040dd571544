"""Other libraries' varlen attention, fed PS3's packed sequences with a KV prefix.

For benchmarks and cross-checks of :func:`ps3_kernels.varlen_prefix_attention` (``impl=``). Each
``prepare_*`` builds what its library needs -- a concatenated packed K/V (flash-attn, xformers),
a block mask (FlexAttention) -- and returns a call that runs it, so a benchmark can time the
attention with or without that preparation. The packages are imported on first use.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch

from .layout import PackedSequences

PACKAGES = {
    "triton": "triton",
    "flex": "torch.nn.attention.flex_attention",
    "flash_attn": "flash_attn",
    "xformers": "xformers.ops",
}


def import_peer(impl: str):
    """The module that ``impl`` needs, or an ImportError naming the package to install."""
    try:
        return importlib.import_module(PACKAGES[impl])
    except ImportError as e:
        package = {"flex": "torch>=2.5 (FlexAttention)", "flash_attn": "flash-attn"}.get(impl, impl)
        raise ImportError(f"impl={impl!r} needs the {package} package: {e}") from e


def _concat_prefix(k, v, cu, prefix_k, prefix_v, prefix_index):
    """Packed ``[prefix rows; own keys]`` per sequence, as flash-attn and xformers need it.

    Returns ``(k_cat, v_cat, cu_seqlens_k)``; one gather per tensor, differentiable.
    """
    num_seqs, plen = cu.numel() - 1, prefix_k.shape[2]
    cu_k = cu + plen * torch.arange(num_seqs + 1, device=cu.device)
    total_k = k.shape[0] + num_seqs * plen
    pos = torch.arange(total_k, device=cu.device)
    seq = torch.searchsorted(cu_k[1:], pos, right=True)
    offset = pos - cu_k[seq]
    # Rows 0 .. S*P-1 of the source are the prefix rows of sequences 0..S-1, then the own keys.
    src = torch.where(offset < plen, seq * plen + offset, num_seqs * plen + cu[seq] + offset - plen)

    def cat(own, prefix):
        rows = prefix[prefix_index].to(own.dtype).transpose(1, 2).reshape(num_seqs * plen, *own.shape[1:])
        return torch.cat([rows, own])[src]

    return cat(k, prefix_k), cat(v, prefix_v), cu_k


def _prefix_rows(seqs: PackedSequences, device) -> torch.Tensor:
    if seqs.prefix_index is not None:
        return seqs.prefix_index.to(device=device, dtype=torch.long)
    return torch.arange(seqs.num_seqs, device=device)


def _lengths(seqs: PackedSequences) -> list[int]:
    """Host lengths (read from ``cu_seqlens``, a device sync, when the layout does not carry them)."""
    if seqs.lengths is not None:
        return list(seqs.lengths)
    cu = seqs.cu_seqlens.tolist()
    return [b - a for a, b in zip(cu[:-1], cu[1:])]


def prepare_flash_attn(q, k, v, seqs: PackedSequences, prefix_k, prefix_v, scale) -> Callable[[], torch.Tensor]:
    flash_attn = import_peer("flash_attn")
    cu = seqs.cu_seqlens.to(device=q.device, dtype=torch.long)
    max_q = seqs.max_seqlen if seqs.max_seqlen is not None else max(_lengths(seqs), default=0)
    plen = 0 if prefix_k is None else prefix_k.shape[2]
    k_cat, v_cat, cu_k = (k, v, cu) if prefix_k is None else _concat_prefix(
        k, v, cu, prefix_k, prefix_v, _prefix_rows(seqs, q.device))
    return functools.partial(
        flash_attn.flash_attn_varlen_func, q, k_cat, v_cat, cu.to(torch.int32), cu_k.to(torch.int32),
        max_q, max_q + plen, softmax_scale=scale, causal=False,
    )


def prepare_xformers(q, k, v, seqs: PackedSequences, prefix_k, prefix_v, scale) -> Callable[[], torch.Tensor]:
    xops = import_peer("xformers")
    lengths = _lengths(seqs)
    plen = 0 if prefix_k is None else prefix_k.shape[2]
    cu = seqs.cu_seqlens.to(device=q.device, dtype=torch.long)
    k_cat, v_cat = (k, v) if prefix_k is None else _concat_prefix(
        k, v, cu, prefix_k, prefix_v, _prefix_rows(seqs, q.device))[:2]
    bias = xops.fmha.BlockDiagonalMask.from_seqlens(q_seqlen=lengths, kv_seqlen=[n + plen for n in lengths])

    def run():
        return xops.memory_efficient_attention(q[None], k_cat[None], v_cat[None], attn_bias=bias, scale=scale)[0]

    return run


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    return torch.compile(import_peer("flex").flex_attention, dynamic=False)


def prepare_flex(q, k, v, seqs: PackedSequences, prefix_k, prefix_v, scale) -> Callable[[], torch.Tensor]:
    """One packed query "batch" against ``[all prefix rows; all own keys]`` with a block mask
    that lets each query see its own sequence and its prefix row (empty tiles are skipped);
    the mask is :meth:`PackedSequences.dense_mask` as a function of the indices."""
    flex = import_peer("flex")
    total = q.shape[0]
    seq_q = seqs.seq_ids(total).to(q.device)
    if prefix_k is None:
        k_all, v_all, owner, prefix_owner_q = k, v, seq_q, seq_q
    else:
        rows, plen = prefix_k.shape[0], prefix_k.shape[2]

        def flat(prefix, own):
            return torch.cat([prefix.to(own.dtype).transpose(1, 2).reshape(rows * plen, *own.shape[1:]), own])

        k_all, v_all = flat(prefix_k, k), flat(prefix_v, v)
        # Prefix rows get owner ids -1, -2, ...; query tokens accept their sequence's id and their row's.
        row_ids = torch.arange(rows, device=q.device).repeat_interleave(plen)
        owner = torch.cat([-1 - row_ids, seq_q])
        prefix_owner_q = -1 - _prefix_rows(seqs, q.device)[seq_q]

    def mask_mod(b, h, q_idx, kv_idx):
        return (owner[kv_idx] == seq_q[q_idx]) | (owner[kv_idx] == prefix_owner_q[q_idx])

    block_mask = flex.create_block_mask(
        mask_mod, None, None, total, k_all.shape[0], device=q.device, _compile=q.is_cuda  # compiled: no dense mask
    )
    attend = _compiled_flex_attention() if q.is_cuda else flex.flex_attention

    def run():
        out = attend(*(t.transpose(0, 1)[None] for t in (q, k_all, v_all)), block_mask=block_mask, scale=scale)
        return out[0].transpose(0, 1)

    return run


PREPARE = {"flex": prepare_flex, "flash_attn": prepare_flash_attn, "xformers": prepare_xformers}
