"""Stage ``peers``: the attention op against other libraries' varlen attention on the same prebuilt
inputs, the cheap peers first: xformers (when its carried wheel matches this machine's torch and
CUDA; else its rows say why not), then FlexAttention, compiled per case (Dynamo's recompile limit
raised, so it never falls back to eager silently), each compile started only when the time left
covers its estimate."""

from __future__ import annotations

import json
import warnings

from ps3_kernels.varlen_attention import available_impls

from .base import Shapes, Stage, StageContext, WorkItem, calls_s
from .op_timings import attempt, attention_case, attention_shape, record_timing, time_attention

# Guessed without a GPU (GPU_NOTES.md: forward and forward+backward together took ~50-100 s):
# the block mask and the forward graph compile on a case's first forward call, the joint
# forward+backward graph on its first backward call.
FLEX_COMPILE_S = {"fwd": 30.0, "fwd_bwd": 45.0}


def _raise_recompile_limits() -> None:
    import torch._dynamo

    # FlexAttention recompiles per shape; past the limit Dynamo would silently run it eagerly.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


def unavailable(ctx: StageContext, impl: str) -> str | None:
    """Why ``impl`` cannot run here (None: it can)."""
    if impl in available_impls():
        return None
    if impl == "xformers":
        try:
            wheel = json.loads((ctx.work / "peer_wheels.json").read_text()).get("xformers")
        except (OSError, ValueError):
            wheel = None
        return f"xformers is not importable ({wheel or 'no wheel in .whl/peers (benchmarks/carry_wheels.sh)'})"
    return f"{impl} is not importable here"


def peer_timing(ctx: StageContext, impl: str, batch: int, mode: str) -> None:
    """The peer and the Triton op on the same inputs; a peer that falls back to eager says so."""
    reason = unavailable(ctx, impl)
    if reason is not None:
        record_timing(ctx, f"attention {mode}", attention_shape(ctx.shapes, batch), None, impl, None,
                      status="skipped", error=reason)
        return
    case, grad_out, leaves, shape = attention_case(ctx, batch)
    if impl == "flex":
        _raise_recompile_limits()
    ours, err = attempt(ctx, lambda: time_attention(ctx, "triton", case, grad_out, leaves, mode))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peer, peer_err = attempt(ctx, lambda: time_attention(ctx, impl, case, grad_out, leaves, mode))
    eager = [str(w.message)[:200] for w in caught if "compile" in str(w.message).lower()]
    record_timing(ctx, f"attention {mode}", shape, ours, impl + (" (eager!)" if eager else ""), peer,
                  error=err or peer_err or (eager[0] if eager else None))


def _skip(impl: str, batch: int, mode: str):
    def record(ctx: StageContext, reason: str) -> None:
        record_timing(ctx, f"attention {mode}", attention_shape(ctx.shapes, batch), None, impl, None, status="skipped",
                      error=reason)
    return record


def items(sh: Shapes) -> list[WorkItem]:
    calls = sum(sh.op_timer)
    out = []
    for impl in ("xformers", "flex"):
        # B = 16 forward, B = 1 forward, then the forward+backward compiles (optional: they do not fit
        # the budget cold and run only when the earlier ones left the time).
        for mode in ("fwd", "fwd_bwd"):
            for b in sh.time_batches:
                ms = (0.15 * b + 0.3) * (3.5 if mode == "fwd_bwd" else 1.0)
                compile_s = FLEX_COMPILE_S[mode] if impl == "flex" and sh.gpu else 0.0
                out.append(WorkItem(f"{impl} {mode} B={b}", compile_s + calls_s(3 * ms, 2 * calls, 1.0),
                                    lambda ctx, i=impl, b=b, m=mode: peer_timing(ctx, i, b, m),
                                    optional=impl == "flex" and mode == "fwd_bwd" and sh.gpu,
                                    on_skip=_skip(impl, b, mode)))
    return out


STAGE = Stage("peers", 0.20, __doc__.split("\n\n")[0], items)
