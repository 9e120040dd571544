"""Candidate launch configurations for the hot kernels, timed side by side by ``gpu_suite.py``.

No GPU was at hand when the defaults in ``ps3_kernels/triton/*._launch_config`` were chosen, so
one run on the GPU machine should pick them on evidence: for the attention forward, the
attention backward (dQ and dK/dV kernels together) at head dim 72 and for the patch embed,
up to three configurations each, the first being the library's own default. A variant is
applied by patching the kernel module's ``_launch_config`` (the single call-time source of
launch parameters) for the duration of a ``with use_variant(...)`` block, so the library code
runs unchanged. ``benchmarks/aot_report.py`` compiles every variant for sm_90 as well
(registers, spills, shared memory), so a variant that spills is known before it is timed.

Under the CPU interpreter (``--dry-run``) the variants are tiny tiles: the plumbing is the same,
the numbers mean nothing.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Any, Iterator

ATTENTION_MODULE = "ps3_kernels.triton.varlen_attention"
PATCH_EMBED_MODULE = "ps3_kernels.triton.patch_embed"


@dataclass(frozen=True)
class Variant:
    """One launch configuration of one op.

    ``override``: for attention a dict merged into ``_launch_config``'s result (keys ``fwd``,
    ``dq``, ``dkdv``; values ``(BLOCK_M, BLOCK_N, num_warps, num_stages)``); for the patch embed
    the whole ``(BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages)`` tuple. ``None`` keeps the
    library's default.
    """

    op: str  # "attention_fwd" | "attention_bwd" | "patch_embed"
    name: str
    override: Any = None
    interpreted_override: Any = None  # the same idea at interpreter-sized tiles (dry run)

    @property
    def module(self) -> str:
        return PATCH_EMBED_MODULE if self.op == "patch_embed" else ATTENTION_MODULE

    def config(self, interpreted: bool) -> Any:
        return self.interpreted_override if interpreted else self.override


# Head dim 72 runs as a 64-wide and a 16-wide tile. Defaults: forward (128, 64, 8 warps, 3 stages);
# dQ (128, 32, 8, 3); dK/dV (32 queries per step, 128 keys per program, 8, 3). Every variant below
# compiles for sm_90a without spills (benchmarks/results/aot-sm90.json); register counts in brackets.
VARIANTS: dict[str, tuple[Variant, ...]] = {
    "attention_fwd": (
        Variant("attention_fwd", "default"),  # (198 regs x 256 threads: one program per SM)
        # One warpgroup on 64 query rows (206 x 128: two programs per SM), twice the programs:
        # the low-res pass at batch 1 fills only 96 of 132 SMs with 128-row blocks.
        Variant("attention_fwd", "m64_w4", {"fwd": (64, 64, 4, 3)}, {"fwd": (32, 16, 1, 1)}),
        # Narrow key tiles, deeper pipeline (142 x 128: three programs per SM).
        Variant("attention_fwd", "m64_n32_s4", {"fwd": (64, 32, 4, 4)}, {"fwd": (16, 32, 1, 1)}),
    ),
    "attention_bwd": (
        Variant("attention_bwd", "default"),  # (dQ 142, dK/dV 254 regs x 256 threads)
        # One warpgroup per program, 64x64 dQ tiles and 64-key dK/dV blocks (212 / 246 x 128).
        Variant("attention_bwd", "w4_64", {"dq": (64, 64, 4, 3), "dkdv": (32, 64, 4, 3)},
                {"dq": (32, 16, 1, 1), "dkdv": (16, 32, 1, 1)}),
        # Small dQ tiles, 16-query steps in dK/dV (142 x 128 / 211 x 256).
        Variant("attention_bwd", "m64_q16", {"dq": (64, 32, 4, 3), "dkdv": (16, 128, 8, 3)},
                {"dq": (32, 32, 1, 1), "dkdv": (32, 16, 1, 1)}),
    ),
    "patch_embed": (
        Variant("patch_embed", "default"),  # (248 regs, mma.sync: 32-row blocks are too short for wgmma)
        # Half the K step, one more stage: 135 registers, the pixel math has room.
        Variant("patch_embed", "k16_s3", (32, 256, 16, 8, 3), (32, 32, 32, 1, 1)),
        # 64 tokens per program at 128 channels: the dots become wgmma (236 registers).
        Variant("patch_embed", "t64_n128_k16", (64, 128, 16, 8, 3), (64, 32, 64, 1, 1)),
    ),
}


def _merged(op: str, base: Any, override: Any) -> Any:
    if op == "patch_embed":
        if not (isinstance(base, tuple) and len(base) == len(override)):
            raise TypeError(f"patch_embed _launch_config returned {base!r}; the variants expect a "
                            f"{len(override)}-tuple (BLOCK_T, BLOCK_N, BLOCK_K, num_warps, num_stages)")
        return tuple(override)
    if not (isinstance(base, dict) and set(override) <= set(base)):
        raise TypeError(f"attention _launch_config returned {base!r}; the variants expect a dict with keys {sorted(override)}")
    return {**base, **override}


@contextlib.contextmanager
def use_variant(variant: Variant, interpreted: bool = False) -> Iterator[None]:
    """Run a block with ``variant``'s launch configuration on every call of the op's kernels.

    The block should call the op only at the shape the variant is meant for (head dim 72,
    16-bit dtypes); the override applies to every launch inside it.
    """
    override = variant.config(interpreted)
    if override is None:
        yield
        return
    module = importlib.import_module(variant.module)
    original = module._launch_config

    def patched(*args, **kwargs):
        return _merged(variant.op, original(*args, **kwargs), override)

    module._launch_config = patched
    try:
        yield
    finally:
        module._launch_config = original


def describe(variant: Variant, interpreted: bool = False) -> str:
    """Human-readable configuration, e.g. ``fwd=(64, 64, 4, 3)``."""
    override = variant.config(interpreted)
    if override is None:
        return "library default"
    if isinstance(override, dict):
        return ", ".join(f"{k}={tuple(v)}" for k, v in override.items())
    return str(tuple(override))
