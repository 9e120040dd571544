"""Stage ``precompile``: every Triton specialisation the later stages launch, compiled in parallel
into Triton's on-disk cache before any of them starts, so they find their kernels built.

The workloads of the stages still to run (:mod:`.workloads`) are shared out among worker
processes (all cores but two), heaviest first by the committed compile report's seconds. Each
worker runs its workloads with every Triton launch recorded instead of run
(:func:`triton_launches.recorded_launches`); a launch whose specialisation no worker has claimed
yet (a file created exclusively under ``claims/``) is compiled there, through the kernel's own
``run(..., warmup=True)`` (the path a real launch takes, so the cache key is the one the stages
will look up) and its C launcher built (``_init_handles``). Every result is appended to the
worker's JSON-lines file as it lands; workers still busy at the stage's deadline are killed, and
the stages compile what is left on first use. Under the interpreter (the dry run) nothing is
compiled: the workers record, claim and count (the first workload of each later stage).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from .base import DRY, GPU, Shapes, Stage, StageContext, WorkItem

POOL_START_S = 8.0  # a pool worker: interpreter, torch, triton and the project imported, CUDA context created
HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent.parent


def worker_count(workloads: int) -> int:
    """All cores but two (the stage's own process and the system), at least two, at most one per workload."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    return max(1, min(workloads, max(2, cores - 2)))


def share_out(costs: dict[str, float], workers: int) -> list[list[str]]:
    """Longest processing time first: each workload, heaviest first, to the least loaded worker."""
    loads = [0.0] * workers
    shares: list[list[str]] = [[] for _ in range(workers)]
    for name in sorted(costs, key=lambda n: -costs[n]):
        i = loads.index(min(loads))
        loads[i] += costs[name]
        shares[i].append(name)
    return shares


def _later_workloads(ctx: StageContext) -> dict[str, Any]:
    """The workloads of the stages after this one (the dry run: the first of each, the plumbing)."""
    from . import stage_workloads

    later = list(ctx.all_stages[ctx.all_stages.index(ctx.name) + 1:]) if ctx.name in ctx.all_stages else []
    if not ctx.dry_run:
        return stage_workloads(ctx.shapes, later)
    firsts = (next(iter(stage_workloads(ctx.shapes, [name]).items()), None) for name in later)
    return dict(w for w in firsts if w is not None)


def _workload_costs(names: list[str]) -> dict[str, float]:
    """Seconds per workload from the committed compile report (recording plus the compiles and
    launcher builds it is the first to need); 1 s where the report does not know it."""
    from .plan import load_report, workload_costs

    report = load_report()
    return workload_costs(names, report) if report else {n: 1.0 for n in names}


def _row(line: str) -> dict[str, Any] | None:
    try:
        return json.loads(line)
    except ValueError:  # the last line of a worker killed while writing it
        return None


def run_pool(ctx: StageContext) -> None:
    workloads = _later_workloads(ctx)
    names = list(workloads)
    if not names:
        ctx.set("precompile", dict(workloads=0, note="no later stage launches Triton kernels"))
        return
    pool = ctx.work / "precompile"
    (pool / "claims").mkdir(parents=True, exist_ok=True)
    shares = share_out(_workload_costs(names), worker_count(len(names)))
    paths = [str(REPO_ROOT), str(REPO_ROOT / "tests"), str(REPO_ROOT / "benchmarks"), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    procs = []
    start = time.time()
    for i, share in enumerate(shares):
        (pool / f"share-{i}.json").write_text(json.dumps(dict(workloads=share, dry_run=ctx.dry_run)))
        code = f"from suite_stages.precompile import worker_main; worker_main({str(pool)!r}, {i})"
        procs.append(subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, start_new_session=True))
    ctx.log(f"{len(names)} workloads on {len(procs)} workers")
    killed = 0
    while any(p.poll() is None for p in procs):
        if time.time() > ctx.deadline - 3.0:  # the pool starts no item: it may run to the stage's end
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    killed += 1
            break
        time.sleep(0.2)
    for p in procs:
        p.wait()
    rows = [_row(line) for f in sorted(pool.glob("results-*.jsonl")) for line in f.read_text().splitlines()]
    rows = [r for r in rows if r is not None]
    specs = [r for r in rows if r["type"] == "spec"]
    recorded = [r for r in rows if r["type"] == "workload"]
    ctx.set("precompile", dict(
        workers=len(procs), workloads=len(names), workloads_recorded=len(recorded), killed_at_deadline=killed,
        specs=len(specs), compiled=sum(1 for r in specs if r["compiled"]),
        failed=[r for r in specs if not r["ok"]] + [r for r in recorded if not r["ok"]],
        compile_s=round(sum(r["compile_s"] for r in specs), 1),
        launcher_s=round(sum(r["launcher_s"] for r in specs), 1),
        wall_s=round(time.time() - start, 1), exit_codes=[p.returncode for p in procs],
        rows=[{k: r[k] for k in ("spec_id", "kernel", "workload", "compile_s", "launcher_s", "ok")} for r in specs]))
    failed = sum(1 for r in specs if not r["ok"])
    ctx.log(f"{len(specs)} specialisations ({failed} failed) in {time.time() - start:.1f} s")


def items(sh: Shapes) -> list[WorkItem]:
    from .plan import precompile_estimate

    return [WorkItem("compile the later stages' Triton specialisations", precompile_estimate(sh), run_pool)]


STAGE = Stage("precompile", 0.09, __doc__.split("\n\n")[0], items)


# ----------------------------------------------------------------------------- the worker process


def _compile(launch: Any, real_run: Any, claims: Path, workload: str, out: Any) -> None:
    """Compile ``launch``'s specialisation here unless another worker claimed it first."""
    try:
        os.close(os.open(claims / launch.spec_id, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    row = dict(type="spec", spec_id=launch.spec_id, kernel=launch.kernel, workload=workload, key=launch.key,
               compile_s=0.0, launcher_s=0.0, compiled=False, ok=True, error=None)
    start = time.perf_counter()
    try:
        kernel = real_run(launch.fn, *launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
        row["compile_s"] = round(time.perf_counter() - start, 2)
        if kernel is not None:  # None: the interpreter, which compiles nothing
            start = time.perf_counter()
            getattr(kernel, "_init_handles", lambda: None)()  # the C launcher, and the binary loaded once
            row.update(launcher_s=round(time.perf_counter() - start, 2), compiled=True)
    except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is a result
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:500]}")
    out.write(json.dumps(row) + "\n")
    out.flush()


def worker_main(pool: str, index: int) -> None:
    from triton_launches import recorded_launches

    from . import stage_workloads

    pool = Path(pool)
    share = json.loads((pool / f"share-{index}.json").read_text())
    sh = DRY if share["dry_run"] else GPU
    workloads = stage_workloads(sh)
    with open(pool / f"results-{index}.jsonl", "a") as out:
        for name in share["workloads"]:
            start = time.perf_counter()
            row = dict(type="workload", workload=name, ok=True, error=None, launches=0)
            try:
                def claim(launch, real_run, name=name):
                    _compile(launch, real_run, pool / "claims", name, out)

                with recorded_launches(claim) as launches:
                    workloads[name].run(sh.device)
                row["launches"] = len(launches)
            except Exception as exc:  # noqa: BLE001 - the stages will compile what this misses
                traceback.print_exc()
                row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:500]}")
            row["seconds"] = round(time.perf_counter() - start, 2)
            out.write(json.dumps(row) + "\n")
            out.flush()
