"""One PS3 pre-training step, this package against upstream PS3 side by side: step time and peak
live tensor bytes.

The step is upstream's trainer's (``ps3/bench/pretrain_step.py``: ground-truth boxes as
``gt_selection_maps``, ``is_global_text``, ``pool_gt_token_only``, a prompt from a text tower,
gradient checkpointing, SigLIP loss on ``pooled_output`` plus box-supervision losses on the prior
and posterior selection probabilities, backward, AdamW step). Both sides run that same code on the
same weights (this side draws them, saves them, upstream's worker loads them) and the same inputs,
with the same timer and the same live-bytes tracker (``ps3.bench.harness.LiveBytes``: storages
alive during the step, counted the same way on every device). Upstream runs in its own
interpreter (``--upstream-python`` or ``PS3_UPSTREAM_PYTHON``) after this side has released its
model; its ``topk`` is replaced by a stable sort (ties to the lower raster index, this package's
rule) so both sides select the same patches, and the loss terms must agree (fp32) before numbers
are reported.

    python benchmarks/bench_train.py --preset cpu --upstream-python VENV/bin/python --out benchmarks/results/train-cpu-so400m.json
    python benchmarks/bench_train.py --preset gpu --out train-gpu.json     # SO400M, bf16, batches 8/16/32
    python benchmarks/bench_train.py --preset tiny --out /tmp/train.json   # seconds (CI)

For a suite: :func:`run_case` returns the rows of one case (both sides), :func:`estimate_seconds`
its cost, :data:`PRESETS` the cases.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ps3 import PS3TextConfig, PS3VisionConfig
from ps3.bench import UPSTREAM_WORKER
from ps3.bench.harness import LiveBytes, environment, error_text, is_oom, malloc_trim
from ps3.bench.pretrain_step import LOSS_TERMS, PretrainModel, make_batch, run_steps
from ps3.demo import randomize_parameters_
from ps3.modeling_ps3 import PS3VisionEncoder
from ps3.text_transformer import TextTransformer
from ps3_kernels import use_backend

GIB = 2**30
MEMORY_BUDGET = 80 * GIB  # "largest batch per 80 GB": an 80 GB card's 80 GiB

# Upstream's model configs of the trainer (train/src/open_clip/model_configs/PS3-{1.5K,4K}-SigLIP.json),
# vision fields; both use a 2560-token budget per look in pre-training.
SO400M_VISION = dict(model_name="vit_so400m_patch14_siglip_384", hidden_size=1152, pool="map",
                     select_based_on_layer=[0, 9, 18, 26], max_select_num=2560, separate_pos_emb=True,
                     highres_selection_feature=True)
MODEL_SCALES = {"ps3-1.5k": [378, 756, 1512], "ps3-4k": [378, 756, 1512, 3780], "tiny": [56, 112, 224]}
# The trainer's text tower (27 layers of width 1152); a preset may run fewer layers (``text_layers``).
SO400M_TEXT = dict(output_dim=1152, prompt_proj_dim=1152, context_length=64, vocab_size=32000, width=1152, heads=16,
                   layers=27, mlp_ratio=3.7362, no_causal_mask=True, proj_bias=True, pool_type="last",
                   norm_kwargs={"eps": 1e-6})
TINY_TRUNK = dict(depth=2, num_heads=2, mlp_ratio=2.0, patch_size=14)
TINY_VISION = dict(model_name="ps3_train_tiny", hidden_size=64, pool="map", select_based_on_layer=[0, 1],
                   max_select_num=40, separate_pos_emb=True, highres_selection_feature=True,
                   highres_selection_module_hidden_dim=16, highres_selection_module_out_dim=16,
                   highres_selection_module_depth=1, **TINY_TRUNK)
TINY_TEXT = dict(output_dim=64, prompt_proj_dim=64, context_length=8, vocab_size=100, width=64, heads=2, layers=1,
                 mlp_ratio=2.0, no_causal_mask=True, proj_bias=True, pool_type="last", norm_kwargs={"eps": 1e-6})
SIDES = ("ps3-kernels", "upstream")


@dataclass(frozen=True)
class Case:
    """One benchmark case: a model (``ps3-1.5k``, ``ps3-4k`` with SO400M shapes, or ``tiny``), an
    image size, a batch, the autocast dtype (None: fp32), the text tower's depth, and optionally a
    shallower SO400M-wide trunk (``trunk_depth``, for quick looks at where the bytes go)."""

    model: str
    resolution: int
    batch: int
    autocast: str | None
    text_layers: int
    trunk_depth: int | None = None


@dataclass(frozen=True)
class Preset:
    description: str
    cases: tuple[Case, ...]
    device: str
    steps: int  # timed steps per side (the first creates the optimizer state, the later ones are reported), then one tracked


def _cases(model: str, resolution: int, batches, autocast, text_layers) -> tuple[Case, ...]:
    return tuple(Case(model, resolution, b, autocast, text_layers) for b in batches)


PRESETS: dict[str, Preset] = {
    "tiny": Preset("tiny random towers (width 64), scales 56/112/224, fp32: the code path in seconds",
                   _cases("tiny", 224, (1, 2), None, 1), "cpu", 2),
    "cpu": Preset("SO400M shapes, PS3-1.5K at 1512 and PS3-4K at 3780, batches 1 and 2 (two batches imply the "
                  "largest per 80 GiB), fp32, 2-layer text tower (the trainer's has 27: its AdamW state would not fit a "
                  "24 GB box beside the vision tower's); one timed step (it also creates the optimizer state) and one "
                  "tracked step per side",
                  _cases("ps3-1.5k", 1512, (1, 2), None, 2) + _cases("ps3-4k", 3780, (1, 2), None, 2), "cpu", 1),
    "gpu": Preset("SO400M shapes and the trainer's 27-layer text tower, batches 8/16/32, bf16 autocast, CUDA",
                  _cases("ps3-1.5k", 1512, (8, 16, 32), "bfloat16", 27) + _cases("ps3-4k", 3780, (8, 16, 32), "bfloat16", 27),
                  "cuda", 4),
}


def configs(model: str, text_layers: int, trunk_depth: int | None = None) -> tuple[dict, dict]:
    """Vision and text config fields (both packages understand them) of a case's model."""
    if model not in MODEL_SCALES:
        raise ValueError(f"model must be one of {sorted(MODEL_SCALES)}, got {model!r}")
    vision = dict(TINY_VISION if model == "tiny" else SO400M_VISION, ps3_scales=MODEL_SCALES[model])
    if trunk_depth is not None and model != "tiny":
        d = trunk_depth
        vision.update(model_name=f"ps3_train_so400m_depth{d}", depth=d, num_heads=16, mlp_ratio=3.7362, patch_size=14,
                      img_size=384, select_based_on_layer=sorted({0, d // 3, 2 * d // 3, d - 1}))
    text = dict(TINY_TEXT if model == "tiny" else SO400M_TEXT)
    text["layers"] = text_layers
    return vision, text


def upstream_trunk(vision: dict) -> dict | None:
    """The trunk upstream's worker registers with timm for a config that names an explicit trunk."""
    if "depth" not in vision:
        return None
    fields = {k: vision[k] for k in ("depth", "num_heads", "mlp_ratio", "patch_size")}
    return dict(fields, width=vision["hidden_size"], img_size=vision.get("img_size") or vision["ps3_scales"][0])


def build_model(vision: dict, text: dict, seed: int = 0) -> PretrainModel:
    """This package's towers with seeded random weights (SigLIP's initial logit scale and bias)."""
    model = PretrainModel(PS3VisionEncoder(PS3VisionConfig(**vision)), TextTransformer(PS3TextConfig(**text)))
    randomize_parameters_(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    return model


def estimate_seconds(case: Case, device: str, steps: int) -> float:
    """Rough wall time of one case, both sides: model FLOPs of a checkpointed step (about 4x a
    forward: forward, recompute, 2x backward) at 60 GFLOP/s on a CPU and 150 TFLOP/s on a GPU,
    plus building and loading the models twice. For scheduling, not for reporting."""
    vision, text = configs(case.model, case.text_layers, case.trunk_depth)
    width = vision["hidden_size"]
    depth = vision.get("depth", 27)
    per_token = 2 * 12.5 * width * width * depth  # qkv, proj and MLP (ratio ~3.7) per layer
    tokens = (vision["ps3_scales"][0] // 14) ** 2 + vision["max_select_num"]
    text_flops = 2 * 12.5 * text["width"] ** 2 * text["layers"] * text["context_length"]
    flops = 4 * case.batch * (tokens * per_token + text_flops) * (steps + 1) * 2
    rate = 150e12 if device == "cuda" else 60e9
    params = 12.5 * width * width * (depth + text["layers"])
    setup = 2 * (params * 16 / (2e9 if device == "cuda" else 1e9))  # init, save, load per side: host work
    return flops / rate + setup + 5


def _side_row(side: str, case: Case, device: str, record: dict | None, status: str, error: str | None) -> dict:
    row = dict(side=side, model=case.model, resolution=case.resolution, batch=case.batch, dtype=case.autocast or "float32",
               text_layers=case.text_layers, trunk_depth=case.trunk_depth or "so400m", device=device, status=status,
               error=error)
    if record is not None:
        timed = record["step_ms"][1:] or record["step_ms"]  # the first step also creates the optimizer state
        phases = record["phase_peak_bytes"]
        cpu = record["cpu_ms"][1:] or record["cpu_ms"]
        row.update(step_ms=sorted(timed)[len(timed) // 2], step_cpu_ms=sorted(cpu)[len(cpu) // 2],
                   peak_live_bytes=record["peak_live_bytes"],
                   fwd_bwd_peak_live_bytes=max(phases["forward"], phases["backward"]),
                   start_live_bytes=record["start_live_bytes"], record=record)
        if record["cuda_max_allocated_bytes"]:
            row["cuda_max_allocated_bytes"] = max(record["cuda_max_allocated_bytes"][1:] or record["cuda_max_allocated_bytes"])
    return row


def loss_mismatch(ours: dict, upstream: dict, rtol: float) -> list[str]:
    """The loss terms (per step) where the two sides differ by more than ``rtol`` (relative, with
    an absolute floor of ``rtol`` for terms near zero)."""
    bad = []
    for step, (a, b) in enumerate(zip(ours["losses"], upstream["losses"])):
        for term in LOSS_TERMS:
            if not abs(a[term] - b[term]) <= rtol * max(1.0, abs(b[term])):
                bad.append(f"step {step + 1} {term}: {a[term]!r} vs upstream {b[term]!r}")
    return bad


def _max_loss_diff(ours: dict, upstream: dict) -> float:
    return max(abs(a[t] - b[t]) / max(1.0, abs(b[t])) for a, b in zip(ours["losses"], upstream["losses"]) for t in LOSS_TERMS)


def run_ours(case: Case, work: Path | None, device: str = "cpu", steps: int = 2, seed: int = 0, backend: str = "auto",
             where: bool = False) -> dict:
    """This package's row of ``case`` (``side`` ``ps3-kernels``); its weights and inputs are saved in
    ``work`` (unless None) for :func:`run_upstream`. The model is released (and the allocator's cache
    trimmed) before returning: upstream's process needs the memory."""
    vision, text = configs(case.model, case.text_layers, case.trunk_depth)
    autocast = getattr(torch, case.autocast) if case.autocast else None
    batch = make_batch(case.batch, case.resolution, text["vocab_size"], text["context_length"], seed)
    torch.manual_seed(seed)
    model = build_model(vision, text, seed)
    if work is not None:
        torch.save(batch, work / "batch.pt")
        torch.save(model.state_dict(), work / "weights.pt")
    try:
        model.to(device)
        with use_backend(backend):
            record = run_steps(model, {k: v.to(device) for k, v in batch.items()}, LiveBytes, steps, autocast, where)
        row = _side_row(SIDES[0], case, device, record, "ok", None)
    except Exception as exc:  # noqa: BLE001 - a failure is a result
        row = _side_row(SIDES[0], case, device, None, "OOM" if is_oom(exc) else "failed", error_text(exc))
    row["backend"] = backend
    del model
    gc.collect()
    malloc_trim()
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def run_upstream(case: Case, work: Path, python: str, device: str = "cpu", steps: int = 2, seed: int = 0,
                 where: bool = False, pythonpath: str | None = None, timeout: float | None = None) -> dict:
    """Upstream's row of ``case`` (``side`` ``upstream``): its worker under ``python`` (with ``pythonpath``
    first on its path, e.g. unpacked wheels) on the weights and inputs :func:`run_ours` saved in ``work``."""
    vision, text = configs(case.model, case.text_layers, case.trunk_depth)
    request = dict(task="pretrain", vision_config=vision, text_config=text, weights=str(work / "weights.pt"),
                   batch=str(work / "batch.pt"), device=device, autocast=case.autocast, steps=steps, seed=seed,
                   stable_topk=True, where=where, trunk=upstream_trunk(vision))
    (work / "request.json").write_text(json.dumps(request))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [pythonpath, env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([python, str(UPSTREAM_WORKER), str(work / "request.json"), str(work / "reply.json")],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return _side_row(SIDES[1], case, device, None, "timeout", f"the upstream worker ran past {timeout:.0f} s")
    if proc.returncode != 0 or not (work / "reply.json").exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return _side_row(SIDES[1], case, device, None, "failed", f"worker exit {proc.returncode}: " + " | ".join(tail))
    reply = json.loads((work / "reply.json").read_text())
    return _side_row(SIDES[1], case, device, reply.get("record"), reply["status"], reply.get("error"))


def compare(rows: list[dict], case: Case, rtol: float = 1e-4) -> list[dict]:
    """Both sides' rows of ``case``: upstream's gets ``loss_max_rel_diff``; in fp32 a loss mismatch beyond
    ``rtol`` marks both ``loss_mismatch`` (their numbers stay, for diagnosis)."""
    if len(rows) == 2 and all(r["status"] == "ok" for r in rows):
        ours, theirs = rows[0]["record"], rows[1]["record"]
        rows[1]["loss_max_rel_diff"] = _max_loss_diff(ours, theirs)
        bad = loss_mismatch(ours, theirs, rtol)
        if bad and case.autocast is None:
            for r in rows:
                r.update(status="loss_mismatch", error="; ".join(bad)[:500])
    return rows


def run_case(case: Case, device: str = "cpu", steps: int = 2, upstream_python: str | None = None, seed: int = 0,
             backend: str = "auto", where: bool = False, rtol: float = 1e-4) -> list[dict]:
    """Rows of one case: this package's (``side`` ``ps3-kernels``) and, with ``upstream_python``,
    upstream's, each with ``step_ms`` (median of the timed steps after the first), ``peak_live_bytes``
    and ``fwd_bwd_peak_live_bytes`` (of the tracked step: all of it, and its forward and backward),
    ``start_live_bytes`` (parameters, gradients, optimizer state, inputs), on CUDA
    ``cuda_max_allocated_bytes``, and the full ``record`` (per step and per phase); see :func:`compare`."""
    with tempfile.TemporaryDirectory(prefix="ps3_bench_train_") as tmp:
        rows = [run_ours(case, Path(tmp) if upstream_python else None, device, steps, seed, backend, where)]
        if upstream_python:
            rows.append(run_upstream(case, Path(tmp), upstream_python, device, steps, seed, where))
    return compare(rows, case, rtol)


def implied_max_batch(rows: list[dict], budget: int = MEMORY_BUDGET) -> dict[tuple, int]:
    """Largest batch whose step fits ``budget`` for each (side, model, resolution, dtype): a line
    through each phase's peak (forward, backward, AdamW's update, ...) at the two largest batches
    measured, read where it crosses ``budget``; the step fits while every phase does. Per phase,
    because the step's peak moves between them (at batch 1 often the update, whose bytes hardly
    grow with the batch): a line through the step's peaks alone would mix them. An estimate."""
    groups: dict[tuple, dict[int, dict[str, int]]] = {}
    for r in rows:
        if r["status"] == "ok":
            phases = (r.get("record") or {}).get("phase_peak_bytes") or {"step": r["peak_live_bytes"]}
            groups.setdefault((r["side"], r["model"], r["resolution"], r["dtype"]), {})[r["batch"]] = phases
    implied = {}
    for key, by_batch in groups.items():
        if len(by_batch) < 2:
            continue
        (b1, ph1), (b2, ph2) = sorted(by_batch.items())[-2:]
        fits = []
        for phase in ph1.keys() & ph2.keys():
            p1, p2 = ph1[phase], ph2[phase]
            slope = (p2 - p1) / (b2 - b1)
            if slope > 0:
                fits.append(int((budget - (p1 - slope * b1)) // slope))
            elif p2 > budget:
                fits.append(0)
        if fits:
            implied[key] = max(min(fits), 0)
    return implied


def markdown(rows: list[dict]) -> str:
    """Ours against upstream per case: step time, peak live bytes of the step and of its forward +
    backward, their ratios (ours / upstream), and the implied largest batch per 80 GiB."""
    implied = implied_max_batch(rows)
    by = {(r["side"], r["model"], r["resolution"], r["batch"], r["dtype"]): r for r in rows}
    columns = (("step ms", "step_ms", 1, "{:.0f}"), ("step CPU s", "step_cpu_ms", 1e3, "{:.1f}"),
               ("step peak GiB", "peak_live_bytes", GIB, "{:.3f}"),
               ("fwd+bwd peak GiB", "fwd_bwd_peak_live_bytes", GIB, "{:.3f}"))
    head = "| model | px | batch | dtype | " + " | ".join(f"{c[0]} (ours / upstream) | ratio" for c in columns)
    lines = [head + " | implied batch per 80 GiB (ours / upstream) |", "|---|---:|---:|---|" + "---:|---:|" * len(columns) + "---:|"]
    for key in sorted({k[1:] for k in by}, key=lambda k: (k[0], k[1], k[3], k[2])):
        ours, theirs = by.get((SIDES[0], *key)), by.get((SIDES[1], *key))
        cells = []
        for _, field, scale, fmt in columns:
            vals = [fmt.format(r[field] / scale) if r and r.get(field) is not None else (r or {}).get("status", "-")
                    for r in (ours, theirs)]
            ok = all(r and r.get(field) for r in (ours, theirs))
            cells += [" / ".join(vals), f"{ours[field] / theirs[field]:.3f}" if ok else "-"]
        fit = " / ".join(str(implied.get((s, key[0], key[1], key[3]), "-")) for s in SIDES)
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | " + " | ".join(cells) + f" | {fit} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--out", required=True, help="JSON file for the results")
    parser.add_argument("--upstream-python", default=os.environ.get("PS3_UPSTREAM_PYTHON"),
                        help="interpreter of a venv with upstream PS3 (default: $PS3_UPSTREAM_PYTHON; none: ours only)")
    parser.add_argument("--steps", type=int, help="steps per side (default: the preset's)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    parser.add_argument("--only", help="comma-separated case indices of the preset to run")
    parser.add_argument("--where", action="store_true", help="label the bytes alive at the peak by op and line")
    parser.add_argument("--trunk-depth", type=int, help="a shallower SO400M-wide trunk (quick looks; not SO400M)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    cases = list(preset.cases)
    if args.only:
        cases = [cases[int(i)] for i in args.only.split(",")]
    if args.trunk_depth:
        cases = [replace(c, trunk_depth=args.trunk_depth) for c in cases]
    steps = args.steps or preset.steps
    rows: list[dict] = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(environment(preset.device), preset=args.preset, description=preset.description, steps=steps,
                memory_budget_bytes=MEMORY_BUDGET)
    for case in cases:
        print(f"{case} ~{estimate_seconds(case, preset.device, steps):.0f} s", flush=True)
        rows += run_case(case, preset.device, steps, args.upstream_python, backend=args.backend, where=args.where)
        for r in rows[-2:]:
            print(f"  {r['side']}: {r['status']} {r.get('step_ms', 0):.0f} ms, {r.get('peak_live_bytes', 0) / GIB:.3f} GiB "
                  f"{r.get('error') or ''}", flush=True)
        implied = {" ".join(map(str, k)): v for k, v in implied_max_batch(rows).items()}
        out.write_text(json.dumps(dict(meta=meta, implied_max_batch=implied, results=rows), indent=1))
    table = markdown(rows)
    print(table)
    bad = [r for r in rows if r["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
