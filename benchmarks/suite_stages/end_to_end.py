"""Stage ``end_to_end``: PS3-4K with SO400M shapes in bf16 at 3780 px, B = 1 and 16, 1 and 6
looks: this project; S2 and AnyRes on the same trunk at B = 1; upstream PS3 (its own worker
process, from the carried wheels) before S2 and AnyRes at B = 16. One timer for all of them
(``harness.measure_call``: peak memory of the first warm-up call, then the median of counted,
L2-flushed, event-timed calls); TFLOP/s from FLOPs counted once per method on the meta device
(linear in the batch); ``ratio_to_floor`` = ms / (FLOPs at the measured bf16 GEMM rate). OOM is
a row, not a gap."""

from __future__ import annotations

import functools
import os
import sys
from dataclasses import replace
from typing import Any

import torch

from ps3 import bench as ps3_bench

from . import workloads
from .base import Shapes, Stage, StageContext, WorkItem, calls_s, seed

BF16_PEAK_TFLOPS = 790.0  # GPU_NOTES.md, when the environment stage did not measure one
NOTES_FLOORS_MS = {(1, 1): 4.8, (16, 1): 77.0}  # GPU_NOTES.md: PS3-4K, one look, batch 1 and 16
# Per-image TFLOP at 3780 px (benchmarks/results/so400m-counts-4k.json) and the fraction of the
# bf16 GEMM rate each side is guessed to reach, for the estimates only.
TFLOP_PER_IMAGE = {"ps3-1": 3.92, "ps3-6": 19.70, "s2": 80.64, "anyres": 67.31}
EFFICIENCY = {"ours": 0.35, "dense": 0.45, "upstream": 0.25}
UPSTREAM_START_S = 25.0  # interpreter, torch, timm and transformers 4.57 imported; SO400M built on the GPU
COUNT_S = 3.0  # one method's FLOPs counted on the meta device (27 layers)


def counts(sh: Shapes, method: str, batch: int) -> tuple[int, int]:
    """(warm-up calls, timed calls): the first warm-up call also gives the peak memory. Calls of
    about a second or more (the dense baselines at B = 16) are timed twice."""
    if not sh.gpu:
        return 0, 1
    if call_ms(method, batch, "dense" if method in ("s2", "anyres") else "ours") > 1000:
        return 1, 2
    return (2, 10) if batch == 1 and method.startswith("ps3") else (1, 3)


def call_ms(method: str, batch: int, side: str = "ours") -> float:
    return TFLOP_PER_IMAGE[method] * batch / (EFFICIENCY[side] * BF16_PEAK_TFLOPS) * 1e3 + 5.0


# ----------------------------------------------------------------------------- shared state


@functools.lru_cache(maxsize=1)
def built_model(preset_name: str, resolution: int, device: str) -> ps3_bench.PS3VisionModel:
    """The e2e preset's model (random weights, every layer), built once per process: the launch
    overhead stage reuses it."""
    preset = ps3_bench.PRESETS[preset_name]
    return ps3_bench.build_model(ps3_bench.model_config(preset, resolution), device, preset.dtype)


def setup(ctx: StageContext) -> None:
    """The model (random weights, 27 layers), its meta twin for counting, the options and the floor's rate."""
    sh = ctx.shapes
    preset = ps3_bench.PRESETS[sh.e2e_preset]
    config = ps3_bench.model_config(preset, sh.e2e_resolution)
    device = "cuda" if ctx.cuda else "cpu"
    peak = ctx.previous("environment").get("ceilings", {}).get("bf16_gemm_tflops") or BF16_PEAK_TFLOPS
    ctx.set("floor_peak_tflops", peak)
    ctx.state.update(
        preset=preset, config=config, device=device, peak=peak, env=ps3_bench.environment(device), counts={},
        meta=ps3_bench.build_model(config, "meta", preset.dtype),
        model=built_model(sh.e2e_preset, sh.e2e_resolution, device),
        opts=ps3_bench.Options(preset=sh.e2e_preset, methods=[], resolutions=[sh.e2e_resolution],
                               batches=list(sh.e2e_batches), count_only=False, warmup=1, reps=1, upstream_python=None,
                               upstream_timeout=60.0, seed=seed(), upstream_flops=False))


def images(ctx: StageContext, batch: int) -> torch.Tensor:
    st = ctx.state
    if st.get("x_batch") != batch:
        st.pop("x", None)
        ctx.free()
        gen = torch.Generator(device=st["device"]).manual_seed(st["opts"].seed)
        R = ctx.shapes.e2e_resolution
        st["x"] = torch.randn(batch, 3, R, R, generator=gen, device=st["device"]).to(st["preset"].dtype)
        st["x_batch"] = batch
    return st["x"]


def method_counts(ctx: StageContext, method: str, batch: int) -> dict[str, Any]:
    """FLOPs and tokens of ``batch`` images: counted once per method at one image, scaled."""
    st = ctx.state
    if method not in st["counts"]:
        st["counts"][method] = ps3_bench.method_counts(method, st["meta"], ctx.shapes.e2e_resolution, 1)
    one = st["counts"][method]
    return {**one, **{k: one[k] * batch for k in ("flops", "attn_flops", "attn_flops_counted")}}


def entry(ctx: StageContext, rec: dict[str, Any], method: str, looks: int | None) -> dict[str, Any]:
    """The summary's row for one ``ps3.bench`` record, with the floor at the measured GEMM rate."""
    peak = ctx.state["peak"]
    floor_ms = rec["flops"] / (peak * 1e12) * 1e3 if rec.get("flops") else None
    ms = rec.get("latency_ms")
    notes_floor = NOTES_FLOORS_MS.get((rec["batch"], looks)) if method == "ps3 (this project)" else None
    return dict(method=method, batch=rec["batch"], looks=looks, ms=ms, tflops_per_s=rec.get("tflops_per_s"),
                peak_mem_mb=rec.get("peak_mem_mb"), status=rec.get("status"), error=rec.get("error"),
                tokens=rec.get("tokens"), flops=rec.get("flops"), floor_ms=floor_ms,
                ratio_to_floor=ms / floor_ms if ms and floor_ms else None, notes_floor_ms=notes_floor,
                ratio_to_notes_floor=ms / notes_floor if ms and notes_floor else None, timer=rec.get("timer"),
                timing=rec.get("timing"), flops_source=rec.get("flops_source", "counted on the meta device"))


# ----------------------------------------------------------------------------- items


def ours(ctx: StageContext, method: str, label: str, batch: int, looks: int | None) -> None:
    st = ctx.state
    if "model" not in st:
        _skip(label, batch, looks)(ctx, "the model was not built (see the stage's first item)")
        return
    rec = ps3_bench.empty_record(st["opts"], st["env"], method, ctx.shapes.e2e_resolution, batch, st["preset"].dtype)
    warmup, reps = counts(ctx.shapes, method, batch)
    ps3_bench.run_method(rec, method, st["model"], st["meta"], images(ctx, batch), warmup, reps,
                         counts=method_counts(ctx, method, batch))
    ctx.add("end_to_end", entry(ctx, rec, label, looks))


def upstream(ctx: StageContext, est_s: float) -> None:
    """Upstream PS3 in its worker process, every batch and look count in one call (it reports each
    entry as it finishes, so a timeout keeps the finished ones). Its FLOPs are this project's count
    of the same method (the same work; counting upstream's own would cost one more call per entry)."""
    sh, st = ctx.shapes, ctx.state
    if "model" not in st:
        _skip_upstream(ctx, "the model was not built (see the stage's first item)")
        return
    R = sh.e2e_resolution
    methods = [f"upstream-ps3-{n}" for n in sh.e2e_looks]
    records = [ps3_bench.empty_record(st["opts"], st["env"], m, R, b, st["preset"].dtype)
               for b in sh.e2e_batches for m in methods]
    site, reason = ctx.upstream_site(wait_s=min(30.0, max(ctx.left() - est_s, 0)))
    if site is None:
        for rec in records:
            rec.update(status="skipped", error=reason)
    else:
        ctx.free()  # the upstream process needs the memory this one caches
        warmup, reps = counts(sh, "ps3-1", max(sh.e2e_batches))
        # PS3_UPSTREAM_PYTHON: another interpreter for the upstream side (default: this one, with the
        # unpacked wheels first on its path).
        run_opts = replace(st["opts"], methods=methods, warmup=warmup, reps=reps,
                           upstream_python=os.environ.get("PS3_UPSTREAM_PYTHON", sys.executable),
                           upstream_timeout=max(min(ctx.left(), 2 * est_s), 1.0), upstream_pythonpath=site)
        preset = replace(st["preset"], device=st["device"])
        ps3_bench.run_upstream(run_opts, preset, st["config"], R, methods, records)
    for rec in records:
        looks = ps3_bench.UPSTREAM_LOOKS[rec["method"]]
        if rec.get("flops") is None and rec.get("status") == "ok":
            rec.update(flops=method_counts(ctx, f"ps3-{looks}", rec["batch"])["flops"],
                       flops_source="this project's count of the same method")
            rec["tflops_per_s"] = rec["flops"] / (rec["latency_ms"] * 1e-3) / 1e12
        ctx.add("end_to_end", entry(ctx, rec, "upstream ps3", looks))


def _skip(label: str, batch: int, looks: int | None):
    def record(ctx: StageContext, reason: str) -> None:
        ctx.add("end_to_end", dict(method=label, batch=batch, looks=looks, ms=None, tflops_per_s=None,
                                   peak_mem_mb=None, status="skipped", error=reason))
    return record


def _skip_upstream(ctx: StageContext, reason: str) -> None:
    for b in ctx.shapes.e2e_batches:
        for looks in ctx.shapes.e2e_looks:
            _skip("upstream ps3", b, looks)(ctx, reason)


def items(sh: Shapes) -> list[WorkItem]:
    gpu = sh.gpu
    batches = sorted(sh.e2e_batches)

    counted: set[str] = set()

    def est(method: str, batch: int, side: str = "ours") -> float:
        """The calls, the inputs and, the first time a method comes, its FLOP count."""
        first = method not in counted
        counted.add(method)
        return calls_s(call_ms(method, batch, side), sum(counts(sh, method, batch)), 1.0 + COUNT_S * first) if gpu \
            else 0.0

    out = [WorkItem("model, its meta twin and the inputs", 8.0 if gpu else 0.0, setup)]
    for b in batches:
        for looks in sh.e2e_looks:
            m = f"ps3-{looks}"
            out.append(WorkItem(f"ps3 {looks} looks B={b}", est(m, b), lambda ctx, m=m, b=b, n=looks:
                                ours(ctx, m, "ps3 (this project)", b, n), (workloads.encoder(sh, m, b),),
                                on_skip=_skip("ps3 (this project)", b, looks)))
    for b in batches:
        if b != batches[0]:  # upstream before the dense baselines at the large batch
            upstream_s = UPSTREAM_START_S + sum(
                calls_s(call_ms(f"ps3-{n}", b2, "upstream"), sum(counts(sh, "ps3-1", max(batches))), 0.5)
                for b2 in batches for n in sh.e2e_looks)
            out.append(WorkItem("upstream PS3, every batch and look count", upstream_s if gpu else 0.0,
                                lambda ctx, s=upstream_s: upstream(ctx, s), on_skip=_skip_upstream))
        for m in ("s2", "anyres"):
            out.append(WorkItem(f"{m} B={b}", est(m, b, "dense"), lambda ctx, m=m, b=b: ours(ctx, m, m, b, None),
                                (workloads.encoder(sh, m, b),), on_skip=_skip(m, b, None)))
    if len(batches) == 1:
        out.append(WorkItem("upstream PS3, every batch and look count", UPSTREAM_START_S if gpu else 0.0,
                            lambda ctx: upstream(ctx, UPSTREAM_START_S), on_skip=_skip_upstream))
    return out


STAGE = Stage("end_to_end", 0.26, __doc__.split("\n\n")[0], items)
