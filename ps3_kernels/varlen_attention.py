"""Varlen attention with a per-sequence key/value prefix (PS3's high-res looks).

Packed queries ``q`` of many sequences (flash-attn ``cu_seqlens`` convention) attend,
non-causally, to ``[prefix_k[prefix_index[s]]; k[s]]``: the low-res KV cache of the image the
sequence belongs to, followed by the sequence's own keys. No concatenated or padded K/V is
built by the Triton path; the PyTorch reference below pads, which is simple and exact.

Other implementations ("peers", for benchmarks and cross-checks) are selected with ``impl=``;
each gets the inputs its library needs (a padded batch, a concatenated packed K/V, a block
mask), built by :func:`prepare_impl` so that a benchmark can time them with or without that
preparation.
"""

from __future__ import annotations

import functools
import importlib
from typing import Callable

import torch
import torch.nn.functional as F

from .backend import resolve_backend, triton_dtypes


def _check_inputs(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index):
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
        for name, t in (("prefix_k", prefix_k), ("prefix_v", prefix_v)):
            if not t.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
        if prefix_index is None and prefix_k.shape[0] != cu_seqlens.numel() - 1:
            raise ValueError("without prefix_index, prefix_k needs one row per sequence")
    elif prefix_index is not None:
        raise ValueError("prefix_index needs prefix_k and prefix_v")
    if prefix_index is not None:
        if not isinstance(prefix_index, torch.Tensor) or prefix_index.shape != (cu_seqlens.numel() - 1,):
            raise ValueError("prefix_index must be a (num_seqs,) tensor")
        if prefix_index.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"prefix_index must be int32 or int64, got {prefix_index.dtype}")


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
    """Pure-PyTorch reference: pad every sequence to ``max_seqlen`` and run masked SDPA.

    When all sequences have the same length (known from host ints alone: ``total ==
    num_seqs * max_seqlen``) it needs no padding and no mask, which lets SDPA take its fused
    kernels instead of materialising the attention matrix.
    """
    total, heads, dim = q.shape
    num_seqs = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    lengths = cu[1:] - cu[:-1]
    if max_seqlen is None:
        max_seqlen = int(lengths.max()) if num_seqs > 0 else 0
    if total == 0 or num_seqs == 0:
        return q.new_empty(q.shape)
    uniform = total == num_seqs * max_seqlen
    if uniform:
        def pad(x):
            return x.view(num_seqs, max_seqlen, heads, dim).transpose(1, 2)  # (S, H, L, D)
    else:
        seq_id = torch.repeat_interleave(torch.arange(num_seqs, device=q.device), lengths, output_size=total)
        pos = torch.arange(total, device=q.device) - cu[seq_id]

        def pad(x):
            out = x.new_zeros(num_seqs, max_seqlen, heads, dim)
            out[seq_id, pos] = x
            return out.transpose(1, 2)

    qp, kp, vp = pad(q), pad(k), pad(v)
    mask = None if uniform else torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]
    if prefix_k is not None:
        index = prefix_index.to(q.device, torch.long) if prefix_index is not None else torch.arange(num_seqs, device=q.device)
        kp = torch.cat([prefix_k[index].to(q.dtype), kp], dim=2)
        vp = torch.cat([prefix_v[index].to(q.dtype), vp], dim=2)
        if mask is not None:
            mask = torch.cat([mask.new_ones(num_seqs, prefix_k.shape[2]), mask], dim=1)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=None if mask is None else mask[:, None, None, :], scale=softmax_scale)
    out = out.transpose(1, 2)
    return out.reshape(total, heads, dim) if uniform else out[seq_id, pos]


IMPLS = ("torch", "triton", "sdpa", "flex", "flash_attn", "xformers")
_PACKAGES = {
    "triton": "triton",
    "flex": "torch.nn.attention.flex_attention",
    "flash_attn": "flash_attn",
    "xformers": "xformers.ops",
}


def _import(impl: str):
    """The module that ``impl`` needs, or an ImportError naming the package to install."""
    try:
        return importlib.import_module(_PACKAGES[impl])
    except ImportError as e:
        package = {"flex": "torch>=2.5 (FlexAttention)", "flash_attn": "flash-attn"}.get(impl, impl)
        raise ImportError(f"impl={impl!r} needs the {package} package: {e}") from e


def available_impls() -> list[str]:
    """Names accepted by ``impl=`` whose packages import here (``triton`` still needs CUDA
    tensors, or ``TRITON_INTERPRET=1`` on CPU)."""
    names = []
    for impl in IMPLS:
        try:
            if impl in _PACKAGES:
                _import(impl)
        except ImportError:
            continue
        names.append(impl)
    return names


def _seq_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence id of every packed token (int64)."""
    lengths = cu[1:] - cu[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths, output_size=total)


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


def _prepare_flash_attn(q, k, v, cu, prefix_k, prefix_v, scale, prefix_index, max_seqlen):
    flash_attn = _import("flash_attn")
    lengths = cu[1:] - cu[:-1]
    max_q = max_seqlen if max_seqlen is not None else int(lengths.max()) if lengths.numel() else 0
    plen = 0 if prefix_k is None else prefix_k.shape[2]
    k_cat, v_cat, cu_k = (k, v, cu) if prefix_k is None else _concat_prefix(k, v, cu, prefix_k, prefix_v, prefix_index)
    return functools.partial(
        flash_attn.flash_attn_varlen_func, q, k_cat, v_cat, cu.to(torch.int32), cu_k.to(torch.int32),
        max_q, max_q + plen, softmax_scale=scale, causal=False,
    )


def _prepare_xformers(q, k, v, cu, prefix_k, prefix_v, scale, prefix_index, max_seqlen):
    xops = _import("xformers")
    lengths = (cu[1:] - cu[:-1]).tolist()
    plen = 0 if prefix_k is None else prefix_k.shape[2]
    k_cat, v_cat, _ = (k, v, cu) if prefix_k is None else _concat_prefix(k, v, cu, prefix_k, prefix_v, prefix_index)
    bias = xops.fmha.BlockDiagonalMask.from_seqlens(q_seqlen=lengths, kv_seqlen=[n + plen for n in lengths])

    def run():
        return xops.memory_efficient_attention(q[None], k_cat[None], v_cat[None], attn_bias=bias, scale=scale)[0]

    return run


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    return torch.compile(_import("flex").flex_attention, dynamic=False)


def _prepare_flex(q, k, v, cu, prefix_k, prefix_v, scale, prefix_index, max_seqlen):
    """One packed query "batch" against ``[all prefix rows; all own keys]`` with a block mask
    that lets each query see its own sequence and its prefix row (empty tiles are skipped)."""
    flex = _import("flex")
    total = q.shape[0]
    seq_q = _seq_ids(cu, total)
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
        prefix_owner_q = -1 - prefix_index[seq_q]

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


def prepare_impl(
    impl: str | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    prefix_k: torch.Tensor | None = None,
    prefix_v: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    prefix_index: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> Callable[[], torch.Tensor]:
    """Validate the inputs, build what ``impl`` needs, and return a call that runs it.

    The call returns what :func:`varlen_prefix_attention` would. Benchmarks time it alone
    (inputs prebuilt) or together with this preparation (what a caller of that library pays).
    Peers: ``"torch"`` and ``"sdpa"`` are the padded-SDPA reference; ``"flex"``, ``"flash_attn"``
    and ``"xformers"`` need their packages, and the latter two a concatenated packed K/V
    (their preparation reads ``cu_seqlens`` on the host).
    """
    _check_inputs(q, k, v, cu_seqlens, prefix_k, prefix_v, prefix_index)
    args = (q, k, v, cu_seqlens, prefix_k, prefix_v, softmax_scale, prefix_index, max_seqlen)
    if impl is None:
        head_dim = q.shape[-1]
        supported = triton_dtypes(q, k, v, prefix_k, prefix_v) and head_dim % 8 == 0 and 16 <= head_dim <= 256
        impl = resolve_backend(q, k, v, prefix_k, supported=supported)
    if impl in ("torch", "sdpa"):
        return functools.partial(varlen_prefix_attention_reference, *args)
    if impl == "triton":
        from .triton.varlen_attention import varlen_prefix_attention_triton  # ImportError names triton

        return functools.partial(varlen_prefix_attention_triton, *args)
    prepare = {"flex": _prepare_flex, "flash_attn": _prepare_flash_attn, "xformers": _prepare_xformers}.get(impl)
    if prepare is None:
        raise ValueError(f"impl must be None or one of {IMPLS}, got {impl!r}")
    cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if prefix_k is not None:
        default = torch.arange(cu.numel() - 1, device=q.device)
        prefix_index = default if prefix_index is None else prefix_index.to(device=q.device, dtype=torch.long)
    return prepare(q, k, v, cu, prefix_k, prefix_v, scale, prefix_index, max_seqlen)


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
    *,
    impl: str | None = None,
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
        impl: ``None`` follows the backend switch (:mod:`ps3_kernels.backend`); or one of
            :data:`IMPLS` (see :func:`prepare_impl`, :func:`available_impls`).

    Returns:
        ``(total_tokens, num_heads, head_dim)`` in ``q``'s dtype.
    """
    return prepare_impl(impl, q, k, v, cu_seqlens, prefix_k, prefix_v, softmax_scale, prefix_index, max_seqlen)()
