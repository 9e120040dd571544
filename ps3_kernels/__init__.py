"""Triton kernels (and their PyTorch references) for PS3's sparse high-resolution encoding."""

from .backend import get_backend, resolve_backend, set_backend, use_backend
from .patch_embed import PatchTokens, sparse_patch_embed, sparse_patch_embed_reference
from .selection import assign_looks, assign_looks_reference, selection_probs, selection_probs_reference
from .varlen_attention import available_impls, varlen_prefix_attention, varlen_prefix_attention_reference

__all__ = [
    "PatchTokens",
    "assign_looks",
    "assign_looks_reference",
    "selection_probs",
    "selection_probs_reference",
    "sparse_patch_embed",
    "sparse_patch_embed_reference",
    "get_backend",
    "resolve_backend",
    "set_backend",
    "use_backend",
    "varlen_prefix_attention",
    "varlen_prefix_attention_reference",
    "available_impls",
]
