"""Selection scoring and multi-look quota top-k: checks, dispatch and PyTorch references.

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

from .backend import (
    TRITON_DTYPES,
    TritonSupport,
    checked_mode,
    device_reasons,
    dispatch,
    dtype_reasons,
    grad_reasons,
    host_values,
    promoted_dtype,
    register_support,
)

PROBS_SUPPORT = TritonSupport(
    op="selection_probs",
    dtypes=TRITON_DTYPES,
    differentiable=("feature", "prompt", "highres_feature", "highres_prompt"),
    limits=("inputs of mixed dtypes are cast to their promoted dtype first",),
    backward="Triton kernels: one launch for the feature gradients and per-program prompt partial sums, one "
             "for their fixed-order reduction (deterministic, no atomics)",
)
LOOKS_SUPPORT = TritonSupport(
    op="assign_looks",
    dtypes=(*TRITON_DTYPES, torch.float64),
    differentiable=(),
    limits=("probabilities are ordered by torch.sort (stable, descending); one kernel assigns the looks",),
)


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
    named = {"feature": feature, "prompt": prompt}
    if highres_feature is not None:
        if not isinstance(highres_feature, torch.Tensor) or highres_feature.dim() != 4 or highres_feature.shape[0] != B:
            raise ValueError(f"highres_feature must be ({B}, C2, H2, W2), "
                             f"got {getattr(highres_feature, 'shape', None)}")
        if not isinstance(highres_prompt, torch.Tensor) or tuple(highres_prompt.shape) != (B, highres_feature.shape[1]):
            raise ValueError(f"highres_prompt must be ({B}, {highres_feature.shape[1]}), "
                             f"got {getattr(highres_prompt, 'shape', None)}")
        if min(highres_feature.shape[2:]) < 1:
            raise ValueError(f"highres_feature has an empty map, shape {tuple(highres_feature.shape)}")
        named.update(highres_feature=highres_feature, highres_prompt=highres_prompt)
    for name, t in named.items():
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if t.device != feature.device:
            raise ValueError(f"{name} is on {t.device}, feature on {feature.device}")


def _probs_reasons(feature, prompt, highres_feature, highres_prompt) -> list[str]:
    named = {"feature": feature, "prompt": prompt, "highres_feature": highres_feature,
             "highres_prompt": highres_prompt}
    promoted = feature.new_empty(0, dtype=promoted_dtype(feature, prompt, highres_feature, highres_prompt))
    return dtype_reasons(PROBS_SUPPORT, {"the promoted input": promoted}) + grad_reasons(PROBS_SUPPORT, named)


def selection_probs_not_supported_reasons(feature, prompt, highres_feature=None, highres_prompt=None) -> list[str]:
    """Why the Triton path cannot run these inputs (empty when it can), devices included."""
    return device_reasons([feature, prompt]) + _probs_reasons(feature, prompt, highres_feature, highres_prompt)


register_support(PROBS_SUPPORT, selection_probs_not_supported_reasons)


def selection_probs(
    feature: torch.Tensor,
    prompt: torch.Tensor,
    highres_feature: torch.Tensor | None = None,
    highres_prompt: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatching :func:`selection_probs_reference` (see there); differentiable on both backends.

    Under CUDA autocast the inputs are taken in float32: autocast runs ``F.normalize``, ``sum`` and
    ``softmax`` in float32, so upstream's scoring under AMP (and the reference's) is float32 math
    on the 16-bit inputs' values; the kernel computes the same, and returns float32 as they do.
    """
    _check_probs_args(feature, prompt, highres_feature, highres_prompt)
    if feature.is_cuda and torch.is_autocast_enabled("cuda"):
        feature, prompt, highres_feature, highres_prompt = (
            None if t is None else t.float() for t in (feature, prompt, highres_feature, highres_prompt))
    reasons = _probs_reasons(feature, prompt, highres_feature, highres_prompt)
    if dispatch(PROBS_SUPPORT, reasons, [feature, prompt, highres_feature, highres_prompt]) == "triton":
        from .triton.selection import selection_probs_triton

        return selection_probs_triton(feature, prompt, highres_feature, highres_prompt)
    return selection_probs_reference(feature, prompt, highres_feature, highres_prompt)


def assign_looks_reference(probs: torch.Tensor, quotas: torch.Tensor) -> torch.Tensor:
    """Which look selects each patch of one scale.

    Args:
        probs: ``(B, n)`` selection probabilities of one scale, raster order. Rows of images
            with fewer patches are padded with ``-inf`` (never selected while quotas fit).
        quotas: ``(B, L)`` int ``>= 0``, patches look ``l`` takes from this scale.

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


def _check_looks_args(probs, quotas, checked: bool) -> None:
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError(f"probs must be a (B, n) tensor, got {getattr(probs, 'shape', type(probs).__name__)}")
    if not probs.is_floating_point():
        raise TypeError(f"probs must be floating point, got {probs.dtype}")
    if not isinstance(quotas, torch.Tensor) or quotas.dim() != 2 or quotas.shape[0] != probs.shape[0]:
        raise ValueError(f"quotas must be a ({probs.shape[0]}, num_looks) tensor, "
                         f"got {getattr(quotas, 'shape', type(quotas).__name__)}")
    if quotas.dtype.is_floating_point or quotas.dtype.is_complex or quotas.dtype == torch.bool:
        raise TypeError(f"quotas must be an integer tensor, got {quotas.dtype}")
    values = host_values(quotas, checked)
    if values is not None:
        bad = (values < 0).nonzero()
        if bad.numel():
            b, look = (int(i) for i in bad[0])
            raise ValueError(f"quotas must be >= 0, got quotas[{b}, {look}]={int(values[b, look])}")


def assign_looks_not_supported_reasons(probs, quotas) -> list[str]:
    """Why the Triton path cannot run these inputs (empty when it can), devices included."""
    return device_reasons([probs]) + dtype_reasons(LOOKS_SUPPORT, {"probs": probs})


register_support(LOOKS_SUPPORT, assign_looks_not_supported_reasons)


def assign_looks(probs: torch.Tensor, quotas: torch.Tensor, *, checked: bool | None = None) -> torch.Tensor:
    """Dispatching :func:`assign_looks_reference` (see there).

    ``checked``: also validate quotas that live on the GPU (a device sync); ``None`` reads
    ``PS3_KERNELS_CHECKED``. Quotas on the CPU are always validated.
    """
    _check_looks_args(probs, quotas, checked_mode(checked))
    if dispatch(LOOKS_SUPPORT, dtype_reasons(LOOKS_SUPPORT, {"probs": probs}), [probs]) == "triton":
        from .triton.selection import assign_looks_triton

        return assign_looks_triton(probs, quotas)
    return assign_looks_reference(probs, quotas)
