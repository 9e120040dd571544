"""Selection scoring and multi-look quota top-k (PyTorch references).

Scoring turns the projected low-res features and a prompt into the probability that each
patch is worth a high-res look. Top-k assigns patches to looks: look ``l`` of scale ``s``
takes the next ``quota[l][s]`` patches in one stable descending order of the probabilities
(ties: lower raster index first). This equals upstream's per-look top-k over probabilities
where earlier looks' patches are set to -1, but needs one sort per scale for all looks and
no host sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backend import resolve_backend, triton_dtypes


def selection_probs_reference(
    feature: torch.Tensor,
    prompt: torch.Tensor,
    highres_feature: torch.Tensor | None = None,
    highres_prompt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Patch selection probabilities on the low-res grid (PyTorch reference).

    Args:
        feature: ``(B, C, h, w)`` projected low-res selection features.
        prompt: ``(B, C)`` prompt (the learned prior for bottom-up selection).
        highres_feature: optional ``(B, C2, H2, W2)`` map of the shallow high-res ConvNet.
        highres_prompt: ``(B, C2)`` prompt for ``highres_feature``.

    Returns:
        ``(B, h, w)``: ``sigmoid(clamp(5 * logit, -10, 10))`` with ``logit`` the cosine of
        feature and prompt, averaged with the max-pooled high-res cosine when given.
    """
    logits = (F.normalize(feature, dim=1) * F.normalize(prompt, dim=-1)[:, :, None, None]).sum(dim=1)
    if highres_feature is not None:
        hr = (F.normalize(highres_feature, dim=1) * F.normalize(highres_prompt, dim=-1)[:, :, None, None]).sum(dim=1)
        logits = (logits + F.adaptive_max_pool2d(hr, logits.shape[-2:])) / 2
    logits = (logits * 5.0).clamp(-10, 10)
    # softmax over [logit, 0] rather than sigmoid: bit-identical to upstream's probabilities,
    # which matters because selection compares them exactly.
    return F.softmax(F.pad(logits[..., None], (0, 1)), dim=-1)[..., 0]


def _check_probs_args(feature, prompt, highres_feature, highres_prompt) -> None:
    if not isinstance(feature, torch.Tensor) or feature.dim() != 4:
        raise ValueError(f"feature must be (B, C, h, w), got {getattr(feature, 'shape', type(feature).__name__)}")
    B, C = feature.shape[:2]
    if not isinstance(prompt, torch.Tensor) or tuple(prompt.shape) != (B, C):
        raise ValueError(f"prompt must be ({B}, {C}), got {getattr(prompt, 'shape', type(prompt).__name__)}")
    if (highres_feature is None) != (highres_prompt is None):
        raise ValueError("highres_feature and highres_prompt must be given together")
    tensors = [feature, prompt]
    if highres_feature is not None:
        if highres_feature.dim() != 4 or highres_feature.shape[0] != B:
            raise ValueError(f"highres_feature must be ({B}, C2, H2, W2), got {tuple(highres_feature.shape)}")
        if tuple(highres_prompt.shape) != (B, highres_feature.shape[1]):
            raise ValueError(f"highres_prompt must be ({B}, {highres_feature.shape[1]}), "
                             f"got {tuple(highres_prompt.shape)}")
        tensors += [highres_feature, highres_prompt]
    if not all(t.is_floating_point() for t in tensors):
        raise TypeError(f"feature, prompt and the high-res pair must be floating point, "
                        f"got {[t.dtype for t in tensors]}")


def selection_probs(
    feature: torch.Tensor,
    prompt: torch.Tensor,
    highres_feature: torch.Tensor | None = None,
    highres_prompt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatching :func:`selection_probs_reference` (see there)."""
    _check_probs_args(feature, prompt, highres_feature, highres_prompt)
    supported = triton_dtypes(feature, prompt, highres_feature, highres_prompt)
    if resolve_backend(feature, prompt, highres_feature, highres_prompt, supported=supported) == "triton":
        from .triton.selection import selection_probs_triton

        return selection_probs_triton(feature, prompt, highres_feature, highres_prompt)
    return selection_probs_reference(feature, prompt, highres_feature, highres_prompt)


def assign_looks_reference(probs: torch.Tensor, quotas: torch.Tensor) -> torch.Tensor:
    """Which look selects each patch of one scale.

    Args:
        probs: ``(B, n)`` selection probabilities of one scale, raster order. Rows of images
            with fewer patches are padded with ``-inf`` (never selected while quotas fit).
        quotas: ``(B, L)`` int, patches look ``l`` takes from this scale.

    Returns:
        ``(B, n)`` int64: the look index of each patch, or -1 where no look selects it.
    """
    B, n = probs.shape
    order = torch.sort(probs, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n, device=probs.device).expand(B, n).contiguous())
    bounds = torch.cumsum(quotas.to(device=probs.device, dtype=torch.long), dim=-1)
    look = torch.searchsorted(bounds, rank, right=True)
    return torch.where(look < quotas.shape[-1], look, torch.full_like(look, -1))


def assign_looks(probs: torch.Tensor, quotas: torch.Tensor) -> torch.Tensor:
    """Dispatching :func:`assign_looks_reference` (see there)."""
    if probs.dim() != 2 or quotas.dim() != 2 or quotas.shape[0] != probs.shape[0]:
        raise ValueError(f"probs must be (B, n) and quotas (B, L); got {tuple(probs.shape)} and {tuple(quotas.shape)}")
    if resolve_backend(probs) == "triton":
        from .triton.selection import assign_looks_triton

        return assign_looks_triton(probs, quotas)
    return assign_looks_reference(probs, quotas)
