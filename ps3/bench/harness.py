"""What the benchmarks share: the environment stamp, timers, peak memory, error records, and
the op scripts' common arguments and result files.

Imports nothing from this project (the standard library and torch only), so that upstream
PS3's worker (``upstream_worker.py``) can load this file in upstream's environment, where
``ps3`` is upstream's package.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding ``ps3``: the repository in a checkout


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 500 characters: an error as a record field."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------- timers


def gpu_ms(fn: Callable[[], Any], grad_to_none: Sequence[torch.Tensor] | None = None,
           warmup: int = 25, rep: int = 100) -> float:
    """Median ms of ``fn()`` by ``triton.testing.do_bench`` (``warmup`` and ``rep`` in ms)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median"))


def wall_ms(fn: Callable[[], Any]) -> float:
    """Ms of one ``fn()`` call by ``time.perf_counter``."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def cuda_event_ms(fn: Callable[[], Any]) -> float:
    """Ms of one ``fn()`` call between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def measure_latency(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, warmup: int, reps: int) -> tuple[float, str]:
    """Median latency (ms) of ``fn(x)`` and the timer used.

    CUDA: ``triton.testing.do_bench`` (``warmup``/``reps`` in ms; CUDA events with
    ``warmup`` and ``reps`` as counts if Triton is missing). CPU: ``time.perf_counter``
    over ``reps`` calls after ``warmup`` untimed ones.
    """
    if x.is_cuda:
        try:
            return gpu_ms(lambda: fn(x), warmup=warmup, rep=reps), "triton.do_bench"
        except ImportError:
            pass
        for _ in range(max(warmup, 1)):
            fn(x)
        return statistics.median(cuda_event_ms(lambda: fn(x)) for _ in range(max(reps, 1))), "cuda_events"
    for _ in range(warmup):
        fn(x)
    return statistics.median(wall_ms(lambda: fn(x)) for _ in range(max(reps, 1))), "perf_counter"


def _proc_status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure_peak_memory(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> tuple[float, str]:
    """Peak memory (MiB) of one ``fn(x)`` call and how it was measured.

    CUDA: ``torch.cuda.max_memory_allocated`` (weights and inputs included). CPU (Linux):
    growth of the resident set's high-water mark over the call (reset through
    ``/proc/self/clear_refs`` after ``malloc_trim`` hands freed heap back to the system);
    memory the C allocator still caches can hide part of it. Elsewhere the growth of
    ``ru_maxrss``, which only sees peaks above earlier ones (a lower bound).
    """
    if x.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fn(x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated"
    try:
        _malloc_trim()
        Path("/proc/self/clear_refs").write_text("5")
        before = _proc_status_kb("VmRSS")
        fn(x)
        return (_proc_status_kb("VmHWM") - before) / 1024, "cpu_rss_high_water_delta"
    except OSError:
        unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fn(x)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (after - before) * unit / 2**20, "cpu_ru_maxrss_delta_lower_bound"


# ----------------------------------------------------------------------------- environment


def git_commit() -> str | None:
    """The commit of the checkout this package runs from (``-dirty`` with uncommitted changes);
    None for an installed copy, even one inside another repository."""
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=PACKAGE_ROOT, capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        if len(top) != 2 or Path(top[0]).resolve() != PACKAGE_ROOT:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PACKAGE_ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return top[1] + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, Any]:
    """Versions, device and git commit, stamped on every record."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device == "cuda" and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    else:
        device_name = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return {"device": device_name, "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "git_commit": git_commit()}


# ----------------------------------------------------------------------------- op benchmark scripts


def op_parser(doc: str, batches: list[int], resolutions: list[int] | None = None,
              dtype: str | None = None) -> argparse.ArgumentParser:
    """The op benchmarks' common arguments: ``--out`` (a JSON file), ``--batches``, and where the
    op takes them ``--resolutions`` and ``--dtype`` (None: the script has no such argument)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--batches", type=int, nargs="+", default=batches)
    if resolutions is not None:
        parser.add_argument("--resolutions", type=int, nargs="+", default=resolutions)
    if dtype is not None:
        parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=dtype)
    return parser


def require_cuda(script: str) -> None:
    if not torch.cuda.is_available():
        sys.exit(f"{script} times CUDA kernels and needs a CUDA GPU; none is visible.")


def write_results(path: str | os.PathLike, meta: dict[str, Any], results: list[dict[str, Any]],
                  failed: Sequence[str] = (), failure: str = "") -> None:
    """Write ``{"meta": environment stamp + meta, "results": results}`` to ``path``; then, if
    entries ``failed`` their correctness check, exit with ``failure`` and their names (after
    writing: a correctness miss must not lose the timings)."""
    with open(path, "w") as f:
        json.dump(dict(meta=dict(environment("cuda"), **meta), results=results), f, indent=1)
    print(f"wrote {path}")
    if failed:
        sys.exit(f"{failure} in: {', '.join(failed)}")
