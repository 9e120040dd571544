"""The suite's plan, checkable on a CPU: for every stage its cap, its work items with their
estimates, the Triton specialisations it compiles, and its estimated seconds.

Compile costs come from the committed compile report (``benchmarks/aot_report.py``, rows keyed
by specialisation, each with the workloads that launch it and its offline ``compile_s``) plus one
C launcher build per new kernel signature (Triton 3.6 builds it with gcc, ~1 s). The precompile
stage pays them, spread over the GPU host's cores; a later stage only loads what it uses. Run
time estimates are the stages' own (guessed without a GPU from FLOPs and the measured ceilings of
GPU_NOTES.md); the plan's table puts them next to each cap, and the summary of a real run puts
the seconds each stage took next to its estimate.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from .base import GPU, Shapes
from .precompile import POOL_START_S, share_out

REPORT = Path(__file__).resolve().parent.parent / "results" / "aot-sm90.json"
COMPILE_LIMIT_S = 15.0  # no specialisation of the plan may take longer offline (CI checks it)
LAUNCHER_S = 1.0  # Triton 3.6's C launcher, built with gcc once per kernel signature
LOAD_S = 0.05  # a cached binary and launcher loaded on first use
GPU_HOST_WORKERS = 14  # the precompile pool on the GPU host's 16 cores
WORKER_START_S = 10.0  # the stages' worker process: interpreter, torch, triton and the suite imported


@functools.lru_cache(maxsize=4)
def load_report(path: Path = REPORT) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _rows_by_workload(report: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    by: dict[str, list[dict[str, Any]]] = {}
    for row in report["rows"]:
        for name in row.get("workloads", ()):
            by.setdefault(name, []).append(row)
    return by


def spec_cost(row: dict[str, Any]) -> float:
    """Offline compile seconds of one specialisation (its limit when the report stopped waiting)."""
    return float(row.get("compile_s") or 0.0)


def workload_costs(names: list[str], report: dict[str, Any]) -> dict[str, float]:
    """Seconds each workload costs the precompile pool: recording it, then the compiles and
    launcher builds of the specialisations it is the first (in ``names`` order) to launch."""
    by = _rows_by_workload(report)
    recorded = report.get("workloads", {})
    seen_specs: set[str] = set()
    seen_signatures: set[str] = set()
    costs = {}
    for name in names:
        cost = float(recorded.get(name, {}).get("record_s", 1.0))
        for row in by.get(name, ()):
            if row["spec_id"] in seen_specs:
                continue
            seen_specs.add(row["spec_id"])
            cost += spec_cost(row)
            if row.get("signature") not in seen_signatures:
                seen_signatures.add(row.get("signature"))
                cost += LAUNCHER_S
        costs[name] = cost
    return costs


def precompile_estimate(sh: Shapes, report: dict[str, Any] | None = None) -> float:
    """Wall seconds of the precompile pool on the GPU host: worker start plus the most loaded
    worker's share (longest-first assignment, as the stage does)."""
    from . import NAMES, stage_workloads

    report = report or load_report()
    if not sh.gpu or report is None:
        return 0.0
    names = list(stage_workloads(sh, [n for n in NAMES if n != "precompile"]))
    costs = workload_costs(names, report)
    shares = share_out(costs, min(GPU_HOST_WORKERS, max(len(names), 1)))
    return POOL_START_S + max((sum(costs[n] for n in share) for share in shares), default=0.0)


def build_plan(budget_s: float, sh: Shapes = GPU, report: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plan of a full run with ``--budget-s budget_s`` (see the module docstring); ``problems``
    lists what breaks it: a stage over its cap, a workload or specialisation missing from the
    report, a specialisation over the compile limit or failing to compile."""
    from . import STAGES

    report = report or load_report()
    problems: list[str] = []
    if report is None:
        report = dict(rows=[], workloads={}, meta={})
        problems.append(f"no compile report at {REPORT} (python benchmarks/aot_report.py --out {REPORT})")
    by = _rows_by_workload(report)
    recorded = report.get("workloads", {})
    compiled: set[str] = set()
    stages = []
    for stage in STAGES:
        items = stage.items(sh)
        specs: dict[str, dict[str, Any]] = {}
        for item in items:
            for w in item.workloads:
                if w.name not in recorded:
                    problems.append(f"{stage.name}: workload '{w.name}' is not in the compile report")
                for row in by.get(w.name, ()):
                    specs.setdefault(row["spec_id"], row)
        new = [r for sid, r in specs.items() if sid not in compiled]
        compiled.update(specs)
        for r in new:
            if not r.get("ok") or r.get("timed_out") or spec_cost(r) > COMPILE_LIMIT_S:
                problems.append(f"{stage.name}: {r['kernel']} {r['spec_id']} compiles in "
                                f"{'>' if r.get('timed_out') else ''}{spec_cost(r):.1f} s offline"
                                f"{'' if r.get('ok') or r.get('timed_out') else ' (failed)'} "
                                f"(limit {COMPILE_LIMIT_S:.0f} s; workloads {', '.join(r['workloads'][:3])})")
        run_s = sum(i.est_s for i in items if not i.optional)
        if stage.name == "precompile":
            estimated = precompile_estimate(sh, report)
        else:
            estimated = run_s + LOAD_S * len(new)
        cap = stage.share * (budget_s - WORKER_START_S)
        if estimated > cap:
            problems.append(f"{stage.name}: estimated {estimated:.1f} s over its cap of {cap:.1f} s")
        stages.append(dict(
            name=stage.name, share=stage.share, cap_s=round(cap, 1), estimated_s=round(estimated, 1),
            about=stage.about,
            items=[dict(name=i.name, est_s=round(i.est_s, 2), optional=i.optional,
                        workloads=[w.name for w in i.workloads]) for i in items],
            specs=sorted(specs), new_specs=len(new),
            compile_serial_s=round(sum(spec_cost(r) for r in new) + LAUNCHER_S * len({r.get("signature") for r in new}),
                                   1)))
    shares = sum(s["share"] for s in stages)
    if shares > 1.0 + 1e-9:
        problems.append(f"the shares add up to {shares:.2f} of the budget")
    return dict(
        budget_s=budget_s, shares=round(shares, 3),
        worker_start_s=WORKER_START_S,
        report=dict(path=str(REPORT), **{k: report.get("meta", {}).get(k) for k in ("triton", "git_commit", "target")}),
        compile_limit_s=COMPILE_LIMIT_S, launcher_s=LAUNCHER_S, precompile_workers=GPU_HOST_WORKERS,
        estimated_s=round(WORKER_START_S + sum(s["estimated_s"] for s in stages), 1), stages=stages,
        problems=problems)


def format_plan(plan: dict[str, Any]) -> str:
    lines = [f"## gpu_suite plan: {plan['budget_s']:.0f} s budget, {plan['estimated_s']:.0f} s estimated", "",
             "| stage | cap s | estimated s | items | specialisations (new) | serial compile s |",
             "|---|---:|---:|---:|---:|---:|",
             f"| (worker start) | {plan['worker_start_s']:.1f} | {plan['worker_start_s']:.1f} | - | - | - |"]
    for s in plan["stages"]:
        optional = sum(1 for i in s["items"] if i["optional"])
        lines.append(f"| {s['name']} | {s['cap_s']:.1f} | {s['estimated_s']:.1f} | {len(s['items'])}"
                     f"{f' (+{optional} optional)' if optional else ''} | {len(s['specs'])} ({s['new_specs']}) | "
                     f"{s['compile_serial_s']:.1f} |")
    lines += ["", f"compile report: {plan['report']['path']} (triton {plan['report']['triton']}, "
              f"commit {plan['report']['git_commit']})"]
    if plan["problems"]:
        lines += ["", "problems:"] + [f"- {p}" for p in plan["problems"]]
    return "\n".join(lines) + "\n"
