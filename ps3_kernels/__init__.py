"""Triton kernels (and their PyTorch references) for PS3's sparse high-resolution encoding."""

from .backend import (
    TritonNotSupportedError,
    TritonSupport,
    get_backend,
    not_supported_reasons,
    resolve_backend,
    set_backend,
    triton_support,
    use_backend,
)
from .layout import PackedSequences
from .patch_embed import PatchTokens, sparse_patch_embed, sparse_patch_embed_reference
from .selection import assign_looks, assign_looks_reference, selection_probs, selection_probs_reference
from .varlen_attention import available_impls, varlen_prefix_attention, varlen_prefix_attention_reference

__all__ = [
    "PackedSequences",
    "PatchTokens",
    "TritonNotSupportedError",
    "TritonSupport",
    "assign_looks",
    "assign_looks_reference",
    "available_impls",
    "get_backend",
    "not_supported_reasons",
    "resolve_backend",
    "selection_probs",
    "selection_probs_reference",
    "set_backend",
    "sparse_patch_embed",
    "sparse_patch_embed_reference",
    "triton_support",
    "use_backend",
    "varlen_prefix_attention",
    "varlen_prefix_attention_reference",
]
