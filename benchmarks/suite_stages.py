"""The stages of ``gpu_suite.py``, run in its worker process.

Each stage gets a :class:`StageContext`: it records entries as it goes (every record rewrites
the stage's JSON file, so a kill keeps what was measured) and checks its soft deadline before
each piece of work, recording what it had no time for as ``skipped``. A failing entry is a
result (``ok: False`` or ``status: failed``), never an exception out of the stage.

The checks and benchmarks reuse the project's pieces: the float64 attention reference of
``tests/test_varlen_attention.py``, the upstream fixtures of ``tests/test_model_parity.py``,
the host-read guard of ``tests/test_no_host_sync.py``, the case builders and upstream
emulations of ``benchmarks/bench_*.py``, and ``ps3.bench`` for FLOP counts, peak memory,
the dense baselines and the upstream worker.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

import bench_patch_embed
import bench_selection
import bench_varlen_attention
from launch_variants import VARIANTS, describe, use_variant
from ps3 import bench as ps3_bench
from ps3.bench.harness import cuda_event_ms, error_text, gpu_ms, is_oom, wall_ms
from ps3_kernels import use_backend
from ps3_kernels.backend import triton_interpreted
from ps3_kernels.varlen_attention import available_impls, prepare_impl, varlen_prefix_attention

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Relative Frobenius error against float64 (outputs; gradients get twice as much).
TOL = {"bf16": 1e-2, "fp16": 5e-3, "fp32": 1e-5}
PATCH_TOL = {"bf16": 5e-3, "fp16": 1e-3, "fp32": 1e-5}
SELECTION_TOL = {"bf16": 1e-2, "fp16": 5e-3, "fp32": 1e-6}
BF16_PEAK_TFLOPS = 790.0  # GPU_NOTES.md, when the ceilings stage did not measure one
NOTES_FLOORS_MS = {(1, 1): 4.8, (16, 1): 77.0}  # GPU_NOTES.md: PS3-4K, one look, batch 1 and 16


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
    e2e_preset: str
    e2e_batches: tuple[int, ...]
    e2e_looks: tuple[int, ...]
    parity_cases: int | None  # None: all upstream fixtures

    @property
    def resolution(self) -> int:
        return self.scales[-1]

    @property
    def low_grid(self) -> int:
        return self.scales[0] // self.patch


GPU = Shapes("cuda", 16, 72, 729, 2560, (1, 4), (1, 16), (378, 756, 1512, 3780), 1152, 14, 2560, 512, 54, 6,
             "gpu-4k", (1, 16), (1, 6), None)
DRY = Shapes("cpu", 2, 72, 9, 20, (1, 2), (1,), (56, 112, 224), 32, 14, 20, 8, 4, 6,
             "cpu-smoke", (1,), (1, 6), 1)


# ----------------------------------------------------------------------------- context


@dataclass
class StageContext:
    name: str
    work: Path
    deadline: float  # wall clock: the parent kills the worker here
    soft_deadline: float  # no new piece of work starts after this
    dry_run: bool
    data: dict[str, Any] = field(default_factory=dict)
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
        self.data.setdefault(key, []).append(_clean(item))
        self._write("running")

    def set(self, key: str, value: Any) -> None:
        self.data[key] = _clean(value)
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


def _clean(value: Any) -> Any:
    """JSON-safe: non-finite floats become None (strict JSON has no inf/nan)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


_STICKY = ("illegal memory access", "device-side assert", "unspecified launch failure", "misaligned address",
           "an illegal instruction")


def _device_broken() -> bool:
    """Whether the CUDA context died (errors that no later call survives)."""
    if not torch.cuda.is_available():
        return False
    try:
        torch.cuda.synchronize()
        return False
    except RuntimeError as exc:
        return any(s in str(exc) for s in _STICKY)


def _free(ctx: StageContext) -> None:
    if ctx.cuda:
        torch.cuda.empty_cache()


def _seed() -> int:
    """Fresh inputs every run (recorded with each entry, to reproduce one)."""
    return int.from_bytes(os.urandom(4), "little") >> 1


def run_stage(ctx: StageContext) -> bool:
    """Run one stage, recording its outcome; False when the device is unusable afterwards."""
    ctx.begin()
    ctx.log(f"start (deadline in {ctx.deadline - time.time():.0f} s)")
    try:
        STAGES[ctx.name](ctx)
        ctx.finish("ok")
    except Exception as exc:  # noqa: BLE001 - a failed stage is a result
        ctx.log(traceback.format_exc())
        ctx.finish("failed", error_text(exc))
    ctx.log("done")
    return not _device_broken()


# ----------------------------------------------------------------------------- timers


def bench_ms(ctx: StageContext, fn: Callable[[], Any], grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median ms of ``triton.testing.do_bench`` on the GPU; on the CPU (dry run: the plumbing, not
    the numbers) one timed call."""
    return gpu_ms(fn, grad_to_none) if ctx.cuda else wall_ms(fn)


def call_latency(fn: Callable[[torch.Tensor], Any], x: torch.Tensor, warmup: int = 0, reps: int = 0) -> tuple[float, str]:
    """Median ms of whole-model calls (``ps3.bench.run_method``'s timer hook): events around each
    call, as many calls as fit in about a second (3 to 20); the peak-memory call before it warmed up."""
    if not x.is_cuda:
        return wall_ms(lambda: fn(x)), "perf_counter (one call)"
    first = cuda_event_ms(lambda: fn(x))
    n = max(3, min(20, int(1000 / max(first, 1e-3))))
    return statistics.median([first] + [cuda_event_ms(lambda: fn(x)) for _ in range(n - 1)]), f"cuda_events x{n}"


# ----------------------------------------------------------------------------- stage: environment


def environment(ctx: StageContext) -> None:
    env = ps3_bench.environment("cuda" if ctx.cuda else "cpu")
    info = dict(device=env["device"], torch=env["torch"], triton=env["triton"], python=platform.python_version(),
                commit=env["git_commit"] or os.environ.get("PS3_COMMIT"), peers=available_impls())
    if ctx.cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = dict(name=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                           memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                           cudnn=torch.backends.cudnn.version())
    for key, value in info.items():
        ctx.set(key, value)
    n, numel = (8192, 2**28) if ctx.cuda else (256, 2**22)
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    a, b = (torch.randn(n, n, device=ctx.shapes.device, dtype=dtype) for _ in range(2))  # random data, not zeros
    ms = bench_ms(ctx, lambda: a @ b)
    src = torch.randn(numel, device=ctx.shapes.device)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(ctx, lambda: dst.copy_(src))
    ctx.set("ceilings", {f"{'bf16' if ctx.cuda else 'fp32'}_gemm_tflops": 2 * n**3 / (ms * 1e-3) / 1e12,
                         "copy_gb_per_s": 2 * src.numel() * src.element_size() / (copy_ms * 1e-3) / 1e9,
                         "gemm_shape": f"{n}x{n}x{n} {str(dtype)[6:]}", "copy_bytes": 2 * numel * 4,
                         "how": "median of triton.testing.do_bench; copy counts bytes read + written"})
    ctx.log(f"ceilings {ctx.data['ceilings']}")


# ----------------------------------------------------------------------------- stage: correctness


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    from helpers import rel_err

    return rel_err(out.detach(), ref.detach())


def _check_entry(ctx: StageContext, name: str, fn: Callable[[], dict[str, Any]], cost_s: float) -> None:
    """Run one check (``fn`` returns ``errors``, ``tol`` and extra fields); record it, whatever happens."""
    if not ctx.has_time(cost_s):
        ctx.add("correctness", dict(name=name, ok=None, worst_rel_err=None, status="skipped",
                                    error=f"no time left (needs ~{cost_s:.0f} s, {ctx.left():.0f} s left)"))
        return
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
            _free(ctx)
    entry["seconds"] = round(time.perf_counter() - start, 2)
    ctx.add("correctness", entry)
    ctx.log(f"{name}: ok={entry['ok']} worst={entry['worst_rel_err']} ({entry['seconds']} s)")


def check_attention(ctx: StageContext, tag: str, batch: int, look: bool) -> dict[str, Any]:
    """Forward and backward of the Triton op against float64, poisoned outputs.

    ``look=True``: ``batch`` high-res looks, each over its own image's low-res prefix; else the
    low-res pass (``batch`` sequences of ``prefix_len`` tokens, no prefix).
    """
    from helpers import poisoned_empty
    from test_varlen_attention import float64_reference

    sh, seed = ctx.shapes, _seed()
    lengths = [sh.look if look else sh.prefix_len] * batch
    case = bench_varlen_attention.make_case(lengths, list(range(batch)), DTYPES[tag], sh.device, seed=seed,
                                            heads=sh.heads, head_dim=sh.head_dim, prefix_len=sh.prefix_len)
    if not look:
        case.update(prefix_k=None, prefix_v=None, prefix_index=None)
    names = [n for n in ("q", "k", "v", "prefix_k", "prefix_v") if case[n] is not None]
    for n in names:
        case[n].requires_grad_()
    grad_out = torch.randn(case["q"].shape, generator=torch.Generator().manual_seed(seed + 1)).to(case["q"])
    with poisoned_empty():
        out = varlen_prefix_attention(**case, impl="triton")
        out.backward(grad_out)
    ref_out, ref_grads = float64_reference(case, grad_out)
    errors = {"out": _rel(out, ref_out), **{f"d{n}": _rel(case[n].grad, ref_grads[n]) for n in names}}
    tol = TOL[tag]
    return dict(errors=errors, tol=tol, bounds={k: tol if k == "out" else 2 * tol for k in errors}, dtype=tag,
                shape=f"{batch} x {lengths[0]} tokens{f' + prefix {sh.prefix_len}' if look else ''}, "
                      f"{sh.heads} heads x {sh.head_dim}", seed=seed)


def check_patch_embed(ctx: StageContext, tag: str, batch: int) -> dict[str, Any]:
    """Sparse gather + embed (Triton) against the reference with float64 parameters (the resize
    itself is fp32 in both), forward and the gradients of weight, bias and both tables."""
    from helpers import poisoned_empty

    sh, seed = ctx.shapes, _seed()
    case = bench_patch_embed.make_case(list(sh.scales), batch, sh.patch_tokens, DTYPES[tag], sh.device,
                                       patch=sh.patch, width=sh.width, seed=seed)
    params = ("weight", "bias")

    def leaves(c: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
        def leaf(t):
            return (t.detach().to(dtype) if dtype else t.detach()).requires_grad_()

        return {**c, **{p: leaf(c[p]) for p in params}, "pos_tables": [leaf(t) for t in c["pos_tables"]],
                "res_tables": [leaf(t) for t in c["res_tables"]]}

    ours, ref = leaves(case, None), leaves(case, torch.float64)
    with use_backend("triton"), poisoned_empty():
        out = bench_patch_embed.sparse_embed(ours)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out)
        out.backward(grad)
    with use_backend("torch"):
        ref_out = bench_patch_embed.sparse_embed(ref)
        ref_out.backward(grad.double())

    def cat_grads(c, key):
        return torch.cat([t.grad for t in c[key]])

    errors = {"out": _rel(out, ref_out), **{f"d{p}": _rel(ours[p].grad, ref[p].grad) for p in params},
              "dpos_table": _rel(cat_grads(ours, "pos_tables"), cat_grads(ref, "pos_tables")),
              "dres_table": _rel(cat_grads(ours, "res_tables"), cat_grads(ref, "res_tables"))}
    tol = PATCH_TOL[tag]
    return dict(errors=errors, tol=tol, bounds={k: tol if k == "out" else 2 * tol for k in errors}, dtype=tag,
                shape=f"B={batch} {sh.resolution} px, {len(case['tokens'])} tokens, width {sh.width}", seed=seed)


def check_selection(ctx: StageContext, tag: str, batch: int) -> dict[str, Any]:
    """Scoring against float64 (and within two units in the last place of the same-dtype
    reference, whose rounding the kernel reproduces); look assignment equal to upstream's loop."""
    from helpers import poisoned_empty

    sh, seed = ctx.shapes, _seed()
    dtype = DTYPES[tag]
    case = bench_selection.make_case(list(sh.scales), batch, sh.looks, sh.patch_tokens, dtype, sh.device,
                                     channels=sh.width, hr_channels=sh.sel_hr_channels, hr_grid=sh.sel_hr_grid,
                                     low_grid=sh.low_grid, seed=seed)
    with use_backend("triton"), poisoned_empty():
        probs = bench_selection.score(case)
        scaled = bench_selection.per_scale(probs, case["grids"])
        looks = bench_selection.assign(scaled, case)
    with use_backend("torch"):
        same = bench_selection.score(case)
        ref64 = bench_selection.score({**case, **{k: case[k].double() for k in ("feature", "prompt", "hr_feature", "hr_prompt")}})
    want = bench_selection.upstream_assign(scaled, case, stable=True)
    max_abs = (probs.float() - same.float()).abs().max().item()
    equal = all(torch.equal(g, w) for g, w in zip(looks, want))
    return dict(errors={"probs": _rel(probs, ref64)}, tol=SELECTION_TOL[tag],
                extra_ok=max_abs <= 2 * torch.finfo(dtype).eps and equal,
                max_abs_vs_same_dtype=max_abs, assign_equal_upstream_loop=equal, dtype=tag,
                shape=f"B={batch}, {sh.width} x {sh.low_grid}^2 + hr {sh.sel_hr_channels} x {sh.sel_hr_grid}^2, "
                      f"{sh.looks} looks of {sh.patch_tokens}", seed=seed)


def check_parity(ctx: StageContext, case: str, backend: str) -> dict[str, Any]:
    from test_model_parity import PARITY_TOL, case_errors

    errors = case_errors(case, backend, device=ctx.shapes.device)
    return dict(errors=errors, tol=PARITY_TOL, dtype="fp32", shape=f"upstream fixture {case}, {backend} backend")


def check_no_host_sync(ctx: StageContext, index: int) -> dict[str, Any]:
    """The vision forward of a two-image list in CUDA sync-debug mode "error" (CPU: every host read
    of a tensor value raises), after a warm-up call."""
    from helpers import tiny_vision_config, to_device
    from ps3 import PS3VisionModel
    from ps3.demo import randomize_parameters_
    from test_no_host_sync import FORWARD_KWARGS, forbid_host_reads

    kwargs = {k: to_device(v, ctx.shapes.device) for k, v in FORWARD_KWARGS[index].items()}
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config()), seed=2).to(ctx.shapes.device).eval()
    gen = torch.Generator().manual_seed(_seed())
    images = [torch.randn(3, 224, 180, generator=gen).to(ctx.shapes.device),
              torch.randn(3, 150, 224, generator=gen).to(ctx.shapes.device)]
    prompt = torch.randn(2, 64, generator=gen).to(ctx.shapes.device)
    with torch.no_grad():
        model(images, prompt=prompt, **kwargs)
        if ctx.cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                model(images, prompt=prompt, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            with use_backend("torch"), forbid_host_reads():
                model(images, prompt=prompt, **kwargs)
    return dict(errors={}, tol=None, shape=f"tiny model, 2 images, {FORWARD_KWARGS[index]}")


def correctness(ctx: StageContext) -> None:
    """Checks in priority order: what only a GPU can show first (compiled kernels at PS3 shapes,
    bf16 before the rest), then sync-freedom and upstream parity on CUDA."""
    from test_model_parity import CASES, TRITON_CASES
    from test_no_host_sync import FORWARD_KWARGS

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must be fp32 (cuDNN convolutions default to TF32)
    torch.backends.cudnn.allow_tf32 = False
    sh = ctx.shapes
    slow = 0.0 if ctx.dry_run else 1.0  # rough seconds per check on the GPU, compilation included

    def ops(tag: str, batch: int) -> list[tuple[str, Callable[[], dict[str, Any]], float]]:
        return [
            (f"attention look fwd+bwd {tag} B={batch}", lambda: check_attention(ctx, tag, batch, True), 6 * slow),
            (f"attention low-res fwd+bwd {tag} B={batch}", lambda: check_attention(ctx, tag, batch, False), 4 * slow),
            (f"patch embed fwd+bwd {tag} B={batch}", lambda: check_patch_embed(ctx, tag, batch), 4 * slow),
            (f"selection {tag} B={batch}", lambda: check_selection(ctx, tag, batch), 3 * slow),
        ]

    def parity(cases: list[str], backend: str) -> list[tuple[str, Callable[[], dict[str, Any]], float]]:
        return [(f"upstream parity {c} ({backend})", lambda c=c: check_parity(ctx, c, backend), 2 * slow) for c in cases]

    first, *more = sh.check_batches
    all_cases = list(dict.fromkeys(TRITON_CASES + CASES))[: sh.parity_cases]
    plan = [*ops("bf16", first), *[c for b in more for c in ops("bf16", b)], *ops("fp16", first), *ops("fp32", first)]
    plan += [(f"no host sync {kwargs}", lambda i=i: check_no_host_sync(ctx, i), 2 * slow)
             for i, kwargs in enumerate(FORWARD_KWARGS)]
    plan += parity([c for c in all_cases if c in TRITON_CASES], "triton")
    plan += [c for b in more for tag in ("fp16", "fp32") for c in ops(tag, b)]
    plan += parity([c for c in all_cases if c not in TRITON_CASES], "triton")
    if ctx.cuda:  # the PyTorch backend on the CPU is CI's own parity test
        plan += parity(all_cases, "torch")
    for name, fn, cost in plan:
        _check_entry(ctx, name, fn, cost)


# ----------------------------------------------------------------------------- stage: op timings


def _timing(ctx: StageContext, name: str, shape: str, ours: float | None, peer: str, peer_ms: float | None,
            **extra: Any) -> None:
    ratio = peer_ms / ours if ours and peer_ms else None
    ctx.add("timings", dict(name=name, shape=shape, ours_ms=ours, peer=peer, peer_ms=peer_ms, ratio=ratio, **extra))
    ctx.log(f"{name} [{shape}] ours {ours} vs {peer} {peer_ms} (x{ratio})")


def _attempt(ctx: StageContext, fn: Callable[[], float]) -> tuple[float | None, str | None]:
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run a case is a result
        if is_oom(exc):
            _free(ctx)
        return None, error_text(exc)


def _attention_case(ctx: StageContext, batch: int) -> tuple[dict[str, Any], torch.Tensor, list[torch.Tensor], str]:
    sh = ctx.shapes
    case = bench_varlen_attention.make_case([sh.look] * batch, list(range(batch)), torch.bfloat16, sh.device,
                                            seed=_seed(), heads=sh.heads, head_dim=sh.head_dim, prefix_len=sh.prefix_len)
    leaves = [case[n].requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    grad_out = torch.randn_like(case["q"])
    return case, grad_out, leaves, f"B={batch} looks of {sh.look} + prefix {sh.prefix_len}, {sh.heads}x{sh.head_dim} bf16"


def _time_attention(ctx: StageContext, impl: str, case: dict[str, Any], grad_out: torch.Tensor,
                    leaves: list[torch.Tensor], mode: str) -> float:
    """Median ms of the op (inputs prebuilt) forward, or forward+backward to q/k/v/prefix."""
    if mode == "fwd":  # inputs that do not require grad (FlexAttention on the CPU refuses any that do)
        case = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in case.items()}
    with torch.set_grad_enabled(mode == "fwd_bwd"):
        fn = prepare_impl(impl, **case)
        if mode == "fwd":
            return bench_ms(ctx, fn)
        return bench_ms(ctx, lambda: fn().backward(grad_out, retain_graph=True), leaves)


def _variant_error(case: dict[str, Any], grad_out: torch.Tensor, backward: bool) -> float:
    """Worst relative error of the Triton op (forward, or gradients) against the float32 reference."""
    exact = {n: (t.detach().float().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
             for n, t in case.items()}
    mine = {n: (t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
            for n, t in case.items()}
    ref = varlen_prefix_attention(**exact, impl="torch")
    out = varlen_prefix_attention(**mine, impl="triton")
    if not backward:
        return _rel(out, ref)
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    ref.backward(grad_out.float())
    out.backward(grad_out)
    return max(_rel(mine[n].grad, exact[n].grad) for n in names)


def _run_variants(ctx: StageContext, op: str, shape: str, time_one: Callable[[], float],
                  error_of: Callable[[], float], tol: float) -> None:
    """Time every variant of ``op`` (after checking it computes the same function); record the winner."""
    candidates = []
    for variant in VARIANTS[op]:
        entry: dict[str, Any] = dict(name=variant.name, config=describe(variant, ctx.dry_run))
        if not ctx.has_time(5 if ctx.cuda else 1):
            entry.update(status="skipped", error="no time left")
        else:
            try:
                with use_variant(variant, interpreted=triton_interpreted()):
                    entry["rel_err"] = error_of()
                    entry["ms"] = time_one() if entry["rel_err"] <= tol else None
                entry["status"] = "ok" if entry["rel_err"] <= tol else "wrong"
            except Exception as exc:  # noqa: BLE001 - a variant that fails is a result
                entry.update(status="failed", error=error_text(exc))
                if is_oom(exc):
                    _free(ctx)
        candidates.append(entry)
    timed = [c for c in candidates if c.get("ms")]
    winner = min(timed, key=lambda c: c["ms"])["name"] if timed else None
    default_ms = next((c.get("ms") for c in candidates if c["name"] == "default"), None)
    record = dict(op=op, shape=shape, candidates=candidates, winner=winner, speedup_vs_default=None, noise=None)
    if timed and default_ms:
        # The default timed again: a win smaller than twice this spread is not a decision.
        repeat, _ = _attempt(ctx, time_one)
        record.update(speedup_vs_default=default_ms / min(c["ms"] for c in timed), default_repeat_ms=repeat,
                      noise=abs(repeat - default_ms) / default_ms if repeat else None)
        record["decisive"] = record["noise"] is not None and record["speedup_vs_default"] - 1 > 2 * record["noise"]
    ctx.add("variants", record)
    ctx.log(f"variants {op} [{shape}]: winner {winner}: {candidates}")


def attention_timings(ctx: StageContext, batch: int) -> None:
    """The op against SDPA (fwd, fwd+bwd), then its launch variants at this shape."""
    case, grad_out, leaves, shape = _attention_case(ctx, batch)
    flops = bench_varlen_attention.forward_flops(case)
    for mode in ("fwd", "fwd_bwd"):
        if not ctx.has_time(3):
            return
        ours, err = _attempt(ctx, lambda: _time_attention(ctx, "triton", case, grad_out, leaves, mode))
        peer, peer_err = _attempt(ctx, lambda: _time_attention(ctx, "sdpa", case, grad_out, leaves, mode))
        scale = 3.5 if mode == "fwd_bwd" else 1.0
        _timing(ctx, f"attention {mode}", shape, ours, "sdpa (padded, concatenated prefix)", peer,
                ours_tflops_per_s=flops * scale / (ours * 1e-3) / 1e12 if ours else None,
                error=err or peer_err)
    for op, mode in (("attention_fwd", "fwd"), ("attention_bwd", "fwd_bwd")):
        _run_variants(ctx, op, shape, lambda: _time_attention(ctx, "triton", case, grad_out, leaves, mode),
                      lambda: _variant_error(case, grad_out, mode == "fwd_bwd"), 2e-2)
    _free(ctx)


def peer_attention_timings(ctx: StageContext, batch: int, impl: str) -> None:
    """FlexAttention (compiled for this case: the recompile limit is raised, so it never falls
    back to eager) or xformers, prebuilt inputs, against the Triton op."""
    if not ctx.has_time(40 if impl == "flex" and ctx.cuda else 3):
        _timing(ctx, "attention fwd", f"B={batch}", None, impl, None, error="no time left")
        return
    case, grad_out, leaves, shape = _attention_case(ctx, batch)
    for mode in ("fwd", "fwd_bwd"):
        ours, err = _attempt(ctx, lambda: _time_attention(ctx, "triton", case, grad_out, leaves, mode))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peer, peer_err = _attempt(ctx, lambda: _time_attention(ctx, impl, case, grad_out, leaves, mode))
        eager = [str(w.message)[:200] for w in caught if "compile" in str(w.message).lower()]
        _timing(ctx, f"attention {mode}", shape, ours, impl + (" (eager!)" if eager else ""), peer,
                error=err or peer_err or (eager[0] if eager else None))
    _free(ctx)


def patch_embed_timings(ctx: StageContext, batch: int) -> None:
    """Sparse gather + embed (Triton, each variant) against upstream's resize-everything-and-unfold."""
    sh = ctx.shapes
    case = bench_patch_embed.make_case(list(sh.scales), batch, sh.patch_tokens, torch.bfloat16, sh.device,
                                       patch=sh.patch, width=sh.width, seed=_seed())
    shape = f"B={batch} {sh.resolution} px, {sh.patch_tokens} tokens/image, width {sh.width} bf16"
    with use_backend("triton"):
        ours, err = _attempt(ctx, lambda: bench_ms(ctx, lambda: bench_patch_embed.sparse_embed(case)))
    peer, peer_err = _attempt(ctx, lambda: bench_ms(ctx, lambda: bench_patch_embed.upstream_embed(case)))
    _timing(ctx, "patch gather+embed", shape, ours, "torch (resize whole image, unfold, select)", peer,
            error=err or peer_err)
    ref = bench_patch_embed.upstream_embed(case)

    def error_of() -> float:
        with use_backend("triton"):
            return _rel(bench_patch_embed.sparse_embed(case), ref)

    def time_one() -> float:
        with use_backend("triton"):
            return bench_ms(ctx, lambda: bench_patch_embed.sparse_embed(case))

    _run_variants(ctx, "patch_embed", shape, time_one, error_of, 1e-2)
    _free(ctx)


def selection_timings(ctx: StageContext, batch: int) -> None:
    """Scoring + look assignment (Triton) against the reference scoring + upstream's per-look loop."""
    sh = ctx.shapes
    case = bench_selection.make_case(list(sh.scales), batch, sh.looks, sh.patch_tokens, torch.float32, sh.device,
                                     channels=sh.width, hr_channels=sh.sel_hr_channels, hr_grid=sh.sel_hr_grid,
                                     low_grid=sh.low_grid, seed=_seed())
    shape = f"B={batch}, {sh.looks} looks of {sh.patch_tokens}, fp32"

    def ours_fn():
        with use_backend("triton"):
            return bench_selection.assign(bench_selection.per_scale(bench_selection.score(case), case["grids"]), case)

    def peer_fn():
        with use_backend("torch"):
            return bench_selection.upstream_assign(bench_selection.per_scale(bench_selection.score(case), case["grids"]), case)

    ours, err = _attempt(ctx, lambda: bench_ms(ctx, ours_fn))
    peer, peer_err = _attempt(ctx, lambda: bench_ms(ctx, peer_fn))
    _timing(ctx, "selection score+assign", shape, ours, "torch scoring + upstream per-look top-k loop", peer,
            error=err or peer_err)


def op_timings(ctx: StageContext) -> None:
    import torch._dynamo

    # FlexAttention recompiles per shape; past the limit Dynamo would silently run it eagerly.
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    batches = sorted(ctx.shapes.time_batches)
    for batch in reversed(batches):  # the full batch first: that is where the variants matter most
        attention_timings(ctx, batch)
    for batch in batches:
        if ctx.has_time(3):
            patch_embed_timings(ctx, batch)
    for batch in batches:
        if ctx.has_time(3):
            selection_timings(ctx, batch)
    peers = [p for p in ("flex", "xformers") if p in available_impls()]
    for impl in peers:
        for batch in batches:
            peer_attention_timings(ctx, batch, impl)
    ctx.set("peers_timed", ["sdpa", *peers])


# ----------------------------------------------------------------------------- stage: end to end


def _e2e_entry(rec: dict[str, Any], method: str, looks: int | None, peak_tflops: float) -> dict[str, Any]:
    """The summary's row for one ``ps3.bench`` record, with the floor at the measured GEMM rate."""
    floor_ms = rec["flops"] / (peak_tflops * 1e12) * 1e3 if rec.get("flops") else None
    ms = rec.get("latency_ms")
    notes_floor = NOTES_FLOORS_MS.get((rec["batch"], looks)) if method == "ps3 (this project)" else None
    return dict(method=method, batch=rec["batch"], looks=looks, ms=ms, tflops_per_s=rec.get("tflops_per_s"),
                peak_mem_mb=rec.get("peak_mem_mb"), status=rec.get("status"), error=rec.get("error"),
                tokens=rec.get("tokens"), flops=rec.get("flops"), floor_ms=floor_ms,
                ratio_to_floor=ms / floor_ms if ms and floor_ms else None, notes_floor_ms=notes_floor,
                ratio_to_notes_floor=ms / notes_floor if ms and notes_floor else None, timer=rec.get("timer"))


def _upstream_site(ctx: StageContext, wait_s: float) -> tuple[str | None, str]:
    """The folder the parent unpacked ``.whl/upstream`` into, once its pip is done (or why not)."""
    marker = ctx.work / "upstream_site.json"
    end = time.time() + wait_s
    while not marker.exists() and time.time() < end:
        time.sleep(0.5)
    if not marker.exists():
        return None, f"the upstream wheels were still installing after {wait_s:.0f} s"
    info = json.loads(marker.read_text())
    return (info["path"], "") if info.get("ok") else (None, info.get("reason", "upstream wheels not installed"))


def end_to_end(ctx: StageContext) -> None:
    sh = ctx.shapes
    preset = ps3_bench.PRESETS[sh.e2e_preset]
    R = sh.resolution if ctx.cuda else 756  # dry run: the demo trunk's real PS3-1.5K geometry at 756
    config = ps3_bench.model_config(preset, R)
    meta_model = ps3_bench.build_model(config, "meta", preset.dtype)
    model = ps3_bench.build_model(config, preset.device if ctx.cuda else "cpu", preset.dtype)
    env = ps3_bench.environment(preset.device if ctx.cuda else "cpu")
    peak = ctx.previous("environment").get("ceilings", {}).get("bf16_gemm_tflops") or BF16_PEAK_TFLOPS
    ctx.set("floor_peak_tflops", peak)
    opts = ps3_bench.Options(preset=sh.e2e_preset, methods=[], resolutions=[R], batches=list(sh.e2e_batches),
                             count_only=False, warmup=1, reps=1, upstream_python=None, upstream_timeout=60.0, seed=_seed())
    inputs: dict[int, torch.Tensor] = {}

    def x_for(batch: int) -> torch.Tensor:
        if batch not in inputs:
            inputs.clear()
            _free(ctx)
            gen = torch.Generator(device=model.device).manual_seed(opts.seed)
            inputs[batch] = torch.randn(batch, 3, R, R, generator=gen, device=model.device).to(preset.dtype)
        return inputs[batch]

    def ours(method: str, label: str, batch: int, looks: int | None, cost: float) -> None:
        rec = ps3_bench.empty_record(opts, env, method, R, batch, preset.dtype)
        if not ctx.has_time(cost):
            rec.update(status="skipped", error=f"no time left (needs ~{cost:.0f} s)")
        else:
            ps3_bench.run_method(rec, method, model, meta_model, x_for(batch), 0, 0, latency=call_latency)
        ctx.add("end_to_end", _e2e_entry(rec, label, looks, peak))

    batches = sorted(sh.e2e_batches)
    gpu = 1.0 if ctx.cuda else 0.0
    for batch in batches:
        for looks in sh.e2e_looks:
            ours(f"ps3-{looks}", "ps3 (this project)", batch, looks, 8 * gpu)
    for method in ("s2", "anyres"):
        ours(method, method, batches[0], None, 5 * gpu)
    upstream(ctx, opts, preset, config, R, peak, reserve=30 * gpu * (len(batches) > 1))
    for batch in batches[1:]:
        for method in ("s2", "anyres"):
            ours(method, method, batch, None, 15 * gpu)


def upstream(ctx: StageContext, opts: ps3_bench.Options, preset: ps3_bench.Preset, config: Any, R: int,
             peak: float, reserve: float) -> None:
    """Upstream PS3 in its worker process (one call for every batch and look count; it reports
    each entry as it finishes, so a timeout keeps the finished ones)."""
    sh = ctx.shapes
    methods = [f"upstream-ps3-{n}" for n in sh.e2e_looks]
    env = ps3_bench.environment(preset.device if ctx.cuda else "cpu")
    records = [ps3_bench.empty_record(opts, env, m, R, b, preset.dtype) for b in sh.e2e_batches for m in methods]
    site, reason = _upstream_site(ctx, wait_s=min(30.0, max(ctx.left() - reserve, 0)))
    budget = ctx.left() - reserve
    if site is None or budget < 15:
        for rec in records:
            rec.update(status="skipped", error=reason or f"no time left ({budget:.0f} s)")
    else:
        if ctx.cuda:
            torch.cuda.empty_cache()  # the upstream process needs the memory this one caches
        # PS3_UPSTREAM_PYTHON: another interpreter for the upstream side (default: this one, with the
        # unpacked wheels first on its path).
        run_opts = replace(opts, methods=methods, upstream_python=os.environ.get("PS3_UPSTREAM_PYTHON", sys.executable),
                           upstream_timeout=budget, upstream_pythonpath=site)
        ps3_bench.run_upstream(run_opts, replace(preset, device=preset.device if ctx.cuda else "cpu"), config, R,
                               methods, records)
    for rec in records:
        ctx.add("end_to_end", _e2e_entry(rec, "upstream ps3", ps3_bench.UPSTREAM_LOOKS[rec["method"]], peak))


# ----------------------------------------------------------------------------- stage: launch overhead


def launch_overhead(ctx: StageContext) -> None:
    """The whole vision forward at batch 1, eager against one CUDA-graph replay (fixed shapes).

    A capture that fails (a host sync, a pageable copy, an allocation the graph cannot own) is
    recorded with its reason; a replay must reproduce the eager output.
    """
    sh = ctx.shapes
    preset = ps3_bench.PRESETS[sh.e2e_preset]
    R = sh.resolution if ctx.cuda else 756
    model = ps3_bench.build_model(ps3_bench.model_config(preset, R), preset.device if ctx.cuda else "cpu", preset.dtype)
    x = torch.randn(1, 3, R, R, generator=torch.Generator().manual_seed(_seed())).to(model.device, preset.dtype)
    entry: dict[str, Any] = dict(name=f"ps3 1 look, B=1, {R} px", eager_ms=None, graph_ms=None, ratio=None)

    def forward():
        return model(x, num_look_close=1).last_hidden_state

    with torch.inference_mode():
        entry["eager_ms"] = bench_ms(ctx, forward)
        if not ctx.cuda:
            entry.update(status="skipped", error="CUDA graphs need a GPU (dry run)")
            ctx.add("launch_overhead", entry)
            return
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    eager = forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = forward()
            graph.replay()
            torch.cuda.synchronize()
            diff = _rel(static_out, eager)
            entry["graph_ms"] = bench_ms(ctx, graph.replay)
            entry.update(ratio=entry["eager_ms"] / entry["graph_ms"], replay_rel_err_vs_eager=diff,
                         status="ok" if diff <= 1e-2 else "wrong", error=None if diff <= 1e-2 else
                         f"replayed output off the eager one (rel err {diff:.2e})")
        except Exception as exc:  # noqa: BLE001 - a failed capture is the finding
            entry.update(status="capture_failed", error=error_text(exc))
            ctx.log(traceback.format_exc())
    ctx.add("launch_overhead", entry)


STAGES: dict[str, Callable[[StageContext], None]] = {
    "environment": environment,
    "correctness": correctness,
    "op_timings": op_timings,
    "end_to_end": end_to_end,
    "launch_overhead": launch_overhead,
}
