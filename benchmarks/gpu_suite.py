"""One prepared GPU run that proves and times the kernels inside a hard time budget.

    python3 benchmarks/gpu_suite.py                              # GPU machine: budget 360 s, output to $OUT
    python3 benchmarks/gpu_suite.py --plan --out /tmp/plan       # any CPU: the plan, checked against the caps
    python3 benchmarks/gpu_suite.py --dry-run --out /tmp/suite   # any CPU: tiny shapes, Triton interpreter

Stages, in run order (``suite_stages/``, one module each with its cap, plan and work): environment
and ceilings; precompile (every Triton specialisation of the later stages, in parallel on all
cores); upstream parity on CUDA; the no-host-sync forward; every op against float64; op timings
side by side (with the launch variants of ``launch_variants.py``); peer libraries (xformers,
FlexAttention); end to end against upstream PS3 and the dense baselines; launch overhead (CUDA
graph against eager). Each stage has a cap, a share of ``--budget-s``; a stage may also use what
earlier stages left unused, never what later ones were promised, and starts an item only when
what is left covers the item's estimate. ``--plan`` writes ``plan.json`` (every stage's cap, items,
estimates and specialisations, from the committed compile report) and exits 1 if a stage's
estimate is over its cap or a specialisation is missing from the report or over its compile limit.

The stages run in a worker process that writes each stage's results to disk after every entry;
this process only watches the clock, kills the worker when a stage overruns its cap (what it
measured is kept, the stage is marked ``timeout``), starts a fresh worker for the stages left, and
rewrites ``summary.json`` whenever a result lands. A correctness miss is a result, never an exit.

Output (``--out``, default ``$OUT``): ``summary.json``, ``summary.md`` (the table printed last),
``plan.json`` (not in the dry run) and ``suite.log`` (everything the worker printed). Nothing is installed and nothing
is fetched: the repository is put on ``sys.path``; wheels carried in ``.whl/`` (see
``benchmarks/carry_wheels.sh``) are unpacked with ``pip install --no-index --target`` into a
temporary folder: ``.whl/suite/`` for the worker, ``.whl/peers/`` (xformers) for the worker when
its build matches this machine's torch and CUDA, ``.whl/upstream/`` (upstream PS3 with its pinned
timm and transformers) for the upstream worker alone, in the background.
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
WHEELS = REPO_ROOT / ".whl"


sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests"), str(REPO_ROOT / "benchmarks")]

import suite_stages  # noqa: E402
from suite_stages.base import StageContext  # noqa: E402
from suite_stages.plan import WORKER_START_S, build_plan, format_plan  # noqa: E402

STAGE_NAMES = suite_stages.NAMES
SHARES = {s.name: s.share for s in suite_stages.STAGES}
FINAL = ("ok", "failed", "timeout", "skipped")
SOFT_MARGIN = 0.02  # of the budget: stages stop starting new work this long before their deadline


def schedule(t0: float, budget: float, names: tuple[str, ...] = STAGE_NAMES,
             dry_run: bool = False) -> dict[str, float]:
    """Deadline of every stage (wall clock): the end of its cumulative share of the budget, after
    the first worker's start (:data:`suite_stages.plan.WORKER_START_S`).

    A run of some stages (``--stages``) shares the budget among them.
    The dry run's stages share the whole budget (the interpreter's costs are nothing like a GPU's,
    so the shares would not fit them): each may run until the budget's end.
    """
    if dry_run:
        return {name: t0 + budget for name in names}
    total = sum(SHARES[n] for n in names)
    start = min(WORKER_START_S, budget / 4)
    deadlines, done = {}, 0.0
    for name in names:
        done += SHARES[name]
        deadlines[name] = t0 + start + (budget - start) * done / total
    deadlines[names[-1]] = t0 + budget
    return deadlines


# ----------------------------------------------------------------------------- stage files


def stage_path(work: Path, name: str) -> Path:
    return work / f"stage-{name}.json"


def read_stage(work: Path, name: str) -> dict[str, Any] | None:
    try:
        return json.loads(stage_path(work, name).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj: Any) -> None:
    """Atomic: a reader (or a kill) never sees half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- summary


@functools.lru_cache(maxsize=None)
def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if out.returncode == 0:
            return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return os.environ.get("PS3_COMMIT")  # a copy of the tree without .git: the caller says which commit


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def build_summary(work: Path, args: argparse.Namespace, t0: float, names: tuple[str, ...],
                  deadlines: dict[str, float], wheels: dict[str, Any], estimates: dict[str, float]) -> dict[str, Any]:
    summary: dict[str, Any] = dict(
        device=None, torch=_version("torch"), triton=_version("triton"), commit=_git_commit(),
        ceilings={}, precompile={}, correctness=[], timings=[], variants=[], end_to_end=[], launch_overhead=[],
        training=[], skipped=[], failed_items=[],
    )
    stages = []
    previous_deadline = t0
    for name in names:
        rec = read_stage(work, name) or {"status": "pending"}
        for key, value in (rec.get("data") or {}).items():
            if isinstance(value, list) and isinstance(summary.get(key), list):
                summary[key] = summary[key] + value  # lists that several stages add to
            else:
                summary[key] = value
        stages.append(dict(name=name, status=rec.get("status"), elapsed_s=rec.get("elapsed_s"),
                           estimated_s=estimates.get(name), cap_s=round(deadlines[name] - previous_deadline, 1),
                           error=rec.get("error")))
        if not args.dry_run:  # the dry run's stages all run until the budget's end
            previous_deadline = deadlines[name]
    summary["commit"] = summary["commit"] or _git_commit()
    summary["suite"] = dict(dry_run=args.dry_run, budget_s=args.budget_s, elapsed_s=round(time.time() - t0, 1),
                            started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)), stages=stages,
                            wheels=wheels, argv=sys.argv[1:])
    return summary


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def format_summary(s: dict[str, Any]) -> str:
    """The table printed last (and saved as summary.md)."""
    suite = s.get("suite", {})
    lines = [f"## gpu_suite{' (dry run)' if suite.get('dry_run') else ''}: {s.get('device')}",
             "", f"torch {s.get('torch')}, triton {s.get('triton')}, commit {s.get('commit')}; "
             f"{suite.get('elapsed_s')} s of a {suite.get('budget_s')} s budget", ""]
    lines += ["| stage | status | s | estimated s | cap s | error |", "|---|---|---:|---:|---:|---|"]
    for st in suite.get("stages", []):
        lines.append(f"| {st['name']} | {st['status']} | {_fmt(st['elapsed_s'], 1)} | "
                     f"{_fmt(st.get('estimated_s'), 1)} | {_fmt(st['cap_s'], 1)} | {(st['error'] or '')[:120]} |")
    c = s.get("ceilings") or {}
    if c:
        lines += ["", "ceilings: " + ", ".join(f"{k} {_fmt(v, 1)}" for k, v in c.items() if isinstance(v, (int, float)))]
    pre = s.get("precompile") or {}
    if pre.get("workloads"):
        lines += ["", f"precompile: {pre.get('specs')} specialisations from {pre.get('workloads_recorded')}/"
                      f"{pre.get('workloads')} workloads on {pre.get('workers')} workers in {pre.get('wall_s')} s "
                      f"({pre.get('compile_s')} s compiling, {pre.get('launcher_s')} s launchers; "
                      f"{len(pre.get('failed') or [])} failed, {pre.get('killed_at_deadline')} killed at the deadline)"]
    checks = s.get("correctness") or []
    if checks:
        passed = sum(1 for r in checks if r.get("ok"))
        ran = sum(1 for r in checks if r.get("ok") is not None)
        lines += ["", f"correctness: {passed}/{ran} ok ({len(checks) - ran} not run)"]
        lines += [f"- MISS {r['name']}: worst rel err {_fmt(r.get('worst_rel_err'), 6)} (tol {r.get('tol')}) "
                  f"{r.get('error') or ''}"[:300] for r in checks if r.get("ok") is False]
    if s.get("timings"):
        lines += ["", "timings (ratio = peer ms / ours ms; > 1: ours faster)", "",
                  "| name | shape | ours ms | peer | peer ms | ratio |", "|---|---|---:|---|---:|---:|"]
        for r in s["timings"]:
            lines.append(f"| {r['name']} | {r['shape']} | {_fmt(r['ours_ms'], 3)} | {r['peer']} | "
                         f"{_fmt(r['peer_ms'], 3)} | {_fmt(r['ratio'])} |" + (f" {r['error'][:80]}" if r.get("error") else ""))
    if s.get("variants"):
        lines += ["", "launch variants (winner: fastest correct one)", ""]
        for v in s["variants"]:
            times = ", ".join(f"{c['name']} {_fmt(c.get('ms'), 3)}" for c in v["candidates"])
            verdict = "" if v["winner"] in (None, "default") else \
                f", x{_fmt(v['speedup_vs_default'])} over default, {'decisive' if v.get('decisive') else 'within noise'}"
            lines.append(f"- {v['op']} {v['shape']}: winner **{v['winner']}** ({times} ms{verdict})")
    if s.get("end_to_end"):
        lines += ["", "end to end (bf16; x floor = ms / (counted FLOPs at the measured bf16 GEMM rate))", "",
                  "| method | batch | looks | ms | TFLOP/s | x floor | peak MiB | status |",
                  "|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in s["end_to_end"]:
            status = r["status"] + (f": {r['error'][:80]}" if r.get("error") and r["status"] != "ok" else "")
            lines.append(f"| {r['method']} | {r['batch']} | {_fmt(r['looks'])} | {_fmt(r['ms'])} | "
                         f"{_fmt(r['tflops_per_s'], 1)} | {_fmt(r.get('ratio_to_floor'))} | {_fmt(r['peak_mem_mb'], 0)} | "
                         f"{status} |")
    if s.get("training"):
        lines += ["", "pre-training step (benchmarks/bench_train.py; ours / upstream = ratio of this package's to upstream's)",
                  "", "| side | model | px | batch | dtype | step ms | peak live GiB | allocator peak GiB | ours / upstream "
                  "(ms, live, allocator) | status |", "|---|---|---:|---:|---|---:|---:|---:|---|---|"]
        for r in s["training"]:
            ratios = ", ".join(_fmt(r.get(f"ours_over_upstream_{k}"), 3)
                               for k in ("step_ms", "peak_live_bytes", "cuda_max_allocated_bytes"))
            gib = [r[k] / 2**30 if r.get(k) else None for k in ("peak_live_bytes", "cuda_max_allocated_bytes")]
            status = r["status"] + (f": {r['error'][:80]}" if r.get("error") and r["status"] != "ok" else "")
            lines.append(f"| {r['side']} | {r['model']} | {r['resolution']} | {r['batch']} | {r['dtype']} | "
                         f"{_fmt(r.get('step_ms'), 1)} | {_fmt(gib[0], 2)} | {_fmt(gib[1], 2)} | {ratios} | {status} |")
    for r in s.get("skipped") or []:
        lines.append(f"- skipped {r['stage']}: {r['item']} ({r['reason']})")
    for r in s.get("failed_items") or []:
        lines.append(f"- FAILED {r['stage']}: {r['item']} ({r['error'][:200]})")
    for r in s.get("launch_overhead") or []:
        lines += ["", f"launch overhead {r['name']}: eager {_fmt(r.get('eager_ms'), 3)} ms, CUDA graph "
                      f"{_fmt(r.get('graph_ms'), 3)} ms (x{_fmt(r.get('ratio'))}), {r['status']}"
                      + (f": {r['error'][:200]}" if r.get("error") else "")]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- wheels


def _pip_target(wheel_dirs: list[Path], target: Path, extra: list[Path] = ()) -> list[str] | None:
    wheels = sorted(str(w) for d in wheel_dirs if d.is_dir() for w in d.glob("*.whl")) + [str(w) for w in extra]
    if not wheels:
        return None
    return [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
            "--no-cache-dir", "--disable-pip-version-check", "--target", str(target), *wheels]


def wheel_build(wheel: Path) -> dict[str, Any] | None:
    """The torch and CUDA a wheel's native extension was built against, from the build record it
    ships (xformers: ``xformers/cpp_lib.json``); None when it has none."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            name = next((n for n in zf.namelist() if n.endswith("/cpp_lib.json")), None)
            return json.loads(zf.read(name)).get("version") if name else None
    except (OSError, ValueError, zipfile.BadZipFile):
        return None


def matching_peer_wheels() -> tuple[list[Path], dict[str, str]]:
    """The wheels of ``.whl/peers`` built for this machine's torch (same minor version) and CUDA (same
    major version), and for each peer package what became of it."""
    import torch

    here_torch, here_cuda = torch.__version__, torch.version.cuda
    chosen, record = [], {}
    for wheel in sorted((WHEELS / "peers").glob("*.whl")):
        name = wheel.name.split("-")[0]
        build = wheel_build(wheel)
        if build is None:
            record[name] = f"skipped: {wheel.name} carries no build record (cpp_lib.json) to check against torch"
            continue
        cuda = build.get("cuda")
        built = f"torch {build.get('torch')}" + (f", CUDA {cuda // 100}.{cuda % 100}" if cuda else "")
        same_torch = str(build.get("torch", "")).split(".")[:2] == here_torch.split(".")[:2]
        same_cuda = bool(cuda and here_cuda) and cuda // 100 == int(here_cuda.split(".")[0])
        if same_torch and same_cuda:
            chosen.append(wheel)
            record[name] = f"installed ({wheel.name}, built for {built})"
        else:
            record[name] = (f"skipped: {wheel.name} was built for {built}; this machine has torch {here_torch}"
                            f"{f', CUDA {here_cuda}' if here_cuda else ' without CUDA'}")
    return chosen, record


def install_wheels(work: Path, log) -> tuple[str | None, subprocess.Popen | None, dict[str, Any]]:
    """``.whl/suite`` and the matching ``.whl/peers`` now (small; for the worker), ``.whl/upstream`` in
    the background (for the upstream worker only). Returns the suite's site folder, the background
    install and a record."""
    record: dict[str, Any] = {}
    suite_site = None
    peers, record["peers"] = matching_peer_wheels()
    write_json(work / "peer_wheels.json", record["peers"])
    cmd = _pip_target([WHEELS / "suite"], work / "suite_site", extra=peers)
    if cmd is not None:
        done = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        record["suite"] = "installed" if done.returncode == 0 else f"pip exited with {done.returncode} (see suite.log)"
        suite_site = str(work / "suite_site") if done.returncode == 0 else None
    else:
        record["suite"] = "no .whl/suite wheels"
    upstream = None
    cmd = _pip_target([WHEELS / "upstream", WHEELS / "suite"], work / "upstream_site")
    if cmd is not None:
        upstream = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        record["upstream"] = "installing"
    else:
        record["upstream"] = "no .whl/upstream wheels"
        write_json(work / "upstream_site.json", dict(ok=False, reason="no wheels in .whl/upstream (benchmarks/carry_wheels.sh)"))
    return suite_site, upstream, record


# ----------------------------------------------------------------------------- parent


class Supervisor:
    """Runs the stages in worker processes against the clock and keeps ``summary.json`` current."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.time()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.names = tuple(args.stages)
        self.deadlines = schedule(self.t0, args.budget_s, self.names, args.dry_run)
        self.budget_end = self.t0 + args.budget_s
        self.remaining = list(self.names)
        self.work = Path(tempfile.mkdtemp(prefix="gpu-suite-"))
        self.log = open(self.out / "suite.log", "a", buffering=1)
        self.log.write(f"== gpu_suite {' '.join(sys.argv[1:])} (work {self.work})\n")
        suite_site, self.upstream_install, self.wheels = install_wheels(self.work, self.log)
        self.estimates: dict[str, float] = {}
        if not args.dry_run:  # the plan (plan.json; each stage's estimate in the summary), made beside the work
            threading.Thread(target=self.plan, daemon=True).start()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), suite_site, self.env.get("PYTHONPATH")) if p)
        if args.dry_run:
            self.env["TRITON_INTERPRET"] = "1"
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, also on a machine with a GPU
        else:
            self.env.pop("TRITON_INTERPRET", None)

    def plan(self) -> None:
        plan = build_plan(self.args.budget_s)
        write_json(self.out / "plan.json", plan)
        self.estimates.update({s["name"]: s["estimated_s"] for s in plan["stages"]})

    def say(self, message: str) -> None:
        print(f"[{time.time() - self.t0:6.1f} s] {message}", flush=True)

    def summarise(self) -> dict[str, Any]:
        summary = build_summary(self.work, self.args, self.t0, self.names, self.deadlines, self.wheels,
                                self.estimates)
        write_json(self.out / "summary.json", summary)
        return summary

    def mark(self, name: str, status: str, error: str) -> None:
        """Close a stage the worker could not close (killed, crashed, never started)."""
        rec = read_stage(self.work, name) or dict(stage=name, data={}, started=time.time())
        rec.update(status=status, error=error, elapsed_s=round(time.time() - rec.get("started", time.time()), 1))
        write_json(stage_path(self.work, name), rec)
        self.say(f"{name}: {status} ({error})")

    def poll_install(self) -> None:
        """Tell the end-to-end stage (through a marker file) once the upstream wheels are unpacked."""
        proc = self.upstream_install
        if proc is not None and proc.poll() is not None:
            ok = proc.returncode == 0
            self.wheels["upstream"] = "installed" if ok else f"pip exited with {proc.returncode} (see suite.log)"
            write_json(self.work / "upstream_site.json",
                       dict(ok=ok, path=str(self.work / "upstream_site"), reason=self.wheels["upstream"]))
            self.upstream_install = None

    def pop_finished(self) -> None:
        while self.remaining and (read_stage(self.work, self.remaining[0]) or {}).get("status") in FINAL:
            name = self.remaining.pop(0)
            self.say(f"{name}: {read_stage(self.work, name)['status']}")

    def deadline(self) -> float:
        return min(self.deadlines[self.remaining[0]], self.budget_end)

    def spawn_worker(self) -> None:
        """One worker for the remaining stages; returns when it exits or is killed at a deadline."""
        args = self.args
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(self.work), "--t0", repr(self.t0),
               "--budget-s", str(args.budget_s), "--stages", ",".join(self.remaining),
               "--all-stages", ",".join(self.names)] + (["--dry-run"] if args.dry_run else [])
        worker = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO_ROOT,
                                  start_new_session=True)  # its own process group: a kill takes its children too
        seen: dict[str, float] = {}
        try:
            while worker.poll() is None:
                self.poll_install()
                self.pop_finished()
                if self.remaining and time.time() > self.deadline():
                    os.killpg(worker.pid, signal.SIGKILL)
                    worker.wait()
                    name, deadline = self.remaining[0], self.deadline()
                    self.remaining.pop(0)
                    self.mark(name, "timeout", f"killed at its deadline, {deadline - self.t0:.0f} s into the run")
                    return
                stamps = {n: stage_path(self.work, n).stat().st_mtime for n in self.names
                          if stage_path(self.work, n).exists()}
                if stamps != seen:
                    seen = stamps
                    self.summarise()
                time.sleep(0.2)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        self.pop_finished()
        if self.remaining and worker.returncode != 3:  # 3: a stage left the GPU unusable; a fresh worker goes on
            self.mark(self.remaining.pop(0), "failed" if worker.returncode else "skipped",
                      f"worker exited with {worker.returncode} (see suite.log)")

    def run(self) -> int:
        try:
            self.summarise()
            while self.remaining:
                if time.time() > self.deadline() - 1.0:
                    self.mark(self.remaining.pop(0), "skipped", "no time left in the budget")
                else:
                    self.spawn_worker()
            summary = self.summarise()
        finally:
            if self.upstream_install is not None:
                self.upstream_install.kill()
            shutil.rmtree(self.work, ignore_errors=True)
            self.log.close()
        table = format_summary(summary)
        (self.out / "summary.md").write_text(table)
        print(table)
        files = ("summary.json", "summary.md", "suite.log") + (() if self.args.dry_run else ("plan.json",))
        print(f"wrote {', '.join(str(self.out / f) for f in files)}")
        return 0


# ----------------------------------------------------------------------------- worker


def run_worker(args: argparse.Namespace) -> int:
    work = Path(args.worker)
    deadlines = schedule(args.t0, args.budget_s, tuple(args.all_stages), args.dry_run)
    for name in args.stages:
        ctx = StageContext(name=name, work=work, deadline=deadlines[name],
                                        soft_deadline=deadlines[name] - SOFT_MARGIN * args.budget_s,
                                        dry_run=args.dry_run, all_stages=tuple(args.all_stages))
        if not suite_stages.run_stage(ctx):
            return 3  # the device is unusable (sticky CUDA error): a fresh process for the next stage
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", help="output folder (default: $OUT)")
    parser.add_argument("--budget-s", type=float, help="hard wall-clock budget, compilation included "
                        "(default 360; 170 with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    parser.add_argument("--plan", action="store_true", help="write plan.json (caps, items, estimates, compile "
                        "specialisations) and exit: 1 if the plan breaks a cap or the compile report's limits")
    parser.add_argument("--stages", default=",".join(STAGE_NAMES), help="comma list, in order (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--t0", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--all-stages", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in args.stages if s not in STAGE_NAMES]
    if unknown or not args.stages:
        parser.error(f"--stages takes a comma list of {', '.join(STAGE_NAMES)}; got {unknown or 'nothing'}")
    args.all_stages = args.all_stages.split(",") if args.all_stages else args.stages
    if args.budget_s is None:
        args.budget_s = 170.0 if args.dry_run else 360.0
    if args.budget_s <= 0:
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    if args.worker is None:
        args.out = args.out or os.environ.get("OUT")
        if not args.out:
            parser.error("--out is required when $OUT is not set")
    return args


def write_plan(args: argparse.Namespace) -> int:
    plan = build_plan(args.budget_s)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "plan.json", plan)
    print(format_plan(plan))
    print(f"wrote {out / 'plan.json'}")
    return 1 if plan["problems"] else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args)
    return write_plan(args) if args.plan else Supervisor(args).run()


if __name__ == "__main__":
    sys.exit(main())
