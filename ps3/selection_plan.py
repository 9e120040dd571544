"""Host-side planning of looks: how many patches each look takes from each scale.

Quotas depend only on image geometry and the look arguments, never on pixel values, so they
are computed in Python ints before any device work (no host sync), exactly as upstream PS3
computes them per look (floors, remainders to the last scale, carry-over of what a scale
cannot supply to the next scale).
"""

from __future__ import annotations

import math

from .validation import LookArgs


def default_quotas(max_select_num: int, scales: list[int]) -> list[int]:
    """Split ``max_select_num`` over the high-res scales by pixel count; remainder to the last."""
    pixels = [s * s for s in scales]
    quotas = [int(max_select_num * pixels[i] / sum(pixels[1:])) for i in range(1, len(pixels))]
    quotas[-1] += max_select_num - sum(quotas)
    return quotas


def look_quotas(max_each: list[int], num_select_token: int | None, first_n: int | None,
                token_arg: str = "num_token_look_close") -> list[int]:
    """One look's quota per scale: ``max_each``, or ``num_select_token`` split the same way, moved to
    the first ``first_n`` scales; ``token_arg`` names the token count in errors."""
    total = sum(max_each)
    quotas = list(max_each)
    if num_select_token is not None:
        quotas = [int(x * num_select_token / total) for x in max_each]
        quotas[-1] += num_select_token - sum(quotas)
    if first_n is not None:
        kept, all_ = sum(quotas[:first_n]), sum(quotas)
        if kept == 0:
            raise ValueError(
                f"{token_arg} leaves no quota on the first {first_n} scales of a look "
                f"({quotas}), so only_select_first_n_scale={first_n} cannot be applied (upstream divides by zero)"
            )
        quotas = [int(x / kept * all_) if i < first_n else 1 for i, x in enumerate(quotas)]
        quotas[-1] += total - sum(quotas)
    return quotas


def plan_looks(
    num_patches: list[int],
    max_each: list[int],
    num_look_close: int | str | None,
    num_token_look_close: int | str | None,
    first_n: int | None = None,
    first_n_for_limit: int | None = None,
) -> list[list[int]]:
    """Quotas ``[look][scale]`` for one image.

    Args:
        num_patches: patches per high-res scale of this image.
        max_each: per-look budget per scale (``max_select_num_each_scale``).
        num_look_close: int >= 0, ``"all"`` or None.
        num_token_look_close: int >= 0, ``"all"`` or None (exclusive with ``num_look_close``).
        first_n: this image's ``only_select_first_n_scale``.
        first_n_for_limit: the value that bounds the number of looks (upstream uses the
            batch maximum of ``only_select_first_n_scale``); defaults to ``first_n``.
    """
    if num_look_close == 0 or num_token_look_close == 0:
        return []
    total = sum(max_each)
    if total == 0:
        raise ValueError(f"the per-look quotas {list(max_each)} are all 0, so no look can select a patch")
    limit_n = first_n_for_limit if first_n_for_limit is not None else first_n
    reachable = sum(num_patches[: limit_n if limit_n is not None else len(num_patches)])
    last_tokens = None
    if num_look_close == "all" or num_token_look_close == "all":
        looks = math.ceil(reachable / total)
        first_tokens = None
    elif num_look_close is not None:
        looks = min(num_look_close, math.ceil(reachable / total))
        first_tokens = None
    elif num_token_look_close is not None:
        tokens = min(num_token_look_close, reachable)
        looks = math.ceil(tokens / total)
        last_tokens = tokens % total or total
        first_tokens = tokens if tokens <= total else None
    else:
        raise ValueError("one of num_look_close or num_token_look_close is required when output_hidden_states=True")

    taken = [0] * len(num_patches)
    plan = []
    for look in range(looks):
        select_token = first_tokens if look == 0 else (last_tokens if look == looks - 1 else None)
        quotas = look_quotas(max_each, select_token, first_n)
        for i, n in enumerate(num_patches):
            available = n - taken[i]
            if available < quotas[i]:
                if i < len(quotas) - 1:
                    quotas[i + 1] += quotas[i] - available
                quotas[i] = available
        if any(q < 0 for q in quotas):
            raise ValueError(
                f"only_select_first_n_scale={first_n} leaves a negative quota {quotas} for look {look} "
                "(upstream PS3 fails on this setting too); use a larger value"
            )
        taken = [t + q for t, q in zip(taken, quotas)]
        plan.append(quotas)
    return plan


def plan_batch(patches: list[list[int]], max_each: list[int], args: LookArgs, output_hidden_states: bool,
               batched: bool) -> list[list[list[int]]]:
    """Quotas ``[image][look][scale]`` of images with ``patches[b][s]`` patches per high-res scale.
    Pre-training (``output_hidden_states=False``) looks once; in a ``(B, 3, H, W)`` batch the largest
    ``only_select_first_n_scale`` bounds every image's looks, as upstream's does."""
    if not output_hidden_states:
        return [plan_looks(n, max_each, 1, None)[:1] for n in patches]
    limit = max(args.first_n) if batched and args.first_n is not None else None
    tokens = args.num_token_look_close
    tokens = tokens if isinstance(tokens, list) else [tokens] * len(patches)
    return [plan_looks(n, max_each, args.num_look_close, t, f, limit)
            for n, t, f in zip(patches, tokens, args.first_n or [None] * len(patches))]
