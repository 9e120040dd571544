"""gpu_suite.py's plumbing without a GPU: the dry run (every stage at tiny shapes, Triton
interpreted) writes a complete summary inside its budget, and a stage that outlives the budget
is cut off with what it measured kept. CI time: about 50 s + 10 s on 2 idle cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpu_suite
from launch_variants import VARIANTS, use_variant

SUITE = Path(gpu_suite.__file__)


def run_suite(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "PS3_UPSTREAM_PYTHON")}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(SUITE), "--dry-run", "--out", str(out), *args], env=env,
                          capture_output=True, text=True, timeout=300)
    return done, time.perf_counter() - start


def test_dry_run_writes_a_complete_summary(tmp_path):
    done, seconds = run_suite(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["suite"]["dry_run"] and seconds < summary["suite"]["budget_s"] + 10 < 185
    assert [s["name"] for s in summary["suite"]["stages"]] == list(gpu_suite.STAGE_NAMES)
    assert {s["status"] for s in summary["suite"]["stages"]} == {"ok"}, summary["suite"]["stages"]
    for key in ("device", "torch", "triton", "commit", "ceilings"):
        assert summary[key], key
    assert summary["ceilings"]["copy_gb_per_s"] > 0

    checks = summary["correctness"]
    names = " ".join(c["name"] for c in checks)
    for part in ("attention look", "attention low-res", "patch embed", "selection", "upstream parity", "no host sync"):
        assert part in names, part
    for dtype in ("bf16", "fp16", "fp32"):
        assert f"attention look fwd+bwd {dtype}" in names
    assert all(c["ok"] is True for c in checks), [c for c in checks if not c["ok"]]
    attention = next(c for c in checks if c["name"].startswith("attention look fwd+bwd bf16"))
    assert set(attention["errors"]) == {"out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"}
    assert 0 < attention["worst_rel_err"] < attention["tol"]

    timings = {(t["name"], t["peer"].split()[0]): t for t in summary["timings"]}
    for key in [("attention fwd", "sdpa"), ("attention fwd_bwd", "sdpa"), ("patch gather+embed", "torch"),
                ("selection score+assign", "torch"), ("attention fwd", "flex")]:
        t = timings[key]
        assert t["ours_ms"] > 0 and t["peer_ms"] > 0 and t["shape"], t
        assert t["ratio"] == pytest.approx(t["peer_ms"] / t["ours_ms"])
    assert "backward on CPU" in timings[("attention fwd_bwd", "flex")]["error"]  # recorded, not raised
    assert {v["op"] for v in summary["variants"]} == set(VARIANTS)
    for v in summary["variants"]:
        assert v["winner"] in {c["name"] for c in v["candidates"]}
        assert all(c["status"] == "ok" and c["ms"] > 0 for c in v["candidates"]), v

    rows = summary["end_to_end"]
    assert {(r["method"], r["looks"]) for r in rows if r["status"] == "ok"} >= {
        ("ps3 (this project)", 1), ("ps3 (this project)", 6), ("s2", None), ("anyres", None)}
    for r in rows:
        assert {"method", "batch", "looks", "ms", "tflops_per_s", "peak_mem_mb", "status"} <= set(r)
        assert (r["status"] == "ok") == (r["ms"] is not None), r
    upstream = [r for r in rows if r["method"] == "upstream ps3"]
    assert len(upstream) == 2 and all(r["status"] == "ok" or r["error"] for r in upstream)
    if not (SUITE.parent.parent / ".whl" / "upstream").is_dir():  # CI: no wheels carried
        assert all(r["status"] == "skipped" and ".whl/upstream" in r["error"] for r in upstream)
    (launch,) = summary["launch_overhead"]
    assert launch["eager_ms"] > 0 and launch["status"] == "skipped"  # CUDA graphs need a GPU

    table = (tmp_path / "summary.md").read_text()
    assert "| stage | status |" in table and table.strip() in done.stdout
    assert (tmp_path / "suite.log").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.log", "summary.json", "summary.md"]


def test_a_stage_past_the_budget_is_cut_off_and_recorded(tmp_path):
    """8 s for the correctness stage alone: the worker's start takes about half of it, so the
    stage either stops starting checks (recording the rest as skipped) or is killed at its cap."""
    done, seconds = run_suite(tmp_path, "--stages", "correctness", "--budget-s", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert seconds < 8 + 6
    summary = json.loads((tmp_path / "summary.json").read_text())
    (stage,) = summary["suite"]["stages"]
    assert stage["name"] == "correctness" and stage["cap_s"] == 8.0
    assert stage["status"] in ("ok", "timeout"), stage
    ran = [c for c in summary["correctness"] if c["status"] != "skipped"]
    skipped = [c for c in summary["correctness"] if c["status"] == "skipped"]
    assert stage["status"] == "timeout" or skipped, "a full correctness stage does not fit in 8 s"
    assert all(c["ok"] is None and "no time left" in c["error"] for c in skipped)
    assert all(c["ok"] is True for c in ran)


def test_use_variant_patches_and_restores_launch_config():
    import ps3_kernels.triton.patch_embed as pe
    import ps3_kernels.triton.varlen_attention as va
    import torch

    original = va._launch_config
    base = original(72, torch.bfloat16)
    fwd_variant = VARIANTS["attention_fwd"][1]
    with use_variant(fwd_variant):
        patched = va._launch_config(72, torch.bfloat16)
    assert va._launch_config is original
    assert patched == {**base, "fwd": fwd_variant.override["fwd"]}
    embed_variant = VARIANTS["patch_embed"][2]
    with use_variant(embed_variant, interpreted=True):
        assert pe._launch_config(torch.bfloat16, 1152, 588) == embed_variant.interpreted_override
    assert pe._launch_config(torch.bfloat16, 1152, 588) != embed_variant.interpreted_override
    with use_variant(VARIANTS["patch_embed"][0]):  # the default patches nothing
        assert va._launch_config is original


def test_schedule_gives_later_stages_their_share():
    deadlines = gpu_suite.schedule(100.0, 360.0)
    assert list(deadlines) == list(gpu_suite.STAGE_NAMES)
    assert deadlines["launch_overhead"] == pytest.approx(460.0)
    assert all(a < b for a, b in zip(deadlines.values(), list(deadlines.values())[1:]))
    only = gpu_suite.schedule(0.0, 10.0, ("op_timings", "end_to_end"))
    assert only["end_to_end"] == pytest.approx(10.0) and 4 < only["op_timings"] < 6


def test_bad_arguments():
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--out", "x", "--stages", "warmup"])
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--out", "x", "--budget-s", "0"])
