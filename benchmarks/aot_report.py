"""Compile every Triton specialisation of the GPU suite and of PS3 forward and backward passes for
sm_90 without a GPU: compile seconds, registers, spills, shared memory, MMA kind.

What is compiled is what the code launches: the suite's compile workloads (``suite_stages``:
each work item's kernels at PS3-4K shapes, SO400M 16 heads x 72, the upstream-fixture and test
models, every launch variant) and a PS3-4K and PS3-1.5K forward and backward, run on CPU tensors
with every Triton launch recorded instead of run (``triton_launches.py``). Each distinct
specialisation (constexprs, dtypes, 16-byte alignment, integers equal to 1 or divisible by 16,
warps and stages; the key Triton's launcher would compute) becomes one row, listing the workloads
that launch it, and is compiled with ``GPUTarget("cuda", 90, 32)`` (sm_90a; no driver needed) in
a child process with a time limit (``--timeout-s``) and a memory limit, so a row that compiles for
minutes is recorded as over the limit (``timed_out``) instead of holding up the report. ptxas' own
report of that build gives registers and spill bytes; Triton's metadata the shared memory; the
PTX whether the dots became ``wgmma`` (Hopper warpgroup MMA), ``mma.sync`` or plain FMA.

    python benchmarks/aot_report.py --out benchmarks/results/aot-sm90.json      # everything (~15 min)
    python benchmarks/aot_report.py --subset ci --out /tmp/aot.json --fail-on-spill

``gpu_suite.py --plan`` reads the committed report for its compile estimates, and CI fails when a
specialisation of the plan is missing from it or took more than 15 s. Runs with
``TRITON_INTERPRET`` unset (it is removed before triton is imported); needs triton's bundled
ptxas, not a GPU. ``--fail-on-spill`` exits 1 when a kernel fails to compile or a bf16/fp16 kernel
spills (fp32 is a correctness path, not a tuned one).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import io
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# The compiler path must not be the interpreter's, whatever the caller's environment says.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # make ptxas run (and report) even when a build is cached
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
if "TRITON_CACHE_DIR" not in os.environ:  # a private cache, removed at exit
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aot-triton-cache-")
    atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "benchmarks"), str(REPO_ROOT / "tests")]

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402

from ps3.bench.harness import environment  # noqa: E402
from ps3_kernels import use_backend  # noqa: E402
from suite_stages import stage_workloads  # noqa: E402
from suite_stages.base import GPU, Workload  # noqa: E402
from suite_stages.workloads import attention, encoder, patch_embed, selection  # noqa: E402
from triton_launches import Launch, recorded_launches, signature_key  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
MEMORY_LIMIT = 8 * 2**30  # resident memory of one compile (the old small-grid scoring kernel wanted more)


@dataclasses.dataclass
class Build:
    """What Triton compiles for one specialisation (the launch's tensors are not kept)."""

    fn: Any
    signature: dict
    constexprs: dict
    attrs: dict
    options: Any


# ----------------------------------------------------------------------------- specialising


def specialise(launch: Launch) -> Build:
    """What Triton's launcher would compile for this call (its binder and argument packing)."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return Build(fn, signature, constexprs, attrs, options)


def triton_key(build: Build) -> str:
    return repr((build.fn.__name__, build.signature, build.constexprs, build.attrs, build.options.num_warps,
                 build.options.num_stages))


# ----------------------------------------------------------------------------- reading the build


_PTXAS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _ptxas_numbers(log: str) -> dict[str, int] | None:
    found = {k: p.search(log) for k, p in _PTXAS.items()}
    return None if found["registers"] is None else {k: int(m.group(1)) if m else 0 for k, m in found.items()}


def _rerun_ptxas(ptx: str) -> str:
    """ptxas -v on the PTX, for Triton versions that do not print their own ptxas log."""
    from triton import knobs

    tool = getattr(knobs.nvidia, "ptxas_blackwell", None) or knobs.nvidia.ptxas
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([tool.path, "-v", "--gpu-name=sm_90a", str(src), "-o", str(src.with_suffix(".o"))],
                              capture_output=True, text=True, check=True)
    return done.stderr + done.stdout


def _mma_kind(ptx: str) -> str:
    if "wgmma.mma_async" in ptx:
        return "wgmma"
    if "mma.sync" in ptx:
        return "mma.sync"
    return "fma"


def _config(constexprs: dict, options: Any, fn: Any) -> dict[str, Any]:
    """Launch parameters: tile constexprs (BLOCK_*, head-dim tiles, flags) and warps/stages."""
    names = [p.name for p in fn.params]
    out = {}
    for key, value in constexprs.items():
        name = names[key[0]] if isinstance(key, tuple) else str(key)
        if isinstance(value, (bool, int)) and name.isupper():
            out[name] = value
    out.update(num_warps=options.num_warps, num_stages=options.num_stages)
    return out


def compile_build(build: Build) -> dict[str, Any]:
    """One report row's build fields (compile errors are rows with ``ok: False``)."""
    row: dict[str, Any] = dict(config=_config(build.constexprs, build.options, build.fn))
    start = _own_cpu_seconds()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(build.fn, build.signature, build.constexprs, build.attrs),
                                    target=TARGET, options=build.options.__dict__)
    except Exception as exc:  # noqa: BLE001 - a compile failure is a result
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:2000]}",
                   cpu_s=_own_cpu_seconds() - start)
        return row
    cpu_s = _own_cpu_seconds() - start
    numbers = _ptxas_numbers(log.getvalue()) or _ptxas_numbers(_rerun_ptxas(kernel.asm["ptx"]))
    ptx = kernel.asm["ptx"]
    row.update(
        ok=True, registers=numbers["registers"], spills=numbers["spill_stores"] + numbers["spill_loads"],
        spill_stores=numbers["spill_stores"], spill_loads=numbers["spill_loads"], stack_frame=numbers["stack_frame"],
        shared_mem=kernel.metadata.shared, mma=_mma_kind(ptx), dot="tt.dot" in kernel.asm["ttir"],
        wgmma_count=ptx.count("wgmma.mma_async"), cpu_s=cpu_s,
    )
    return row


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (ptxas)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _proc_stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children so far (live ones included: ptxas runs as one)."""
    try:
        fields = _proc_stat(pid)
        ticks = sum(int(fields[i]) for i in (11, 12, 13, 14))  # utime, stime, cutime, cstime
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, IndexError, ValueError):
        return 0.0
    return ticks / os.sysconf("SC_CLK_TCK") + sum(_cpu_seconds(int(c)) for c in children)


def _resident_bytes(pid: int) -> int:
    try:
        return int(_proc_stat(pid)[21]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def compile_with_limit(build: Build, timeout_s: float) -> dict[str, Any]:
    """:func:`compile_build` in a forked child. ``compile_s`` is the CPU time the compile took (the
    child and its ptxas), what one core of the GPU host spends on it whatever else runs here
    (``wall_s``: the wall time on this machine). Stopped past ``timeout_s`` CPU seconds (then
    ``timed_out: true`` and ``compile_s`` is that limit, a lower bound), past ten times that in
    wall time, or above :data:`MEMORY_LIMIT` of resident memory."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=lambda: child.send(compile_build(build)))
    start = time.perf_counter()
    proc.start()
    child.close()
    base = _cpu_seconds(proc.pid)  # the fork itself
    row, reason, cpu = None, None, 0.0
    while row is None and reason is None:
        if parent.poll(0.5):
            try:
                row = parent.recv()
            except EOFError:
                reason = f"the compile process died (exit code {proc.exitcode})"
            break
        cpu = _cpu_seconds(proc.pid) - base
        if cpu >= timeout_s or time.perf_counter() - start >= 10 * timeout_s:
            reason = "timeout"
        elif _resident_bytes(proc.pid) > MEMORY_LIMIT:
            reason = f"stopped above {MEMORY_LIMIT >> 30} GiB of resident memory"
    if row is not None:
        cpu = row.pop("cpu_s")
    proc.kill()
    proc.join()
    wall = round(time.perf_counter() - start, 2)
    if reason == "timeout":
        return dict(ok=False, timed_out=True, compile_s=float(timeout_s), wall_s=wall,
                    error=f"still compiling after {cpu:.0f} CPU s, {wall:.0f} s (stopped)")
    if row is None:
        return dict(ok=False, timed_out=False, compile_s=round(cpu, 2), wall_s=wall, error=reason)
    return dict(row, timed_out=False, compile_s=round(cpu, 2), wall_s=wall)


# ----------------------------------------------------------------------------- workloads


def tiny_test_model(backward: bool) -> Workload:
    """The tests' tiny model (``tests/helpers.py``), fp32, two images of different sizes."""
    def run(device: str) -> None:
        from helpers import tiny_vision_config
        from ps3 import PS3VisionModel

        model = PS3VisionModel(tiny_vision_config()).to(device).requires_grad_(backward)
        images = [torch.randn(3, 224, 180, device=device), torch.randn(3, 150, 224, device=device)]
        with use_backend("triton"), torch.set_grad_enabled(backward):
            out = model(images, num_look_close=2).last_hidden_state  # a list: one tensor per image
            if backward:
                sum(o.sum() for o in out).backward()

    return Workload(f"tests' tiny model {'fwd+bwd' if backward else 'fwd'}", run)


def report_workloads(subset: str) -> dict[str, Workload]:
    """``ci``: bf16 attention over a prefix, the bf16 patch embed and the bf16 scoring at a 4x4 grid,
    forward and backward; ``check``:
    the cheap workloads of every kind (the ops at B = 1 in each dtype, three fixture cases, a no-sync
    forward, the tests' tiny model); ``full``: every workload of the suite's stages, then PS3-4K
    and PS3-1.5K forward and backward passes (SO400M shapes, bf16), the scoring's backward, and
    the tests' tiny model."""
    if subset == "ci":  # with the scoring at a small model's 4x4 grid: its largest pooling bins
        return {w.name: w for w in (attention(GPU, "bf16", 1, True), patch_embed(GPU, "bf16", 1),
                                    selection(GPU, "bf16", 1, backward=True, low_grid=4))}
    if subset == "check":
        from test_model_parity import TRITON_CASES

        from suite_stages.workloads import no_sync_forward, parity_case

        works = [attention(GPU, tag, 1, look) for tag in ("bf16", "fp16", "fp32") for look in (True, False)]
        works += [patch_embed(GPU, "bf16", 1), selection(GPU, "bf16", 1, backward=True), selection(GPU, "fp32", 1),
                  *(parity_case(c) for c in TRITON_CASES[:3]), no_sync_forward(0), tiny_test_model(True)]
        return {w.name: w for w in works}
    out = dict(stage_workloads(GPU))
    ps3_15k = dataclasses.replace(GPU, e2e_preset="gpu-1.5k", e2e_resolution=1512)
    for w in (encoder(GPU, "ps3-1", 1, backward=True), encoder(ps3_15k, "ps3-1", 1),
              encoder(ps3_15k, "ps3-1", 1, backward=True), encoder(ps3_15k, "ps3-6", 2),
              *(selection(GPU, tag, 1, backward=True) for tag in ("bf16", "fp16", "fp32")),
              selection(GPU, "bf16", 1, backward=True, low_grid=4), tiny_test_model(False), tiny_test_model(True)):
        out.setdefault(w.name, w)
    return out


# ----------------------------------------------------------------------------- the report


def _dtype(key: str) -> str:
    """The kernel's input dtype: a 16-bit float among its pointers if any (fp32 buffers beside them are
    accumulators and saved statistics), else ``fp32``, else ``int``."""
    found = set(re.findall(r":\*(bf16|fp16|fp32)", key))
    return next((d for d in ("bf16", "fp16", "fp32") if d in found), "int")


def _variant(workload: str) -> str:
    found = re.search(r"\[(\w+)\]$", workload)
    return found.group(1) if found else "default"


def record(workloads: dict[str, Workload], log: Callable[[str], None] = print
           ) -> tuple[dict[str, tuple[Launch, Build]], dict[str, list[str]], dict[str, dict[str, Any]]]:
    """Run every workload with launches recorded: the first launch of each key with its build, the
    workloads of each key, and per workload its recording seconds, launch count and specialisations.
    Checks that the keys split the launches exactly as Triton's own specialisation does."""
    first: dict[str, tuple[Launch, Build]] = {}
    users: dict[str, list[str]] = {}
    info: dict[str, dict[str, Any]] = {}
    triton_keys: dict[str, str] = {}
    for name, work in workloads.items():
        start = time.process_time()  # CPU seconds: what a core spends whatever else runs here
        with recorded_launches(fake_cuda=True) as launches:
            work.run("cpu")
        seconds = round(time.process_time() - start, 2)
        for launch in launches:
            build = specialise(launch)
            if triton_keys.setdefault(launch.key, triton_key(build)) != triton_key(build):
                raise RuntimeError(f"triton_launches.spec_key merges two of Triton's specialisations: {launch.key}")
            if launch.key not in first:  # the launch's tensors are dropped: only what the compile needs stays
                first[launch.key] = (dataclasses.replace(launch, args=(), kwargs={}), build)
            if name not in users.setdefault(launch.key, []):
                users[launch.key].append(name)
        specs = list(dict.fromkeys(launch.spec_id for launch in launches))
        info[name] = dict(record_s=seconds, launches=len(launches), specs=specs)
        log(f"recorded {name}: {len(launches)} launches, {len(specs)} specialisations ({seconds} CPU s)")
        del launches
    if len(set(triton_keys.values())) != len(triton_keys):
        raise RuntimeError("triton_launches.spec_key splits one of Triton's specialisations in two")
    return first, users, info


def report(subset: str, timeout_s: float, log: Callable[[str], None] = print
           ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    first, users, info = record(report_workloads(subset), log)
    rows = []
    for key, (launch, build) in first.items():
        row = dict(spec_id=launch.spec_id, kernel=launch.kernel, dtype=_dtype(key), workload=users[key][0],
                   variant=_variant(users[key][0]), workloads=users[key], key=key, signature=signature_key(key),
                   grid=list(launch.grid) if isinstance(launch.grid, tuple) else None,
                   **compile_with_limit(build, timeout_s))
        rows.append(row)
        log(format_row(row))
    return rows, info


def check(path: Path) -> int:
    """Exit code 1, with the differences, when ``path`` is stale for the ``check`` workloads."""
    committed = json.loads(path.read_text())
    first, _, info = record(report_workloads("check"), log=lambda line: None)
    names = {r["spec_id"]: r["kernel"] for r in committed["rows"]}
    names.update({launch.spec_id: launch.kernel for launch, _ in first.values()})
    stale = []
    for name, now in info.items():
        then = committed["workloads"].get(name)
        if then is None:
            stale.append(f"{name}: not in {path}")
        elif set(then["specs"]) != set(now["specs"]):
            new, gone = (sorted(f"{names[s]} {s}" for s in a - b) for a, b in
                         ((set(now["specs"]), set(then["specs"])), (set(then["specs"]), set(now["specs"]))))
            stale.append(f"{name}: launches {new} that the report does not have, no more {gone}")
    for line in stale:
        print("STALE:", line)
    if stale:
        print(f"regenerate it: python benchmarks/aot_report.py --out {path}")
    return 1 if stale else 0


def format_row(r: dict[str, Any]) -> str:
    head = f"{r['kernel']:18s} {r['dtype']:5s} {r['compile_s']:6.1f} s  {r['workload'][:44]:44s}"
    if r.get("timed_out"):
        return f"{head} TIMED OUT"
    if not r["ok"]:
        return f"{head} FAILED {r['error'][:200]}"
    config = " ".join(f"{k}={v}" for k, v in r["config"].items() if k.startswith("BLOCK") or k.startswith("num_"))
    return f"{head} regs {r['registers']:3d} spills {r['spills']:5d} smem {r['shared_mem']:6d} {r['mma']:8s} {config}"


def problems(rows: list[dict[str, Any]]) -> list[str]:
    """Compile failures (time-outs included), and spills in 16-bit kernels."""
    out = [f"{r['kernel']} {r['dtype']} {r['workload']}: {r['error'][:300]}" for r in rows if not r["ok"]]
    out += [f"{r['kernel']} {r['dtype']} {r['workload']}: spills {r['spills']} bytes"
            for r in rows if r["ok"] and r["dtype"] in ("bf16", "fp16") and r["spills"]]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=["full", "ci"], default="full")
    parser.add_argument("--out", type=Path, help="JSON report (default: print only)")
    parser.add_argument("--timeout-s", type=float, default=60.0,
                        help="stop a compile after this long and record it as timed out (default 60)")
    parser.add_argument("--fail-on-spill", action="store_true",
                        help="exit 1 on a compile error or a spill in a bf16/fp16 kernel")
    parser.add_argument("--count", action="store_true",
                        help="record only: the specialisations of every kernel and workload, nothing compiled")
    parser.add_argument("--check", type=Path, metavar="REPORT",
                        help="record the cheap workloads of every kind and exit 1 unless REPORT lists the same "
                             "specialisations for them (a stale report)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if args.check:
        return check(args.check)
    if args.count:
        first, users, info = record(report_workloads(args.subset))
        kernels: dict[str, int] = {}
        for launch, _ in first.values():
            kernels[launch.kernel] = kernels.get(launch.kernel, 0) + 1
        print(f"{len(first)} specialisations from {len(info)} workloads: "
              + ", ".join(f"{k} {n}" for k, n in sorted(kernels.items())))
        return 0
    rows, info = report(args.subset, args.timeout_s)
    env = environment("cpu")
    meta = dict(target="cuda sm_90a (GPUTarget('cuda', 90, 32))", triton=triton.__version__, torch=torch.__version__,
                git_commit=env["git_commit"], subset=args.subset, seconds=round(time.perf_counter() - start, 1),
                timeout_s=args.timeout_s, machine=env["device"],
                fields="one row per specialisation (key: runtime argument types, :16 = 16-byte aligned or divisible "
                       "by 16, =1 = specialised to 1; constexprs; options); workloads: what launches it; compile_s: "
                       "offline compile seconds on this machine (timed_out: stopped at timeout_s); spills = spill "
                       "stores + spill loads (bytes per thread); shared_mem in bytes; mma: wgmma | mma.sync | fma")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, workloads=info, rows=rows), indent=1) + "\n")
        print(f"wrote {args.out} ({len(rows)} specialisations, {meta['seconds']} s)")
    bad = problems(rows)
    for line in bad:
        print("PROBLEM:", line, file=sys.stderr)
    return 1 if args.fail_on_spill and bad else 0


if __name__ == "__main__":
    sys.exit(main())
