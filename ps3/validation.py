"""Argument checks for the vision forward: clear errors instead of upstream's asserts."""

from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch

from ps3_kernels import backend


@dataclass
class LookArgs:
    prompt: torch.Tensor | None
    gt_maps: list[torch.Tensor] | None
    is_global_text: torch.Tensor | None
    num_look_close: int | str | None
    num_token_look_close: int | str | list[int] | None
    first_n: list[int] | None
    quotas: list[int] | None = None  # a per-call select_num_each_scale; None: the config's


def check_images(x, low_res: int, patch: int) -> tuple[list[torch.Tensor], bool]:
    """Images as a list of ``(3, H, W)`` tensors, and whether the input was one batch tensor."""
    if isinstance(x, torch.Tensor):
        if x.dim() != 4:
            raise ValueError(f"pixel_values must be a (B, 3, H, W) tensor or a list of (3, H, W) tensors, got shape {tuple(x.shape)}")
        images, batched = list(x.unbind(0)), True
    elif isinstance(x, (list, tuple)):
        if not x:
            raise ValueError("pixel_values is an empty list")
        images = []
        for i, im in enumerate(x):
            if not isinstance(im, torch.Tensor):
                raise TypeError(f"pixel_values[{i}] must be a tensor, got {type(im).__name__}")
            if im.dim() == 4 and im.shape[0] == 1:
                im = im[0]
            if im.dim() != 3:
                raise ValueError(f"pixel_values[{i}] must be (3, H, W), got shape {tuple(im.shape)}")
            images.append(im)
        batched = False
    else:
        raise TypeError(f"pixel_values must be a tensor or a list of tensors, got {type(x).__name__}")
    if not images:
        raise ValueError("pixel_values holds no image")
    for i, im in enumerate(images):
        if im.shape[0] != 3:
            raise ValueError(f"pixel_values[{i}] must have 3 channels, got {im.shape[0]}")
        if not im.is_floating_point():
            raise TypeError(f"pixel_values must be floating point (normalized pixels), got {im.dtype}")
        if max(im.shape[1:]) < low_res or min(im.shape[1:]) < 1:
            raise ValueError(
                f"pixel_values[{i}] is {tuple(im.shape[1:])}; its longer side must be at least the low-res scale {low_res}"
            )
        if im.device != images[0].device or im.dtype != images[0].dtype:
            raise ValueError("all images in pixel_values must share one device and dtype")
    return images, batched


def _as_int(value) -> int | None:
    """``value`` as an int when it is one (ints, numpy ints, 0-d int tensors; not bools), else None."""
    if isinstance(value, (bool, np.bool_, str)):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _check_look_count(name: str, value, allow_list: bool, batch: int):
    if value is None or (isinstance(value, str) and value == "all"):
        return value
    if allow_list and isinstance(value, (list, tuple)):
        if len(value) != batch:
            raise ValueError(f"{name} as a list needs one entry per image ({batch}), got {len(value)}")
        return [_check_look_count(name, v, False, batch) for v in value]
    count = _as_int(value)
    if count is None or count < 0:  # the message is formatted only here: torch.compile cannot format a symbolic int
        raise ValueError(f"{name} must be an int >= 0 or 'all'{' or a per-image list' if allow_list else ''}, got {value!r}")
    return count


def _check_gt_maps(gt, batch: int) -> list[torch.Tensor]:
    if isinstance(gt, torch.Tensor):
        if gt.dim() != 3 or gt.shape[0] != batch:
            raise ValueError(f"gt_selection_maps must be a (B={batch}, H, W) tensor, got shape {tuple(gt.shape)}")
        return list(gt.unbind(0))
    if isinstance(gt, (list, tuple)) and len(gt) == batch and all(isinstance(g, torch.Tensor) and g.dim() == 2 for g in gt):
        return list(gt)
    raise ValueError(f"gt_selection_maps must be a (B={batch}, H, W) tensor or a list of {batch} (H, W) tensors")


def _check_quotas(value, num_high: int) -> list[int]:
    quotas = [_as_int(q) for q in value] if isinstance(value, (list, tuple)) and len(value) == num_high else [None]
    if all(q is not None and q >= 0 for q in quotas):
        return quotas
    raise ValueError(f"select_num_each_scale must hold one int >= 0 per high-res scale ({num_high}), got {value!r}")


def check_flag(name: str, value) -> bool:
    """Switches take bools only: ``0.5`` or ``'false'`` would otherwise silently mean True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def _check_device(name: str, tensor: torch.Tensor, device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the images are on {device}; move it with .to({str(device)!r})")


def check_map(name: str, t, lead: tuple[int, int], what: str, device: torch.device) -> None:
    """A floating ``(B, C, h, w)`` map with the given ``(B, C)`` on ``device``."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4 or tuple(t.shape[:2]) != lead:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be (B={lead[0]}, {lead[1]}, h, w): {what}, got {got}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")
    _check_device(name, t, device)


def check_prompt(prompt, batch: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """A ``(B, width)`` floating prompt on the images' device, cast to their dtype (or None)."""
    if prompt is None:
        return None
    if not isinstance(prompt, torch.Tensor) or prompt.shape != (batch, width):
        shape = tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__
        raise ValueError(f"prompt must be a (B={batch}, {width}) tensor, got {shape}")
    if not prompt.is_floating_point():
        raise TypeError(f"prompt must be a floating-point embedding, got {prompt.dtype}")
    _check_device("prompt", prompt, device)
    return prompt.to(dtype)


def check_gt_maps(gt_selection_maps, batch: int, device: torch.device) -> list[torch.Tensor] | None:
    """Ground-truth maps as ``batch`` non-empty real ``(H, W)`` tensors on the images' device (or None)."""
    if gt_selection_maps is None:
        return None
    gt_maps = _check_gt_maps(gt_selection_maps, batch)
    for i, gt in enumerate(gt_maps):
        _check_device("gt_selection_maps", gt, device)
        if gt.numel() == 0:
            raise ValueError(f"gt_selection_maps[{i}] is empty ({tuple(gt.shape)}); give at least a 1x1 map")
        if gt.is_complex():
            raise TypeError(f"gt_selection_maps must be real (bool, integer or float), got {gt.dtype}")
    return gt_maps


def check_first_n(first_n, batch: int, num_high: int) -> list[int] | None:
    """``only_select_first_n_scale`` as one int in ``[1, num_high]`` per image (or None)."""
    if first_n is None:
        return None
    values = [_as_int(v) for v in (first_n if isinstance(first_n, (list, tuple)) else [first_n] * batch)]
    if len(values) != batch or any(v is None or not 1 <= v <= num_high for v in values):
        raise ValueError(f"only_select_first_n_scale must be an int in [1, {num_high}] or a list of {batch} such ints, got {first_n!r}")
    return values


def check_num_select_token(value, budget: int) -> int | None:
    """``get_selection_maps``' token count: an int in ``[0, budget]`` (the per-look budget) or None."""
    if value is None:
        return None
    count = _as_int(value)
    if count is None or not 0 <= count <= budget:
        raise ValueError(f"num_select_token must be an int in [0, {budget}] (the per-look budget), got {value!r}")
    return count


def values_checkable(t: torch.Tensor) -> bool:
    """Whether argument values may be read on the host: free for CPU tensors; for device tensors
    only in checked mode (``PS3_KERNELS_CHECKED=1``), as the ops treat their metadata."""
    return backend.host_readable(t) or (backend.checked_mode(None) and not torch.compiler.is_compiling())


def check_is_global_text(is_global_text, batch: int, device: torch.device) -> torch.Tensor | None:
    """Upstream mixes the two pooled outputs with ``is_global_text`` (multiplying by it), so a bool
    or a 0/1 integer or floating tensor of shape (B,) or (B, 1) works there. Returned as a bool
    (B, 1) mask; its values are checked where that needs no device sync (see
    :func:`values_checkable`), otherwise any non-zero entry counts as 1."""
    if is_global_text is None:
        return None
    ok_shape = isinstance(is_global_text, torch.Tensor) and tuple(is_global_text.shape) in ((batch,), (batch, 1))
    if not ok_shape or is_global_text.is_complex():
        got = (f"{tuple(is_global_text.shape)} {is_global_text.dtype}" if isinstance(is_global_text, torch.Tensor)
               else repr(is_global_text))
        raise ValueError(f"is_global_text must be a bool or 0/1 integer or floating tensor of shape (B,) or (B, 1) "
                         f"with B={batch}, got {got}")
    _check_device("is_global_text", is_global_text, device)
    if is_global_text.dtype != torch.bool and values_checkable(is_global_text):
        values = is_global_text.detach().reshape(-1).cpu()
        bad = ((values != 0) & (values != 1)).nonzero()
        if bad.numel():
            i = int(bad[0])
            raise ValueError(f"is_global_text must hold only 0 and 1 (or bools), "
                             f"got is_global_text[{i}]={values[i].item()!r}")
    return (is_global_text != 0).reshape(batch, 1)


def check_look_args(
    images, batched, width, num_high, prompt, gt_selection_maps, is_global_text, output_hidden_states,
    pool_gt_token_only, num_look_close, num_token_look_close, only_select_first_n_scale, select_num_each_scale=None,
) -> LookArgs:
    batch, device = len(images), images[0].device
    output_hidden_states = check_flag("output_hidden_states", output_hidden_states)
    pool_gt_token_only = check_flag("pool_gt_token_only", pool_gt_token_only)
    prompt = check_prompt(prompt, batch, width, device, images[0].dtype)
    num_look_close = _check_look_count("num_look_close", num_look_close, False, batch)
    num_token_look_close = _check_look_count("num_token_look_close", num_token_look_close, True, batch)
    if num_look_close is not None and num_token_look_close is not None:
        raise ValueError("give only one of num_look_close and num_token_look_close")
    if batched and isinstance(num_token_look_close, list) and len(set(num_token_look_close)) > 1:
        raise ValueError(
            "num_token_look_close with different per-image counts needs pixel_values as a list of images "
            "(a (B, 3, H, W) batch returns one (B, N, C) tensor, so every image needs the same count)"
        )
    first_n = check_first_n(only_select_first_n_scale, batch, num_high)
    if output_hidden_states:
        if num_look_close is None and num_token_look_close is None:
            raise ValueError("output_hidden_states=True needs num_look_close or num_token_look_close")
    elif num_look_close is not None or num_token_look_close is not None or first_n is not None:
        raise ValueError("output_hidden_states=False (pre-training mode) takes no num_look_close, num_token_look_close or only_select_first_n_scale")
    gt_maps = check_gt_maps(gt_selection_maps, batch, device)
    if pool_gt_token_only and (gt_maps is None or output_hidden_states):
        raise ValueError("pool_gt_token_only needs gt_selection_maps and output_hidden_states=False")
    is_global_text = check_is_global_text(is_global_text, batch, device)
    quotas = None if select_num_each_scale is None else _check_quotas(select_num_each_scale, num_high)
    return LookArgs(prompt, gt_maps, is_global_text, num_look_close, num_token_look_close, first_n, quotas)
