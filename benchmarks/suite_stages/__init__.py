"""The stages of ``gpu_suite.py``, in run order: one module each, holding its cap, its plan and its
work together (see :mod:`.base`), and one line each here.

To add a stage: a module with ``STAGE = Stage(name, share, about, items)`` whose ``items(shapes)``
returns its :class:`~.base.WorkItem` list (each with its estimate, the function that does it and
the compile workloads it needs), and its ``STAGE`` in :data:`STAGES`, with its share taken from
the others (the shares add up to at most 1). ``gpu_suite.py --plan`` then budgets it and the
precompile stage compiles its kernels.
"""

from __future__ import annotations

import time
import traceback

from ps3.bench.harness import error_text

from . import (end_to_end, environment, launch_overhead, no_sync, op_checks, op_timings, parity, peers, precompile,
               training)
from .base import Shapes, Stage, StageContext, Workload, device_broken, run_items

STAGES: tuple[Stage, ...] = (
    environment.STAGE,
    precompile.STAGE,
    parity.STAGE,
    no_sync.STAGE,
    op_checks.STAGE,
    op_timings.STAGE,
    peers.STAGE,
    end_to_end.STAGE,
    launch_overhead.STAGE,
    training.STAGE,
)

BY_NAME = {s.name: s for s in STAGES}
NAMES = tuple(BY_NAME)


def stage_workloads(sh: Shapes, names: list[str] | tuple[str, ...] | None = None) -> dict[str, Workload]:
    """Every compile workload of the stages ``names`` (default: all), by name, in run order."""
    out: dict[str, Workload] = {}
    for stage in STAGES:
        if names is None or stage.name in names:
            for item in stage.items(sh):
                for w in item.workloads:
                    out.setdefault(w.name, w)
    return out


def run_stage(ctx: StageContext) -> bool:
    """Run one stage's items, recording its outcome; False when the device is unusable afterwards."""
    ctx.begin()
    ctx.log(f"start (deadline in {ctx.deadline - time.time():.0f} s)")
    try:
        run_items(ctx, BY_NAME[ctx.name].items(ctx.shapes))
        ctx.finish("ok")
    except Exception as exc:  # noqa: BLE001 - a failed stage is a result
        ctx.log(traceback.format_exc())
        ctx.finish("failed", error_text(exc))
    ctx.log("done")
    return not device_broken()
