"""What the benchmarks share: the environment stamp, timers, peak memory, error records, and
the op scripts' common arguments and result files.

Imports nothing from this project (the standard library and torch only), so that upstream
PS3's worker (``upstream_worker.py``) can load this file in upstream's environment, where
``ps3`` is upstream's package.
"""

from __future__ import annotations

import argparse
import collections
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
import traceback
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding ``ps3``: the repository in a checkout


def error_text(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 500 characters: an error as a record field."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:500]


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


# ----------------------------------------------------------------------------- the timer

L2_FLUSH_BYTES = 256 * 2**20  # larger than any L2 (H100 50 MB, H200 60 MB)
_TIMER_NAMES = {"cuda": "cuda_events_l2_flushed", "graph": "cuda_graph_replay_l2_flushed", "cpu": "perf_counter"}


@dataclass
class Timing:
    """What :func:`bench` measured: the median and spread of ``reps`` calls after ``warmup`` calls."""

    ms: float  # median
    min_ms: float
    max_ms: float
    warmup: int
    reps: int
    timer: str
    peak_mem_mb: float | None = None  # of the first warm-up call (CUDA, ``peak_memory=True``)

    def record(self) -> dict[str, Any]:
        return dict(ms=self.ms, min_ms=self.min_ms, max_ms=self.max_ms, warmup=self.warmup, reps=self.reps,
                    timer=self.timer)


def bench(fn: Callable[[], Any], warmup: int = 3, reps: int = 10, *, cuda: bool | None = None,
          grad_to_none: Sequence[torch.Tensor] | None = None, peak_memory: bool = False,
          graph: bool = False) -> Timing:
    """The one timer of every benchmark here: ``warmup`` untimed calls, then ``reps`` timed calls.

    CUDA (``cuda`` defaults to whether a GPU is visible): before each timed call the L2 cache is
    flushed (a 256 MiB buffer zeroed) and the gradients of ``grad_to_none`` are dropped, both
    outside the timed region; each call sits between two CUDA events, read once at the end, so
    a call whose host work outlasts its kernels is timed as the host sees it. ``graph=True``
    captures one call in a CUDA graph (after the warm-up, on a side stream) and times its replays
    the same way: device time without the host's launch work. ``peak_memory``: the first warm-up
    call runs alone after ``torch.cuda.reset_peak_memory_stats`` and its
    ``max_memory_allocated`` is returned (weights and inputs included; needs ``warmup >= 1``).
    CPU: ``time.perf_counter`` around each call (no cache flush).
    """
    if warmup < 0 or reps < 1 or (peak_memory and warmup < 1):
        raise ValueError(f"bench needs warmup >= 0 (>= 1 with peak_memory) and reps >= 1, got {warmup}, {reps}")
    cuda = torch.cuda.is_available() if cuda is None else cuda
    if not cuda:
        if graph:
            raise ValueError("bench(graph=True) needs CUDA")
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return Timing(statistics.median(times), min(times), max(times), warmup, reps, _TIMER_NAMES["cpu"])
    peak = None
    if peak_memory:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    for _ in range(warmup - int(peak_memory)):
        fn()
    call = fn
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # allocations of the captured call come from the graph's pool after this
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            fn()
        call = captured.replay
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        for t in grad_to_none or ():
            t.grad = None
        start.record()
        call()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) for start, end in events]
    return Timing(statistics.median(times), min(times), max(times), warmup, reps,
                  _TIMER_NAMES["graph" if graph else "cuda"], peak)


def measure_call(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, warmup: int,
                 reps: int) -> tuple[Timing, float, str]:
    """Latency (:func:`bench`, counts) and peak memory of ``fn(x)``: ``(timing, peak MiB, how)``.

    CUDA: the peak of the first warm-up call (see :func:`bench`); CPU: one call of its own
    (:func:`measure_peak_memory`) before the timer's calls.
    """
    if x.is_cuda:
        timing = bench(lambda: fn(x), max(warmup, 1), max(reps, 1), cuda=True, peak_memory=True)
        return timing, timing.peak_mem_mb, "cuda_max_memory_allocated"
    peak, kind = measure_peak_memory(fn, x)
    return bench(lambda: fn(x), max(warmup, 0), max(reps, 1), cuda=False), peak, kind


def _proc_status_kb(field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(match.group(1))


def malloc_trim() -> None:
    """Hand freed heap memory back to the system (glibc): freed tensors stay in the process's
    resident set otherwise, which matters before another process needs the memory."""
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
        malloc_trim()
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


# ----------------------------------------------------------------------------- live tensor bytes


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages alive at once, counted the same way on every device.

    A storage counts from the first op that makes or reads it (every op's inputs and outputs,
    forward and backward, recomputed checkpoint blocks and the optimizer's included) until it is
    freed (a weakref finalizer on the storage), each storage once however many views share it;
    tensors saved for backward count because they keep their storage alive. Storages given to
    :meth:`track` (parameters, gradients, optimizer state, inputs) count from then on. This is
    ``torch.cuda.max_memory_allocated`` over the same span without the allocator's rounding
    (CUDA rounds blocks up to 512 bytes) and without memory a kernel allocates for itself
    (workspaces, temporaries inside one op) or that no op on this thread touches, so a CPU run
    gives what a GPU allocator would need for the tensors. The autograd engine's threads
    inherit the mode, so backward is seen on every device.

    ``where=True`` also labels each storage with the op and the three innermost frames of the
    calling code outside torch that made it, and keeps the live storages at the peak: :meth:`at_peak`
    sums them by label (where the bytes at the peak come from). Slower: for diagnosis.
    """

    def __init__(self, where: bool = False):
        super().__init__()
        self.where = where
        self.current = self.peak = 0
        self._live: dict[int, tuple[int, str]] = {}
        self._at_peak: dict[int, tuple[int, str]] = {}

    def track(self, tensors, label: str = "alive at start") -> "LiveBytes":
        """Count the storages of ``tensors`` (an iterable, nested containers allowed) from now on."""
        for t in tree_leaves(list(tensors)):
            if isinstance(t, torch.Tensor):
                self._add(t, label)
        return self

    def _add(self, t: torch.Tensor, label: str | None) -> None:
        if t.device.type == "meta" or t.is_sparse or type(t) not in (torch.Tensor, torch.nn.Parameter):
            return
        storage = t.untyped_storage()
        key, size = id(storage), storage.nbytes()
        known = self._live.get(key)
        if known is not None and known[0] == size:
            return
        if known is None:
            weakref.finalize(storage, self._free, key)
            label = label if label is not None else self._label()
        else:  # resized in place (an out= op growing an empty tensor)
            self.current -= known[0]
            label = known[1]
        self._live[key] = (size, label)
        self.current += size
        if self.current > self.peak:
            self.peak = self.current
            if self.where:
                self._at_peak = dict(self._live)

    def _free(self, key: int) -> None:
        size, _ = self._live.pop(key)
        self.current -= size

    def _label(self) -> str:
        if not self.where:
            return ""
        frames = [f for f in traceback.extract_stack(limit=60)[:-3]
                  if f"{os.sep}torch{os.sep}" not in f.filename and not f.filename.endswith("harness.py")]
        return "<".join([self._op] + [f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames[-3:])])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._op = str(func.overloadpacket.__name__)
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                self._add(t, "read, made before")
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t, None)
        return out

    def reset_peak(self) -> None:
        """Start a new span: the peak restarts from the bytes alive now."""
        self.peak = self.current
        self._at_peak = dict(self._live) if self.where else {}

    def at_peak(self, top: int = 20) -> list[tuple[str, int]]:
        """Bytes alive at the peak by label, largest first (needs ``where=True``)."""
        sums: collections.Counter = collections.Counter()
        for size, label in self._at_peak.values():
            sums[label] += size
        return sums.most_common(top)


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
