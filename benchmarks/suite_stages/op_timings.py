"""Stage ``op_timings``: the ops side by side with what they replace, on inputs built before the
timer starts (the attention on a layout's shared tables, as the model calls it; the patch embed
with its tables concatenated): the attention against SDPA (forward, forward+backward; B = 16 and
1 looks of 2560 over the prefix) and once more replayed from a CUDA graph at B = 1 (host against
device time); its launch variants (``launch_variants.py``); the patch gather+embed against the
resize-unfold-select path; selection scoring + look assignment against the reference scoring and
upstream's per-look top-k loop."""

from __future__ import annotations

from typing import Any, Callable

import torch

import bench_patch_embed
import bench_selection
import bench_varlen_attention
from launch_variants import VARIANTS, describe, use_variant
from ps3.bench.harness import error_text, is_oom
from ps3_kernels import use_backend, varlen_prefix_attention
from ps3_kernels.backend import triton_interpreted
from ps3_kernels.varlen_attention import prepare_impl

from . import workloads
from .base import Shapes, Stage, StageContext, WorkItem, calls_s, rel, seed


def record_timing(ctx: StageContext, name: str, shape: str, ours: float | None, peer: str, peer_ms: float | None,
                  **extra: Any) -> None:
    """A ``timings`` row: ratio = peer ms / ours ms (> 1: ours is faster)."""
    ratio = peer_ms / ours if ours and peer_ms else None
    ctx.add("timings", dict(name=name, shape=shape, ours_ms=ours, peer=peer, peer_ms=peer_ms, ratio=ratio, **extra))
    ctx.log(f"{name} [{shape}] ours {ours} vs {peer} {peer_ms} (x{ratio})")


def attempt(ctx: StageContext, fn: Callable[[], float]) -> tuple[float | None, str | None]:
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run a case is a result
        if is_oom(exc):
            ctx.free()
        return None, error_text(exc)


# ----------------------------------------------------------------------------- attention


def attention_shape(sh: Shapes, batch: int) -> str:
    return f"B={batch} looks of {sh.look} + prefix {sh.prefix_len}, {sh.heads}x{sh.head_dim} bf16"


def attention_case(ctx: StageContext, batch: int) -> tuple[dict[str, Any], torch.Tensor, list[torch.Tensor], str]:
    """Inputs of ``batch`` looks over their prefixes, built once per batch and shared by the items."""
    key = ("attention", batch)
    if key not in ctx.state:
        ctx.state.clear()
        ctx.free()
        sh = ctx.shapes
        case = bench_varlen_attention.make_case([sh.look] * batch, list(range(batch)), torch.bfloat16, sh.device,
                                                seed=seed(), heads=sh.heads, head_dim=sh.head_dim,
                                                prefix_len=sh.prefix_len)
        leaves = [case[n].requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]
        ctx.state[key] = (case, torch.randn_like(case["q"]), leaves, attention_shape(sh, batch))
    return ctx.state[key]


def time_attention(ctx: StageContext, impl: str, case: dict[str, Any], grad_out: torch.Tensor,
                   leaves: list[torch.Tensor], mode: str, graph: bool = False) -> float:
    """Median ms of the op forward, or forward+backward to q/k/v/prefix (inputs prebuilt)."""
    if mode == "fwd":  # inputs that do not require grad (FlexAttention on the CPU refuses any that do)
        case = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    with torch.set_grad_enabled(mode == "fwd_bwd"):
        fn = prepare_impl(impl, **case)
        if mode == "fwd":
            return ctx.bench(fn, graph=graph).ms
        return ctx.bench(lambda: fn().backward(grad_out, retain_graph=True), grad_to_none=leaves).ms


def attention_vs_sdpa(ctx: StageContext, batch: int, mode: str) -> None:
    case, grad_out, leaves, shape = attention_case(ctx, batch)
    flops = bench_varlen_attention.forward_flops(case) * (3.5 if mode == "fwd_bwd" else 1.0)
    ours, err = attempt(ctx, lambda: time_attention(ctx, "triton", case, grad_out, leaves, mode))
    peer, peer_err = attempt(ctx, lambda: time_attention(ctx, "sdpa", case, grad_out, leaves, mode))
    record_timing(ctx, f"attention {mode}", shape, ours, "sdpa (padded, concatenated prefix)", peer,
                  ours_tflops_per_s=flops / (ours * 1e-3) / 1e12 if ours else None, error=err or peer_err)


def attention_graph(ctx: StageContext, batch: int) -> None:
    """The forward replayed from a CUDA graph against the same calls made eagerly: the gap is host work."""
    case, grad_out, leaves, shape = attention_case(ctx, batch)
    if not ctx.cuda:
        record_timing(ctx, "attention fwd (CUDA graph replay)", shape, None, "ours, eager", None,
                      error="CUDA graphs need a GPU (dry run)")
        return
    ours, err = attempt(ctx, lambda: time_attention(ctx, "triton", case, grad_out, leaves, "fwd", graph=True))
    eager, eager_err = attempt(ctx, lambda: time_attention(ctx, "triton", case, grad_out, leaves, "fwd"))
    record_timing(ctx, "attention fwd (CUDA graph replay)", shape, ours, "ours, eager", eager,
                  host_ms=eager - ours if ours and eager else None, error=err or eager_err)


def attention_variant_error(case: dict[str, Any], grad_out: torch.Tensor, backward: bool) -> float:
    """Worst relative error of the Triton op (forward, or gradients) against the float32 reference."""
    exact = {n: (t.detach().float().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
             for n, t in case.items()}
    mine = {n: (t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in case.items()}
    ref = varlen_prefix_attention(**exact, impl="torch")
    out = varlen_prefix_attention(**mine, impl="triton")
    if not backward:
        return rel(out, ref)
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    ref.backward(grad_out.float())
    out.backward(grad_out)
    return max(rel(mine[n].grad, exact[n].grad) for n in names)


def run_variants(ctx: StageContext, op: str, shape: str, time_one: Callable[[], float],
                 error_of: Callable[[], float], tol: float) -> None:
    """Time every variant of ``op`` (after checking it computes the same function); record the winner.
    The default is timed twice: a win smaller than twice that spread is not a decision."""
    candidates = []
    for variant in VARIANTS[op]:
        entry: dict[str, Any] = dict(name=variant.name, config=describe(variant, ctx.dry_run))
        try:
            with use_variant(variant, interpreted=triton_interpreted()):
                entry["rel_err"] = error_of()
                entry["ms"] = time_one() if entry["rel_err"] <= tol else None
            entry["status"] = "ok" if entry["rel_err"] <= tol else "wrong"
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a result
            entry.update(status="failed", error=error_text(exc))
            if is_oom(exc):
                ctx.free()
        candidates.append(entry)
    timed = [c for c in candidates if c.get("ms")]
    winner = min(timed, key=lambda c: c["ms"])["name"] if timed else None
    default_ms = next((c.get("ms") for c in candidates if c["name"] == "default"), None)
    record = dict(op=op, shape=shape, candidates=candidates, winner=winner, speedup_vs_default=None, noise=None)
    if timed and default_ms:
        repeat, _ = attempt(ctx, time_one)
        record.update(speedup_vs_default=default_ms / min(c["ms"] for c in timed), default_repeat_ms=repeat,
                      noise=abs(repeat - default_ms) / default_ms if repeat else None)
        record["decisive"] = record["noise"] is not None and record["speedup_vs_default"] - 1 > 2 * record["noise"]
    ctx.add("variants", record)
    ctx.log(f"variants {op} [{shape}]: winner {winner}: {candidates}")


def attention_variants(ctx: StageContext, batch: int, op: str) -> None:
    case, grad_out, leaves, shape = attention_case(ctx, batch)
    mode = "fwd" if op == "attention_fwd" else "fwd_bwd"
    run_variants(ctx, op, shape, lambda: time_attention(ctx, "triton", case, grad_out, leaves, mode),
                 lambda: attention_variant_error(case, grad_out, mode == "fwd_bwd"), 2e-2)


# ----------------------------------------------------------------------------- patch embed, selection


def patch_case(ctx: StageContext, batch: int) -> tuple[dict[str, Any], Callable[[], torch.Tensor], str]:
    key = ("patch", batch)
    if key not in ctx.state:
        ctx.state.clear()
        ctx.free()
        sh = ctx.shapes
        case = bench_patch_embed.make_case(list(sh.scales), batch, sh.patch_tokens, torch.bfloat16, sh.device,
                                           patch=sh.patch, width=sh.width, seed=seed())
        shape = f"B={batch} {sh.resolution} px, {sh.patch_tokens} tokens/image, width {sh.width} bf16"
        ctx.state[key] = (case, bench_patch_embed.prepare_embed(case), shape)
    return ctx.state[key]


def patch_embed_timing(ctx: StageContext, batch: int) -> None:
    case, ours_fn, shape = patch_case(ctx, batch)
    with use_backend("triton"):
        ours, err = attempt(ctx, lambda: ctx.bench(ours_fn).ms)
    peer, peer_err = attempt(ctx, lambda: ctx.bench(lambda: bench_patch_embed.upstream_embed(case)).ms)
    record_timing(ctx, "patch gather+embed", shape, ours, "torch (resize whole image, unfold, select)", peer,
                  error=err or peer_err)


def patch_embed_variants(ctx: StageContext, batch: int) -> None:
    case, ours_fn, shape = patch_case(ctx, batch)
    ref = bench_patch_embed.upstream_embed(case)

    def error_of() -> float:
        with use_backend("triton"):
            return rel(ours_fn(), ref)

    def time_one() -> float:
        with use_backend("triton"):
            return ctx.bench(ours_fn).ms

    run_variants(ctx, "patch_embed", shape, time_one, error_of, 1e-2)


def selection_timing(ctx: StageContext, batch: int) -> None:
    """Scoring + look assignment (Triton) against the reference scoring + upstream's per-look loop."""
    sh = ctx.shapes
    case = bench_selection.make_case(list(sh.scales), batch, sh.looks, sh.patch_tokens, torch.float32, sh.device,
                                     channels=sh.width, hr_channels=sh.sel_hr_channels, hr_grid=sh.sel_hr_grid,
                                     low_grid=sh.low_grid, seed=seed())

    def ours_fn():
        with use_backend("triton"):
            return bench_selection.assign(bench_selection.per_scale(bench_selection.score(case), case["grids"]), case)

    def peer_fn():
        with use_backend("torch"):
            scaled = bench_selection.per_scale(bench_selection.score(case), case["grids"])
            return bench_selection.upstream_assign(scaled, case)

    ours, err = attempt(ctx, lambda: ctx.bench(ours_fn).ms)
    peer, peer_err = attempt(ctx, lambda: ctx.bench(peer_fn).ms)
    record_timing(ctx, "selection score+assign", f"B={batch}, {sh.looks} looks of {sh.patch_tokens}, fp32", ours,
                  "torch scoring + upstream per-look top-k loop", peer, error=err or peer_err)


# ----------------------------------------------------------------------------- plan


def items(sh: Shapes) -> list[WorkItem]:
    calls = sum(sh.op_timer)
    out = []
    for b in sh.time_batches:  # the full batch first: that is where the variants matter most
        # (ms per call guessed from the FLOPs at ~300 TFLOP/s, the padded SDPA at a third of that)
        fwd_ms, sdpa_ms = 0.15 * b + 0.3, 0.45 * b + 0.3
        attention = (workloads.attention(sh, "bf16", b, True),)
        out += [
            WorkItem(f"attention fwd B={b} against SDPA", calls_s(fwd_ms + sdpa_ms, calls, 1.0),
                     lambda ctx, b=b: attention_vs_sdpa(ctx, b, "fwd"), attention),
            WorkItem(f"attention fwd_bwd B={b} against SDPA", calls_s(3.5 * (fwd_ms + sdpa_ms), calls),
                     lambda ctx, b=b: attention_vs_sdpa(ctx, b, "fwd_bwd"), attention),
        ]
        if b == 1:
            out.append(WorkItem("attention fwd B=1 as a CUDA graph", calls_s(2 * fwd_ms, 2 * calls),
                                lambda ctx: attention_graph(ctx, 1), attention))
        for op, mode in (("attention_fwd", "fwd"), ("attention_bwd", "fwd_bwd")):
            per_call = fwd_ms * (3.5 if mode == "fwd_bwd" else 1)
            out.append(WorkItem(f"{op} variants B={b}", len(VARIANTS[op]) * calls_s(per_call, calls + 5, 0.5),
                                lambda ctx, b=b, op=op: attention_variants(ctx, b, op),
                                tuple(workloads.attention(sh, "bf16", 1, True, mode == "fwd_bwd", v)
                                      for v in VARIANTS[op])))
    for b in sh.time_batches:
        embed = (workloads.patch_embed(sh, "bf16", b, backward=False),)
        out += [
            WorkItem(f"patch embed B={b} against resize+unfold", calls_s(0.1 * b + 2.0 * b, calls, 1.0),
                     lambda ctx, b=b: patch_embed_timing(ctx, b), embed),
            WorkItem(f"patch_embed variants B={b}", len(VARIANTS["patch_embed"]) * calls_s(0.1 * b, calls + 2, 0.5),
                     lambda ctx, b=b: patch_embed_variants(ctx, b),
                     tuple(workloads.patch_embed(sh, "bf16", 1, False, v) for v in VARIANTS["patch_embed"])),
        ]
    for b in sh.time_batches:
        out.append(WorkItem(f"selection B={b} against upstream's loop", calls_s(0.2 + 1.0 * b, calls),
                            lambda ctx, b=b: selection_timing(ctx, b), (workloads.selection(sh, "fp32", b),)))
    return out


STAGE = Stage("op_timings", 0.06, __doc__.split("\n\n")[0], items)
