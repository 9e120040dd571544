"""What the stages of ``gpu_suite.py`` share: the shapes, how a stage declares its work (items with
an estimate and the compile workloads they need), the context a stage runs in, the timer, and
small helpers.

A stage is a module with one ``STAGE = Stage(...)``: its share of the budget (its cap), and a
function from :class:`Shapes` to its :class:`WorkItem` list, in the order they run. The same list
is the plan (``gpu_suite.py --plan`` sums the estimates and looks the workloads' Triton
specialisations up in the committed compile report) and the work (:func:`run_stage` runs the
items while the stage has time for them, recording the others as skipped).
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ps3.bench.harness import Timing, bench, error_text

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shapes:
    """PS3-4K with SO400M shapes on the GPU; the same structure, tiny, for the dry run."""

    device: str
    heads: int
    head_dim: int
    prefix_len: int  # low-res tokens (the KV prefix of a look)
    look: int  # high-res tokens per look
    check_batches: tuple[int, ...]
    time_batches: tuple[int, ...]
    scales: tuple[int, ...]  # PS3 scales; the largest is the image side
    width: int
    patch: int
    patch_tokens: int  # high-res tokens per image in the patch embed and selection cases
    sel_hr_channels: int
    sel_hr_grid: int
    looks: int  # looks in the selection cases
    e2e_preset: str  # a ps3.bench preset
    e2e_resolution: int
    e2e_batches: tuple[int, ...]
    e2e_looks: tuple[int, ...]
    parity_cases: int | None  # None: all upstream fixtures
    op_timer: tuple[int, int]  # (warm-up calls, timed calls) of the op timings

    @property
    def resolution(self) -> int:
        return self.scales[-1]

    @property
    def low_grid(self) -> int:
        return self.scales[0] // self.patch

    @property
    def gpu(self) -> bool:
        return self.device == "cuda"


GPU = Shapes("cuda", 16, 72, 729, 2560, (1, 4), (16, 1), (378, 756, 1512, 3780), 1152, 14, 2560, 512, 54, 6,
             "gpu-4k", 3780, (1, 16), (1, 6), None, (5, 20))
DRY = Shapes("cpu", 2, 72, 9, 20, (1, 2), (1,), (56, 112, 224), 32, 14, 20, 8, 4, 6,
             "cpu-smoke", 756, (1,), (1, 6), 1, (0, 1))


# ----------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Workload:
    """Host code whose Triton launches are a work item's compile needs: ``run(device)`` calls the
    ops as the item does (same kernels, dtypes and launch configurations), usually smaller."""

    name: str
    run: Callable[[str], None]


@dataclass
class WorkItem:
    """One piece of a stage's work.

    ``est_s``: device seconds it takes once its kernels are compiled, estimated without a GPU
    (what the stage checks before starting it, and what the plan sums). ``workloads``: what it
    compiles (the plan and the precompile pool record them). ``optional``: not in the plan's
    estimate, run only when the stage still has the time. ``on_skip(ctx, reason)`` records the
    item as not run (default: an entry in ``skipped``).
    """

    name: str
    est_s: float
    run: Callable[["StageContext"], None]
    workloads: tuple[Workload, ...] = ()
    optional: bool = False
    on_skip: Callable[["StageContext", str], None] | None = None


@dataclass(frozen=True)
class Stage:
    name: str
    share: float  # of --budget-s: the stage's cap
    about: str
    items: Callable[[Shapes], list[WorkItem]]


def calls_s(ms: float, calls: int, overhead_s: float = 0.3) -> float:
    """Seconds for ``calls`` calls of ``ms`` each plus the host work around them (inputs, checks)."""
    return overhead_s + calls * ms / 1e3


# ----------------------------------------------------------------------------- context


@dataclass
class StageContext:
    name: str
    work: Path
    deadline: float  # wall clock: the parent kills the worker here
    soft_deadline: float  # no new piece of work starts after this
    dry_run: bool
    all_stages: tuple[str, ...] = ()
    data: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)  # shared by one stage's items
    started: float = 0.0

    @property
    def shapes(self) -> Shapes:
        return DRY if self.dry_run else GPU

    @property
    def cuda(self) -> bool:
        return not self.dry_run

    def _write(self, status: str, error: str | None = None) -> None:
        path = self.work / f"stage-{self.name}.json"
        tmp = path.with_name(path.name + ".tmp")
        rec = dict(stage=self.name, status=status, error=error, started=self.started,
                   elapsed_s=round(time.time() - self.started, 1), data=self.data)
        tmp.write_text(json.dumps(rec, indent=1, default=str, allow_nan=False) + "\n")
        tmp.replace(path)

    def begin(self) -> None:
        self.started = time.time()
        self._write("running")

    def finish(self, status: str, error: str | None = None) -> None:
        self._write(status, error)

    def add(self, key: str, item: dict[str, Any]) -> None:
        self.data.setdefault(key, []).append(clean(item))
        self._write("running")

    def set(self, key: str, value: Any) -> None:
        self.data[key] = clean(value)
        self._write("running")

    def left(self) -> float:
        return self.soft_deadline - time.time()

    def has_time(self, seconds: float) -> bool:
        return self.left() > seconds

    def previous(self, stage: str) -> dict[str, Any]:
        try:
            return json.loads((self.work / f"stage-{stage}.json").read_text()).get("data") or {}
        except (OSError, ValueError):
            return {}

    def log(self, message: str) -> None:
        print(f"[{self.name} {time.time() - self.started:6.1f} s] {message}", flush=True)

    def bench(self, fn: Callable[[], Any], counts: tuple[int, int] | None = None, **kwargs: Any) -> Timing:
        """The shared timer (:func:`ps3.bench.harness.bench`) with this run's counts: the op timings'
        on the GPU unless ``counts`` says otherwise, one call on the CPU (the dry run times the
        plumbing, not the numbers)."""
        warmup, reps = (counts or self.shapes.op_timer) if self.cuda else (0, 1)
        if kwargs.get("peak_memory"):
            warmup = max(warmup, 1)
        return bench(fn, warmup, reps, cuda=self.cuda, **kwargs)

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    def upstream_site(self, wait_s: float) -> tuple[str | None, str]:
        """The folder the parent unpacked ``.whl/upstream`` into, once its pip is done (or why not)."""
        marker = self.work / "upstream_site.json"
        end = time.time() + wait_s
        while not marker.exists() and time.time() < end:
            time.sleep(0.5)
        if not marker.exists():
            return None, f"the upstream wheels were still installing after {wait_s:.0f} s"
        info = json.loads(marker.read_text())
        return (info["path"], "") if info.get("ok") else (None, info.get("reason", "upstream wheels not installed"))


def clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (strict JSON has no inf/nan)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def seed() -> int:
    """Fresh inputs every run (recorded with each entry, to reproduce one)."""
    return int.from_bytes(os.urandom(4), "little") >> 1


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    from helpers import rel_err

    return rel_err(out.detach(), ref.detach())


_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
           "an illegal instruction")


def device_broken() -> bool:
    """Whether the CUDA context died (errors that no later call survives)."""
    if not torch.cuda.is_available():
        return False
    try:
        torch.cuda.synchronize()
        return False
    except RuntimeError as exc:
        return any(s in str(exc) for s in _STICKY)


# ----------------------------------------------------------------------------- running a stage


def run_items(ctx: StageContext, items: list[WorkItem]) -> None:
    """Each item that fits in what is left of the stage (its estimate on the GPU; on the CPU, where
    the estimates do not apply, any time at all), the others recorded as skipped with the reason."""
    for item in items:
        needed = item.est_s if ctx.cuda else 0.0
        if not ctx.has_time(needed):
            reason = f"no time left (needs ~{needed:.0f} s, {max(ctx.left(), 0):.0f} s left)"
            if item.on_skip is not None:
                item.on_skip(ctx, reason)
            else:
                ctx.add("skipped", dict(stage=ctx.name, item=item.name, reason=reason))
            ctx.log(f"{item.name}: skipped ({reason})")
            continue
        start = time.perf_counter()
        try:
            item.run(ctx)
        except Exception as exc:  # noqa: BLE001 - an item that breaks is a result; the stage goes on
            ctx.log(traceback.format_exc())
            ctx.add("failed_items", dict(stage=ctx.name, item=item.name, error=error_text(exc)))
            ctx.free()
        ctx.log(f"{item.name}: {time.perf_counter() - start:.1f} s (estimated {item.est_s:.1f} s)")
        if device_broken():
            raise RuntimeError(f"the CUDA context broke during {item.name}")
