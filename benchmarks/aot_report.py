"""Compile every Triton kernel for sm_90 without a GPU: registers, spills, shared memory, MMA kind.

The library's own host code runs on CPU tensors of PS3 shapes (SO400M: 16 heads x 72, a
729-token low-res pass, one 2560-token look over the 729-token prefix, a 3780 px image, the
27x27 selection grid) with ``JITFunction.run`` replaced by a recorder: every launch the ops
would make (kernel, arguments, constexprs, ``num_warps``/``num_stages`` from ``_launch_config``)
is captured, specialised exactly as Triton's launcher would (same binder, 16-byte alignment of
CPU tensors as of CUDA ones), and compiled with ``GPUTarget("cuda", 90, 32)`` (sm_90a), which
needs no driver. ptxas' own report of that build gives registers and spill bytes; Triton's
metadata the shared memory; the PTX whether the dots became ``wgmma`` (Hopper warpgroup MMA),
``mma.sync`` (Ampere-style) or plain FMA. Every launch variant of ``launch_variants.py`` is
compiled too.

    python benchmarks/aot_report.py --out benchmarks/results/aot-sm90.json      # everything (~2 min)
    python benchmarks/aot_report.py --subset ci --out /tmp/aot.json --fail-on-spill

Runs with ``TRITON_INTERPRET`` unset (it is removed before triton is imported); needs triton's
bundled ptxas (any triton wheel has it), not a GPU. ``--fail-on-spill`` exits 1 when a kernel
fails to compile or a bf16/fp16 kernel spills (fp32 is a correctness path, not a tuned one).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

# The compiler path must not be the interpreter's, whatever the caller's environment says.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # make ptxas run (and report) even when a build is cached
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
if "TRITON_CACHE_DIR" not in os.environ:  # a private cache, removed at exit
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="aot-triton-cache-")
    atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "benchmarks")]

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from launch_variants import VARIANTS, Variant, describe, use_variant  # noqa: E402
from ps3.bench import scale_set  # noqa: E402
from ps3.bench.harness import environment  # noqa: E402
from ps3.selection_plan import default_quotas  # noqa: E402
from ps3_kernels import assign_looks, selection_probs, sparse_patch_embed, use_backend, varlen_prefix_attention  # noqa: E402
from ps3_kernels.patch_embed import PatchTokens  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEADS, HEAD_DIM, LOW_RES, LOOK, WIDTH, PATCH, RESOLUTION = 16, 72, 729, 2560, 1152, 14, 3780


# ----------------------------------------------------------------------------- capturing launches


@dataclass
class Launch:
    fn: JITFunction
    args: tuple
    kwargs: dict
    grid: Any


@contextlib.contextmanager
def captured_launches() -> Iterator[list[Launch]]:
    """Record kernel launches instead of running them; CPU tensors pass the ops' CUDA checks.

    Outputs stay uninitialised, which is harmless: only shapes flow from one launch to the next.
    """
    launches: list[Launch] = []
    real_run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, kwargs, grid))

    JITFunction.run = record
    torch.Tensor.is_cuda = property(lambda self: True)  # shadows TensorBase.is_cuda for Python callers
    try:
        yield launches
    finally:
        JITFunction.run = real_run
        del torch.Tensor.is_cuda


def specialise(launch: Launch) -> tuple[str, dict, dict, dict, Any]:
    """What Triton's launcher would compile for this call: (name, signature, constexprs, attrs, options)."""
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    return fn.__name__, signature, constexprs, attrs, options


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


def _config(constexprs: dict, options: Any, fn: JITFunction) -> dict[str, Any]:
    """Launch parameters: tile constexprs (BLOCK_*, head-dim tiles, flags) and warps/stages."""
    names = [p.name for p in fn.params]
    out = {}
    for key, value in constexprs.items():
        name = names[key[0]] if isinstance(key, tuple) else str(key)
        if isinstance(value, (bool, int)) and name.isupper():
            out[name] = value
    out.update(num_warps=options.num_warps, num_stages=options.num_stages)
    return out


def compile_launch(launch: Launch) -> dict[str, Any]:
    """One report row (compile errors are rows with ``ok: False``)."""
    name, signature, constexprs, attrs, options = specialise(launch)
    row: dict[str, Any] = dict(kernel=name, config=_config(constexprs, options, launch.fn),
                               grid=list(launch.grid) if isinstance(launch.grid, tuple) else None)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(launch.fn, signature, constexprs, attrs), target=TARGET,
                                    options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - a compile failure is a result
        row.update(ok=False, error=f"{type(exc).__name__}: {str(exc).strip()[:2000]}")
        return row
    numbers = _ptxas_numbers(log.getvalue()) or _ptxas_numbers(_rerun_ptxas(kernel.asm["ptx"]))
    ptx = kernel.asm["ptx"]
    row.update(
        ok=True, registers=numbers["registers"], spills=numbers["spill_stores"] + numbers["spill_loads"],
        spill_stores=numbers["spill_stores"], spill_loads=numbers["spill_loads"], stack_frame=numbers["stack_frame"],
        shared_mem=kernel.metadata.shared, mma=_mma_kind(ptx), dot="tt.dot" in kernel.asm["ttir"],
        wgmma_count=ptx.count("wgmma.mma_async"), compile_s=round(time.perf_counter() - start, 2),
    )
    return row


# ----------------------------------------------------------------------------- workloads (PS3 shapes)


def _randn(*shape, dtype):
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def attention_workload(dtype: torch.dtype, prefix: bool, backward: bool = True) -> Callable[[], None]:
    """One layer's attention as the trunk calls it: q/k/v split from a fused qkv projection.

    ``prefix``: a 2560-token look over the image's 729-token low-res cache; else the low-res pass.
    """
    def run():
        length = LOOK if prefix else LOW_RES
        qkv = _randn(length, 3, HEADS, HEAD_DIM, dtype=dtype).requires_grad_(backward)
        q, k, v = qkv.unbind(1)
        kwargs = dict(cu_seqlens=torch.tensor([0, length], dtype=torch.int32), max_seqlen=length)
        if prefix:
            cache = _randn(1, 2, HEADS, LOW_RES, HEAD_DIM, dtype=dtype).requires_grad_(backward)
            kwargs.update(prefix_k=cache[:, 0], prefix_v=cache[:, 1], prefix_index=torch.zeros(1, dtype=torch.int32))
        out = varlen_prefix_attention(q, k, v, impl="triton", **kwargs)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def patch_embed_workload(dtype: torch.dtype, backward: bool = True) -> Callable[[], None]:
    """The high-res tokens of one 3780 px image (PS3-4K quotas over 756/1512/3780), fwd and weight grad."""
    def run():
        scales = scale_set(RESOLUTION)
        image = torch.zeros(3, RESOLUTION, RESOLUTION, dtype=dtype)
        parts = []
        for s, (size, quota) in enumerate(zip(scales[1:], default_quotas(LOOK, scales))):
            grid = size // PATCH
            cells = torch.randperm(grid * grid)[:quota].sort().values
            parts.append(torch.stack([torch.zeros_like(cells), torch.full_like(cells, s), cells // grid, cells % grid]))
        t = torch.cat(parts, 1)
        tokens = PatchTokens(image=t[0], scale=t[1], row=t[2], col=t[3])
        weight = _randn(WIDTH, 3, PATCH, PATCH, dtype=dtype).requires_grad_(backward)
        bias = _randn(WIDTH, dtype=dtype)
        rows = sum((s // PATCH) ** 2 for s in scales[1:])
        table = _randn(rows, WIDTH, dtype=dtype)
        index = torch.randint(0, rows, (len(tokens),))
        with use_backend("triton"):
            out = sparse_patch_embed([image], [[(s, s) for s in scales[1:]]], tokens, weight, bias, table, index,
                                     table, index)
        if backward:
            out.backward(torch.ones_like(out))
    return run


def selection_workload(dtype: torch.dtype, highres: bool, low_grid: int = 27) -> Callable[[], None]:
    """Scoring on a ``low_grid x low_grid`` map (1152 channels, channels-last like the model; optional 512 x 54 x 54
    high-res map), forward and backward, then the look assignment of the largest scale's grid (PS3-4K,
    6 looks). Grids and bins are run-time sizes of the scoring kernels: a small model's 4x4 grid
    (14x14 bins) builds the same kernels as SO400M's 27x27."""
    def run():
        feature = _randn(1, low_grid, low_grid, WIDTH, dtype=dtype).permute(0, 3, 1, 2).requires_grad_()
        hr = [_randn(1, 512, 54, 54, dtype=dtype), _randn(1, 512, dtype=dtype)] if highres else [None, None]
        hr = [t.requires_grad_() if t is not None else None for t in hr]
        with use_backend("triton"):
            probs = selection_probs(feature, _randn(1, WIDTH, dtype=dtype).requires_grad_(), *hr)
            probs.backward(torch.ones_like(probs))
            if highres:
                grid = RESOLUTION // PATCH
                assign_looks(_randn(1, grid * grid, dtype=dtype), torch.full((1, 6), 2134))
        del probs
    return run


@dataclass
class Workload:
    name: str
    dtype: str
    run: Callable[[], None]
    variant: Variant | None = None


def workloads(subset: str) -> list[Workload]:
    """``ci``: bf16 attention (look, fwd+bwd), the bf16 patch embed and bf16 scoring on a 4x4 grid
    (fwd+bwd); ``full``: every kernel, dtype and variant."""
    if subset == "ci":
        return [Workload("attention_look", "bf16", attention_workload(torch.bfloat16, prefix=True)),
                Workload("patch_embed_4k", "bf16", patch_embed_workload(torch.bfloat16)),
                Workload("selection_4x4", "bf16", selection_workload(torch.bfloat16, highres=True, low_grid=4))]
    out = []
    for tag, dtype in DTYPES.items():
        out += [
            Workload("attention_look", tag, attention_workload(dtype, prefix=True)),
            Workload("attention_lowres", tag, attention_workload(dtype, prefix=False)),
            Workload("patch_embed_4k", tag, patch_embed_workload(dtype)),
            Workload("selection", tag, selection_workload(dtype, highres=True)),
            Workload("selection_no_hr", tag, selection_workload(dtype, highres=False)),
        ]
    for op, variants in VARIANTS.items():
        for variant in variants[1:]:
            for tag in ("bf16", "fp16"):
                dtype = DTYPES[tag]
                run = patch_embed_workload(dtype, backward=False) if op == "patch_embed" else \
                    attention_workload(dtype, prefix=True, backward=op == "attention_bwd")
                out.append(Workload("patch_embed_4k" if op == "patch_embed" else "attention_look", tag, run, variant))
    return out


def report(subset: str, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for work in workloads(subset):
        with captured_launches() as launches, use_variant(work.variant) if work.variant else contextlib.nullcontext():
            work.run()
        if not launches:
            raise RuntimeError(f"{work.name} {work.dtype}: no Triton launch was captured (did the op's entry point change?)")
        for launch in launches:
            if work.variant is not None and work.variant.op == "attention_fwd" and launch.fn.__name__ != "_fwd_kernel":
                continue  # a forward variant changes only the forward kernel
            name, signature, constexprs, attrs, options = specialise(launch)
            key = repr((name, signature, constexprs, attrs, options.num_warps, options.num_stages))
            if key in seen:
                continue
            seen.add(key)
            row = dict(workload=work.name, dtype=work.dtype, variant=work.variant.name if work.variant else "default",
                       **compile_launch(launch))
            if work.variant is not None:
                row["variant_config"] = describe(work.variant)
            rows.append(row)
            log(format_row(row))
    return rows


def format_row(r: dict[str, Any]) -> str:
    config = " ".join(f"{k}={v}" for k, v in r["config"].items() if k.startswith("BLOCK") or k.startswith("num_"))
    if not r["ok"]:
        return f"{r['kernel']:18s} {r['dtype']:5s} {r['workload']:17s} {r['variant']:9s} FAILED {r['error'][:200]}"
    return (f"{r['kernel']:18s} {r['dtype']:5s} {r['workload']:17s} {r['variant']:9s} regs {r['registers']:3d} "
            f"spills {r['spills']:5d} smem {r['shared_mem']:6d} {r['mma']:8s} {config}")


def problems(rows: list[dict[str, Any]]) -> list[str]:
    """Compile failures, and spills in 16-bit kernels."""
    out = [f"{r['kernel']} {r['dtype']} {r['workload']} {r['variant']}: {r['error'][:300]}" for r in rows if not r["ok"]]
    out += [f"{r['kernel']} {r['dtype']} {r['workload']} {r['variant']}: spills {r['spills']} bytes"
            for r in rows if r["ok"] and r["dtype"] in ("bf16", "fp16") and r["spills"]]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=["full", "ci"], default="full")
    parser.add_argument("--out", type=Path, help="JSON report (default: print only)")
    parser.add_argument("--fail-on-spill", action="store_true",
                        help="exit 1 on a compile error or a spill in a bf16/fp16 kernel")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = report(args.subset)
    env = environment("cpu")
    meta = dict(target="cuda sm_90a (GPUTarget('cuda', 90, 32))", triton=triton.__version__, torch=torch.__version__,
                git_commit=env["git_commit"], subset=args.subset, seconds=round(time.perf_counter() - start, 1),
                shapes=dict(heads=HEADS, head_dim=HEAD_DIM, low_res_tokens=LOW_RES, look_tokens=LOOK, width=WIDTH,
                            patch=PATCH, resolution=RESOLUTION),
                fields="spills = spill stores + spill loads (bytes per thread); shared_mem in bytes; mma: wgmma | "
                       "mma.sync | fma (no tensor-core instruction; dot=false: the kernel has no matrix product)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1) + "\n")
        print(f"wrote {args.out} ({len(rows)} kernels, {meta['seconds']} s)")
    bad = problems(rows)
    for line in bad:
        print("PROBLEM:", line, file=sys.stderr)
    return 1 if args.fail_on_spill and bad else 0


if __name__ == "__main__":
    sys.exit(main())
