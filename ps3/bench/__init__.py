"""``ps3-bench``: what PS3's selective high-res encoding costs against dense baselines.

Every method runs on the same ViT trunk (same weights, same attention kernel): PS3 with
1, 2, 6 or all looks, LLaVA-NeXT AnyRes, S2 and LLaVA-UHD slicing (``ps3.baselines``), and
optionally upstream PS3 in another virtual environment. For each method, resolution and
batch it records encoder tokens, FLOPs (counted on the meta device, so configurations too
big to run are counted too), median latency and peak memory, and writes ``results.json``,
``results.md`` and ``cost_vs_resolution.png``. See ``docs/benchmarks.md``.

    python -m ps3.bench --preset cpu-smoke --out bench_out
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..baselines import (
    SequenceGroup,
    anyres_encode,
    anyres_geometry,
    anyres_grid,
    attention_flops,
    count_tokens,
    llava_uhd_encode,
    llava_uhd_geometry,
    s2_encode,
    s2_geometry,
)
from ..cli_common import ArgumentParser, UsageError, check_output_folder
from ..configuration_ps3 import PS3VisionConfig
from ..demo import demo_config, randomize_parameters_
from ..modeling_ps3 import PS3VisionModel
from ..selection_plan import plan_looks
from .harness import environment, error_text, is_oom, measure_call
from .report import markdown_table, plot

# Run by its path under upstream's interpreter (``python -m ps3...`` would import this project's ``ps3``).
UPSTREAM_WORKER = Path(__file__).with_name("upstream_worker.py")

PS3_LOOKS: dict[str, int | str] = {"ps3-1": 1, "ps3-2": 2, "ps3-6": 6, "ps3-all": "all"}
BASELINES = ("anyres", "s2", "llava-uhd")
UPSTREAM_LOOKS: dict[str, int | str] = {f"upstream-{k}": v for k, v in PS3_LOOKS.items()}
METHODS = tuple(PS3_LOOKS) + BASELINES + tuple(UPSTREAM_LOOKS)

# Fields of a PS3VisionConfig that upstream's config understands (sent to the worker).
UPSTREAM_CONFIG_FIELDS = (
    "model_name", "hidden_size", "pool", "dynamic_img_size", "ps3_scales", "select_based_on_layer",
    "max_select_num", "max_select_num_each_scale", "separate_pos_emb", "highres_selection_feature",
    "highres_selection_module_hidden_dim", "highres_selection_module_out_dim", "highres_selection_module_depth",
    "highres_selection_module_kernel_size", "img_size",
)


@dataclass(frozen=True)
class Preset:
    """A benchmark grid: model shape, budget per look, resolutions, batches and timing."""

    description: str
    trunk: str  # "demo" (tiny random trunk, real PS3 geometry) or "so400m"
    max_select_num: int  # high-res tokens per look
    resolutions: tuple[int, ...]
    batches: tuple[int, ...]
    device: str
    dtype: torch.dtype
    warmup: int  # untimed calls before the timed ones (harness.bench)
    reps: int  # timed calls (median reported)


PRESETS: dict[str, Preset] = {
    "cpu-smoke": Preset("tiny random trunk (width 64, depth 4), PS3-1.5K geometry, fp32 on CPU",
                        "demo", 1280, (378, 756, 1512), (1,), "cpu", torch.float32, 1, 3),
    "gpu-1.5k": Preset("SO400M-shaped random weights, PS3-1.5K budget (1280 tokens per look), bf16",
                       "so400m", 1280, (378, 756, 1512), (1, 4, 16), "cuda", torch.bfloat16, 2, 10),
    "gpu-4k": Preset("SO400M-shaped random weights, PS3-4K budget (2560 tokens per look), bf16",
                     "so400m", 2560, (378, 756, 1512, 2268, 3024, 3780), (1, 4, 16), "cuda", torch.bfloat16, 2, 10),
}

BASE_SCALE = 378  # every preset's ViT input size s0


def scale_set(resolution: int, s0: int = BASE_SCALE) -> list[int]:
    """Scales used at ``resolution``: PS3's ``s0, 2*s0, 4*s0`` below it, then the resolution.

    PS3 at resolution R is the model whose largest scale is R (3780 -> PS3-4K's
    378/756/1512/3780); S2 uses the same scales.
    """
    if not isinstance(resolution, int) or resolution < s0 or resolution % s0:
        raise ValueError(f"resolution must be a positive multiple of {s0}, got {resolution!r}")
    return [s for s in (s0, 2 * s0, 4 * s0) if s < resolution] + [resolution]


def model_config(preset: Preset, resolution: int) -> PS3VisionConfig:
    """PS3 config of ``preset`` at ``resolution`` (the baselines use only its trunk)."""
    scales = scale_set(max(resolution, 2 * BASE_SCALE))
    if preset.trunk == "demo":
        return demo_config(ps3_scales=scales, max_select_num=preset.max_select_num)
    return PS3VisionConfig(model_name="vit_so400m_patch14_siglip_384", ps3_scales=scales, max_select_num=preset.max_select_num)


def build_model(config: PS3VisionConfig, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> PS3VisionModel:
    """A random model allocated straight on ``device`` (``"meta"`` for counting only).

    Keeps one hidden layer, as the baselines do, so memory compares the methods.
    """
    with torch.device("meta"):
        model = PS3VisionModel(config).to(dtype)
    if torch.device(device).type != "meta":
        model = randomize_parameters_(model.to_empty(device=device), seed)
    model.vision_model.num_hidden_layers_to_return = 1
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------- methods


def method_fn(method: str, model: PS3VisionModel, resolution: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The encoder call of ``method`` on ``(B, 3, R, R)`` images, returning ``(B, N, C)``."""
    enc = model.vision_model
    if method in PS3_LOOKS:
        looks = PS3_LOOKS[method]
        return lambda x: model(x, num_look_close=looks).last_hidden_state
    if method == "anyres":
        return lambda x: anyres_encode(enc, x, resolution=resolution)
    if method == "s2":
        return lambda x: s2_encode(enc, x, scale_set(resolution))
    if method == "llava-uhd":
        return lambda x: llava_uhd_encode(enc, x)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def method_sequences(method: str, model: PS3VisionModel, resolution: int) -> list[tuple[list[SequenceGroup], int]]:
    """Sequences one image makes the trunk encode, as ``(groups, kv_prefix_length)`` pairs.

    PS3: the 729-token low-res view, then one sequence per look (its selected tokens) whose
    queries also attend to the low-res K/V cache. Baselines: their crops, no prefix.
    """
    enc = model.vision_model
    s0, p = enc.ps3_scales[0], enc.patch_size
    if method in PS3_LOOKS:
        image = (resolution, resolution)
        patches = [h * w for h, w in (enc.feature_size_scale_i(image, i) for i in range(1, len(enc.ps3_scales)))]
        plan = plan_looks(patches, enc.max_select_num_each_scale, PS3_LOOKS[method], None)
        return [([SequenceGroup(1, enc.low_res_token_num)], 0), ([SequenceGroup(1, sum(look)) for look in plan], enc.low_res_token_num)]
    if method == "anyres":
        return [(anyres_geometry(s0, p, anyres_grid(s0, resolution=resolution)), 0)]
    if method == "s2":
        return [(s2_geometry(scale_set(resolution), p), 0)]
    if method == "llava-uhd":
        return [(llava_uhd_geometry(resolution, resolution, s0, p).groups(), 0)]
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


_ATTN_MODULE = re.compile(r"(^|\.)blocks\.\d+\.attn$")


def count_flops(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> tuple[int, int, torch.Size]:
    """FLOPs of ``fn(x)`` with ``torch.utils.flop_counter`` (run ``x`` on the meta device).

    Returns the total, the part inside the trunk's attention modules other than their
    ``qkv``/``proj`` linears (the attention core as this path computed it: the torch
    reference pads sequences of a packed batch to the longest one), and the output shape.
    """
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = fn(x)
    counts = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    core = 0
    for name, total in counts.items():
        if _ATTN_MODULE.search(name):
            children = sum(v for k, v in counts.items() if k.startswith(name + ".") and "." not in k[len(name) + 1 :])
            core += total - children
    return counts.get("Global", 0), core, out.shape


# ----------------------------------------------------------------------------- runner


@dataclass
class Options:
    preset: str
    methods: list[str]
    resolutions: list[int]
    batches: list[int]
    count_only: bool
    warmup: int
    reps: int
    upstream_python: str | None
    upstream_timeout: float
    seed: int
    upstream_pythonpath: str | None = None  # PYTHONPATH of the upstream worker (a --target folder)
    upstream_flops: bool = True  # the upstream worker counts FLOPs (one more call per entry)


def empty_record(opts: Options, env: dict, method: str, resolution: int, batch: int, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "method": method, "resolution": resolution, "batch": batch, "tokens": None, "out_tokens": None,
        "flops": None, "flops_per_image": None, "attn_flops": None, "attn_flops_counted": None,
        "latency_ms": None, "latency_ms_per_image": None, "tflops_per_s": None, "peak_mem_mb": None,
        "peak_mem_kind": None, "timer": None, "timing": None, "status": None, "error": None,
        "preset": opts.preset, "dtype": str(dtype).replace("torch.", ""), **env,
    }


def method_counts(method: str, meta_model: PS3VisionModel, resolution: int, batch: int) -> dict[str, Any]:
    """Tokens and FLOPs of ``method`` on ``batch`` images of side ``resolution``, counted on the meta
    device: the record fields ``tokens``, ``out_tokens`` (per image), ``flops``, ``flops_per_image``,
    ``attn_flops`` and ``attn_flops_counted`` (the whole batch)."""
    seqs = method_sequences(method, meta_model, resolution)
    enc = meta_model.vision_model
    exact_attn = batch * sum(attention_flops(groups, enc.width, enc.layers, prefix) for groups, prefix in seqs)
    x_meta = torch.empty(batch, 3, resolution, resolution, device="meta", dtype=next(meta_model.parameters()).dtype)
    total, counted_attn, out_shape = count_flops(method_fn(method, meta_model, resolution), x_meta)
    flops = total - counted_attn + exact_attn
    return dict(tokens=sum(count_tokens(g) for g, _ in seqs), out_tokens=int(out_shape[1]), flops=flops,
                flops_per_image=flops // batch, attn_flops=exact_attn, attn_flops_counted=counted_attn)


def run_method(
    rec: dict[str, Any], method: str, run_model: PS3VisionModel | None, meta_model: PS3VisionModel,
    x: torch.Tensor | None, warmup: int, reps: int, counts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Fill ``rec`` for one of this project's methods: count on meta (:func:`method_counts`, unless
    ``counts`` brings them), then (if a model and input are given) measure peak memory and latency
    (:func:`~ps3.bench.harness.measure_call`: ``warmup`` and ``reps`` calls, the median). Errors are
    recorded, never raised."""
    R, B = rec["resolution"], rec["batch"]
    if method in PS3_LOOKS and R <= meta_model.vision_model.ps3_scales[0]:
        rec.update(status="skipped", error=f"PS3 needs a high-res scale above {R}; at {R} it is the plain ViT")
        return rec
    try:
        rec.update(counts if counts is not None else method_counts(method, meta_model, R, B))
    except Exception as exc:  # noqa: BLE001 - a failing method is a result, not a crash
        rec.update(status="failed", error="counting: " + error_text(exc))
        return rec
    if run_model is None or x is None:
        rec.update(status="counted")
        return rec
    fn = method_fn(method, run_model, R)
    try:
        with torch.inference_mode():
            timing, rec["peak_mem_mb"], rec["peak_mem_kind"] = measure_call(fn, x, warmup, reps)
        rec.update(latency_ms=timing.ms, timer=timing.timer, timing=timing.record())
        rec.update(status="ok", latency_ms_per_image=rec["latency_ms"] / B,
                   tflops_per_s=rec["flops"] / (rec["latency_ms"] * 1e-3) / 1e12)
    except Exception as exc:  # noqa: BLE001
        rec.update(status="OOM" if is_oom(exc) else "failed", error=error_text(exc), peak_mem_mb=None, latency_ms=None)
        if x.is_cuda:
            torch.cuda.empty_cache()
    return rec


def run_upstream(
    opts: Options, preset: Preset, config: PS3VisionConfig, resolution: int, methods: list[str], records: list[dict]
) -> None:
    """Time upstream PS3 for every batch and look count at one resolution in one subprocess
    (``upstream_worker.py`` under ``--upstream-python``); fills ``records``."""
    reason = None
    if resolution <= BASE_SCALE:
        reason = f"PS3 needs a high-res scale above {resolution}"
    elif opts.upstream_python is None:
        reason = "--upstream-python not given"
    elif opts.count_only:
        reason = "--count-only: upstream is only timed"
    if reason is not None:
        for rec in records:
            rec.update(status="skipped", error=reason)
        return
    spec = config.trunk_spec()
    request = {
        "config": {k: getattr(config, k) for k in UPSTREAM_CONFIG_FIELDS},
        "trunk": {"width": spec.width, "depth": spec.depth, "num_heads": spec.num_heads, "mlp_ratio": spec.mlp_ratio,
                  "patch_size": spec.patch_size, "img_size": spec.img_size},
        "resolution": resolution, "batches": sorted({r["batch"] for r in records}),
        "looks": [UPSTREAM_LOOKS[m] for m in methods], "device": preset.device,
        "dtype": str(preset.dtype).replace("torch.", ""), "warmup": opts.warmup, "reps": opts.reps, "seed": opts.seed,
        "count_flops": opts.upstream_flops,
    }
    env = None
    if opts.upstream_pythonpath:
        env = {**os.environ, "PYTHONPATH": opts.upstream_pythonpath}
    with tempfile.TemporaryDirectory() as tmp:
        req_path, out_path = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req_path.write_text(json.dumps(request))
        # The worker rewrites its result file after every entry: a timeout or crash keeps what was measured.
        try:
            proc = subprocess.run([opts.upstream_python, str(UPSTREAM_WORKER), str(req_path), str(out_path)],
                                  capture_output=True, text=True, timeout=opts.upstream_timeout, cwd=tmp, env=env)
            missing = None
            if proc.returncode != 0 or not out_path.exists():
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                missing = f"upstream worker exited with {proc.returncode}: {tail[0]}"
        except subprocess.TimeoutExpired:
            missing = f"upstream worker timed out after {opts.upstream_timeout:.0f} s"
        except (OSError, subprocess.SubprocessError) as exc:
            missing = error_text(exc)
        try:
            reply = json.loads(out_path.read_text()) if out_path.exists() else {"results": []}
        except ValueError as exc:
            reply, missing = {"results": []}, error_text(exc)
    by_key = {(r["batch"], str(r["looks"])): r for r in reply["results"]}
    for rec in records:
        res = by_key.get((rec["batch"], str(UPSTREAM_LOOKS[rec["method"]])))
        if res is None:
            rec.update(status="failed", error=missing or "upstream worker returned no result")
            continue
        rec.update({k: res.get(k) for k in ("status", "error", "tokens", "flops", "latency_ms", "peak_mem_mb",
                                            "peak_mem_kind", "timer", "timing")})
        rec["out_tokens"] = res.get("tokens")
        rec["upstream_version"] = reply.get("upstream_version")
        if rec["flops"] is not None:
            rec["flops_per_image"] = rec["flops"] // rec["batch"]
        if rec["latency_ms"] is not None:
            rec["latency_ms_per_image"] = rec["latency_ms"] / rec["batch"]
            if rec["flops"] is not None:
                rec["tflops_per_s"] = rec["flops"] / (rec["latency_ms"] * 1e-3) / 1e12


def _progress(total: int):
    """A tqdm bar on stderr, or a stand-in that shows nothing when tqdm is not installed."""
    try:
        from tqdm import tqdm
    except ImportError:
        return SimpleNamespace(update=lambda n=1: None, set_postfix_str=lambda text: None, close=lambda: None)
    return tqdm(total=total, desc="ps3-bench", unit="run", file=sys.stderr)


def run(opts: Options) -> list[dict[str, Any]]:
    """Measure every (resolution, batch, method) of ``opts``; records in that order."""
    preset = PRESETS[opts.preset]
    if not opts.count_only and preset.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"preset {opts.preset} needs a CUDA GPU; add --count-only to count tokens and FLOPs without one")
    env = environment(preset.device if not opts.count_only else "cpu")
    ours = [m for m in opts.methods if m not in UPSTREAM_LOOKS]
    upstream = [m for m in opts.methods if m in UPSTREAM_LOOKS]
    records: list[dict[str, Any]] = []
    bar = _progress(len(opts.resolutions) * len(opts.batches) * len(opts.methods))
    for R in opts.resolutions:
        config = model_config(preset, R)
        meta_model = build_model(config, "meta", preset.dtype)
        run_model = None if opts.count_only else build_model(config, preset.device, preset.dtype, opts.seed)
        upstream_records = []
        for B in opts.batches:
            x = None
            if run_model is not None:
                gen = torch.Generator(device=preset.device).manual_seed(opts.seed)
                x = torch.randn(B, 3, R, R, generator=gen, device=preset.device).to(preset.dtype)
            for method in ours:
                bar.set_postfix_str(f"{method} {R}px x{B}")
                rec = empty_record(opts, env, method, R, B, preset.dtype)
                records.append(run_method(rec, method, run_model, meta_model, x, opts.warmup, opts.reps))
                bar.update()
            for method in upstream:
                upstream_records.append(empty_record(opts, env, method, R, B, preset.dtype))
                records.append(upstream_records[-1])
            del x
        del run_model
        if preset.device == "cuda" and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the upstream subprocess needs the memory this process caches
        if upstream:
            bar.set_postfix_str(f"upstream {R}px")
            run_upstream(opts, preset, config, R, upstream, upstream_records)
            bar.update(len(upstream_records))
    bar.close()
    return records


# ----------------------------------------------------------------------------- CLI


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _method_list(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    return methods


def parse_args(argv: Sequence[str] | None = None) -> tuple[Options, Path]:
    parser = ArgumentParser(prog="ps3-bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-smoke",
                        help="; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()))
    parser.add_argument("--out", type=Path, help="output folder (default: bench_results/<preset>)")
    parser.add_argument("--methods", type=_method_list, default=list(METHODS), help="comma-separated subset of: " + ", ".join(METHODS))
    parser.add_argument("--resolutions", type=_int_list, help=f"comma-separated multiples of {BASE_SCALE} (default: the preset's)")
    parser.add_argument("--max-resolution", type=int, help="drop resolutions above this")
    parser.add_argument("--batches", type=_int_list, help="comma-separated batch sizes (default: the preset's)")
    parser.add_argument("--count-only", action="store_true", help="count tokens and FLOPs only (no device needed)")
    parser.add_argument("--warmup", type=int, help="untimed calls before the timed ones (default: the preset's)")
    parser.add_argument("--reps", type=int, help="timed calls, median reported (default: the preset's)")
    parser.add_argument("--upstream-python", help="python of a venv with upstream PS3 (ps3-torch + timm) to time it too")
    parser.add_argument("--upstream-timeout", type=float, default=3600.0, help="seconds per upstream subprocess (default 3600)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    resolutions = args.resolutions or list(preset.resolutions)
    for R in resolutions:
        if R % BASE_SCALE:
            parser.error(f"resolution {R} is not a multiple of {BASE_SCALE}")
    if args.max_resolution is not None:
        resolutions = [R for R in resolutions if R <= args.max_resolution]
    if not resolutions:
        parser.error("no resolution left to run")
    for name in ("warmup", "reps"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            parser.error(f"--{name} must be >= 0")
    if not args.upstream_timeout > 0:
        parser.error(f"--upstream-timeout must be > 0 seconds, got {args.upstream_timeout}")
    if args.upstream_python is not None and shutil.which(args.upstream_python) is None:
        parser.error(f"--upstream-python {args.upstream_python} is not an executable (a path or a command on PATH)")
    if not args.count_only and preset.device == "cuda" and not torch.cuda.is_available():
        parser.error(f"preset {args.preset} needs a CUDA GPU; add --count-only to count tokens and FLOPs without one")
    out = args.out or Path("bench_results") / args.preset
    try:
        check_output_folder(out, "--out")
    except UsageError as err:
        parser.error(str(err))
    opts = Options(
        preset=args.preset, methods=args.methods, resolutions=resolutions, batches=args.batches or list(preset.batches),
        count_only=args.count_only, warmup=preset.warmup if args.warmup is None else args.warmup,
        reps=preset.reps if args.reps is None else args.reps, upstream_python=args.upstream_python,
        upstream_timeout=args.upstream_timeout, seed=args.seed,
    )
    return opts, out


def main(argv: Sequence[str] | None = None) -> int:
    opts, out = parse_args(argv)
    records = run(opts)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(records, indent=1) + "\n")
    table = markdown_table(records)
    (out / "results.md").write_text(table)
    print(table)
    if plot(records, out / "cost_vs_resolution.png"):
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'cost_vs_resolution.png'}")
    else:
        print(f"wrote {out / 'results.json'}, {out / 'results.md'}")
    return 0
