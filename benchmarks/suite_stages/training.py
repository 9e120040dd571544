"""Stage ``training``: one PS3 pre-training step as upstream's trainer runs it
(``benchmarks/bench_train.py``: ground-truth boxes, a prompt from a text tower, gradient
checkpointing, SigLIP and box-supervision losses, backward, AdamW) with the SO400M vision tower
in bf16 autocast, batch 8 at PS3-4K 3780 px, this package's and upstream's on the same weights and
inputs: step time, peak live tensor bytes and the allocator's peak; this package's side alone of
PS3-1.5K at 1512 px (batch 8), then of batch 16 at both, when time is left.

The text tower has 2 of the trainer's 27 layers (as the CPU preset): its 400M parameters would
double the host work of building, saving and loading the towers, which the stage's cap cannot
hold beside upstream's interpreter start; ``bench_train.py --preset gpu`` runs the full one."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import bench_train

from .base import Shapes, Stage, StageContext, WorkItem
from .end_to_end import UPSTREAM_START_S
from .workloads import train_step

STEPS = 3  # timed steps per side (the first also creates the optimizer state, so two are reported)
TEXT_LAYERS = 2


def _cases(sh: Shapes) -> tuple[bench_train.Case, list[bench_train.Case]]:
    """The planned case and the optional ones of this package's side."""
    if not sh.gpu:
        return bench_train.Case("tiny", 224, 1, None, 1), []
    first = bench_train.Case("ps3-4k", 3780, 8, "bfloat16", TEXT_LAYERS)
    small = bench_train.Case("ps3-1.5k", 1512, 8, "bfloat16", TEXT_LAYERS)
    return first, [small] + [bench_train.Case(c.model, c.resolution, 16, c.autocast, c.text_layers) for c in (first, small)]


def ours(ctx: StageContext, case: bench_train.Case, save: bool) -> None:
    """This package's step; ``save``: keep the weights and inputs for upstream's side."""
    work = Path(tempfile.mkdtemp(prefix="train-", dir=ctx.work)) if save else None
    row = bench_train.run_ours(case, work, "cuda" if ctx.cuda else "cpu", STEPS if ctx.cuda else 1)
    ctx.state.setdefault("rows", {})[case] = (row, work)
    ctx.add("training", _entry(row))


def upstream(ctx: StageContext, case: bench_train.Case) -> None:
    mine, work = ctx.state.get("rows", {}).get(case, (None, None))
    skip = _skip(case, bench_train.SIDES[1])
    if mine is None or mine["status"] != "ok" or work is None:
        skip(ctx, "this package's side of the case did not run")
        return
    try:
        site, reason = ctx.upstream_site(wait_s=min(10.0, max(ctx.left(), 0)))
        if site is None:
            skip(ctx, reason)
            return
        ctx.free()
        python = os.environ.get("PS3_UPSTREAM_PYTHON", sys.executable)
        row = bench_train.run_upstream(case, work, python, "cuda", STEPS, pythonpath=site, timeout=max(ctx.left(), 1.0))
        ctx.add("training", _entry(bench_train.compare([dict(mine), row], case)[1], mine))
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the weights: gigabytes


def _entry(row: dict, ours_row: dict | None = None) -> dict:
    """A summary row (the full per-step record stays out of the summary)."""
    entry = {k: v for k, v in row.items() if k != "record"}
    if ours_row is not None:
        for key in ("step_ms", "peak_live_bytes", "cuda_max_allocated_bytes"):
            if row.get(key) and ours_row.get(key):
                entry[f"ours_over_upstream_{key}"] = ours_row[key] / row[key]
    return entry


def _skip(case: bench_train.Case, side: str):
    def record(ctx: StageContext, reason: str) -> None:
        ctx.add("training", dict(side=side, model=case.model, resolution=case.resolution, batch=case.batch,
                                 dtype=case.autocast or "float32", status="skipped", error=reason))
    return record


def items(sh: Shapes) -> list[WorkItem]:
    """This package's step at the planned case, upstream's (its interpreter starts, loads the
    weights, runs the steps), then the other cases when time is left."""
    first, optional = _cases(sh)
    device = "cuda" if sh.gpu else "cpu"

    def side_s(case: bench_train.Case) -> float:
        return bench_train.estimate_seconds(case, device, STEPS) / 2 if sh.gpu else 0.0  # the estimate is both sides'

    def step_item(case: bench_train.Case, optional: bool = False) -> WorkItem:
        return WorkItem(f"train step {case.model} {case.resolution} px B={case.batch}", side_s(case),
                        lambda ctx: ours(ctx, case, save=sh.gpu and case == first), (train_step(sh, case),),
                        optional=optional, on_skip=_skip(case, bench_train.SIDES[0]))

    out = [step_item(first)]
    if sh.gpu:
        out.append(WorkItem(f"upstream train step {first.model} {first.resolution} px B={first.batch}",
                            UPSTREAM_START_S + side_s(first), lambda ctx: upstream(ctx, first),
                            on_skip=_skip(first, bench_train.SIDES[1])))
    return out + [step_item(c, optional=True) for c in optional]


STAGE = Stage("training", 0.15, __doc__.split("\n\n")[0], items)
