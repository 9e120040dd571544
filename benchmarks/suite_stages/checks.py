"""How a correctness check becomes an entry of the summary's ``correctness`` list, whatever happens:
within its bounds (``ok: true``), off them or crashed (``ok: false``), or not run (``ok: null``)."""

from __future__ import annotations

import math
import time
import traceback
from typing import Any, Callable

from ps3.bench.harness import error_text, is_oom

from .base import StageContext, WorkItem, Workload


def skipped(name: str) -> Callable[[StageContext, str], None]:
    def record(ctx: StageContext, reason: str) -> None:
        ctx.add("correctness", dict(name=name, ok=None, worst_rel_err=None, status="skipped", error=reason))
    return record


def run_check(ctx: StageContext, name: str, fn: Callable[[], dict[str, Any]]) -> None:
    """Run one check (``fn`` returns ``errors``, ``tol``, optional per-error ``bounds`` and
    ``extra_ok``, and fields to keep) and record it."""
    start = time.perf_counter()
    try:
        rec = fn()
        errors, tol = rec.pop("errors"), rec.pop("tol")
        bound = rec.pop("bounds", None) or {k: tol for k in errors}
        finite = [e for e in errors.values() if e is not None and math.isfinite(e)]
        ok = len(finite) == len(errors) and all(errors[k] <= bound[k] for k in errors)
        entry = dict(name=name, ok=ok and rec.pop("extra_ok", True), worst_rel_err=max(finite, default=None),
                     tol=tol, errors=errors, status="ok", **rec)
    except Exception as exc:  # noqa: BLE001 - a crash is a failed check
        entry = dict(name=name, ok=False, worst_rel_err=None, status="failed", error=error_text(exc))
        ctx.log(traceback.format_exc())
        if is_oom(exc):
            ctx.free()
    entry["seconds"] = round(time.perf_counter() - start, 2)
    ctx.add("correctness", entry)
    ctx.log(f"{name}: ok={entry['ok']} worst={entry['worst_rel_err']} ({entry['seconds']} s)")


def check_item(name: str, est_s: float, fn: Callable[[StageContext], dict[str, Any]],
               workloads: tuple[Workload, ...] = ()) -> WorkItem:
    return WorkItem(name, est_s, lambda ctx: run_check(ctx, name, lambda: fn(ctx)), workloads, on_skip=skipped(name))
