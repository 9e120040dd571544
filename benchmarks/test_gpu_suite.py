"""gpu_suite.py without a GPU: the dry run (every stage at tiny shapes, Triton interpreted) writes a
complete summary inside its budget, a stage that outlives the budget is cut off with what it
measured kept, and the plan of a real run keeps every stage within its cap with the rows the
suite exists for, on specialisations that the committed compile report has and that compile in
seconds. CI time: about 40 s + 10 s + 5 s on 2 idle cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpu_suite
import suite_stages
from launch_variants import VARIANTS, use_variant
from suite_stages.base import GPU
from suite_stages.plan import COMPILE_LIMIT_S, build_plan, load_report

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
    assert not summary["failed_items"] and not summary["skipped"], (summary["failed_items"], summary["skipped"])
    for key in ("device", "torch", "triton", "commit", "ceilings"):
        assert summary[key], key
    assert summary["ceilings"]["copy_gb_per_s"] > 0

    pool = summary["precompile"]  # the dry run records (the first workload of each later stage), compiles nothing
    assert pool["workers"] >= 2 and pool["workloads_recorded"] == pool["workloads"] >= 3 and pool["specs"] > 0
    assert not pool["failed"] and pool["compiled"] == 0 and pool["killed_at_deadline"] == 0
    assert len({r["spec_id"] for r in pool["rows"]}) == pool["specs"]  # each claimed by one worker

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
    assert "CUDA graphs need a GPU" in timings[("attention fwd (CUDA graph replay)", "ours,")]["error"]
    for mode in ("fwd", "fwd_bwd"):  # a peer that cannot run says why
        assert timings[(f"attention {mode}", "xformers")]["error"]
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
        if r["status"] == "ok":
            assert r["timing"]["timer"] == "perf_counter" and r["timing"]["reps"] >= 1
    upstream = [r for r in rows if r["method"] == "upstream ps3"]
    assert len(upstream) == 2 and all(r["status"] == "ok" or r["error"] for r in upstream)
    if not (SUITE.parent.parent / ".whl" / "upstream").is_dir():  # CI: no wheels carried
        assert all(r["status"] == "skipped" and ".whl/upstream" in r["error"] for r in upstream)
    (launch,) = summary["launch_overhead"]
    assert launch["eager_ms"] > 0 and launch["status"] == "skipped"  # CUDA graphs need a GPU
    (train,) = summary["training"]  # the tiny pre-training step, this package's side
    assert train["status"] == "ok" and train["step_ms"] > 0 and train["peak_live_bytes"] > train["start_live_bytes"] > 0
    assert "record" not in train

    table = (tmp_path / "summary.md").read_text()
    assert "| stage | status |" in table and table.strip() in done.stdout
    assert (tmp_path / "suite.log").stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["suite.log", "summary.json", "summary.md"]


def test_a_stage_past_the_budget_is_cut_off_and_recorded(tmp_path):
    """8 s for the correctness stage alone: the worker's start takes about half of it, so the
    stage either stops starting checks (recording the rest as skipped) or is killed at its cap."""
    done, seconds = run_suite(tmp_path, "--stages", "op_checks", "--budget-s", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    assert seconds < 8 + 10  # the budget counts from after the parent's imports (torch and the stages)
    summary = json.loads((tmp_path / "summary.json").read_text())
    (stage,) = summary["suite"]["stages"]
    assert stage["name"] == "op_checks" and stage["cap_s"] == 8.0
    assert stage["status"] in ("ok", "timeout"), stage
    ran = [c for c in summary["correctness"] if c["status"] != "skipped"]
    skipped = [c for c in summary["correctness"] if c["status"] == "skipped"]
    assert stage["status"] == "timeout" or skipped, "a full op_checks stage does not fit in 8 s"
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
    assert all(a < b for a, b in zip(deadlines.values(), list(deadlines.values())[1:]))
    start = gpu_suite.WORKER_START_S
    first, second = gpu_suite.STAGE_NAMES[:2]
    assert deadlines[first] == pytest.approx(100 + start + (360 - start) * gpu_suite.SHARES[first])
    assert deadlines[second] - deadlines[first] == pytest.approx((360 - start) * gpu_suite.SHARES[second])
    assert deadlines[gpu_suite.STAGE_NAMES[-1]] == pytest.approx(460.0)  # the last stage ends with the budget
    share = gpu_suite.SHARES
    only = gpu_suite.schedule(0.0, 100.0, ("op_timings", "end_to_end"))
    assert only["end_to_end"] == pytest.approx(100.0)
    assert only["op_timings"] == pytest.approx(start + (100 - start) * share["op_timings"]
                                               / (share["op_timings"] + share["end_to_end"]))
    assert set(gpu_suite.schedule(0.0, 50.0, gpu_suite.STAGE_NAMES, dry_run=True).values()) == {50.0}


# ----------------------------------------------------------------------------- the plan


@pytest.fixture(scope="module")
def plan():
    return build_plan(360.0)


def test_plan_cli_writes_plan_json(tmp_path):
    done = subprocess.run([sys.executable, str(SUITE), "--plan", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=300)
    written = json.loads((tmp_path / "plan.json").read_text())
    assert done.returncode == (1 if written["problems"] else 0), done.stderr[-2000:]
    assert [s["name"] for s in written["stages"]] == list(gpu_suite.STAGE_NAMES)
    assert "| stage | cap s | estimated s |" in done.stdout
    for stage in written["stages"]:
        assert {"cap_s", "estimated_s", "items", "specs", "compile_serial_s"} <= set(stage)


def test_plan_keeps_every_stage_within_its_cap(plan):
    assert plan["shares"] <= 1.0
    for stage in plan["stages"]:
        assert 0 < stage["estimated_s"] <= stage["cap_s"], stage["name"]
    assert plan["estimated_s"] <= plan["budget_s"]


def test_plan_has_the_rows_the_suite_is_for(plan):
    """Parity, the no-sync forward, SDPA, FlexAttention, upstream and S2/AnyRes at both batches, and
    the pre-training step on both sides are planned: in the estimate, not optional extras."""
    planned = {(s["name"], i["name"]) for s in plan["stages"] for i in s["items"] if not i["optional"]}
    names = [f"{stage}: {item}" for stage, item in planned]

    def has(stage: str, *words: str) -> bool:
        return any(n.startswith(stage + ":") and all(w in n for w in words) for n in names)

    assert has("parity", "(triton)") and has("parity", "(torch)")
    assert has("no_sync", "no host sync")
    for b in GPU.time_batches:
        assert has("op_timings", f"attention fwd B={b}", "SDPA") and has("op_timings", f"fwd_bwd B={b}", "SDPA")
        assert has("peers", f"flex fwd B={b}")
    assert has("end_to_end", "upstream PS3")
    assert has("training", "train step ps3-4k 3780 px B=8") and has("training", "upstream train step ps3-4k")
    for b in GPU.e2e_batches:
        assert has("end_to_end", f"s2 B={b}") and has("end_to_end", f"anyres B={b}")
        assert has("end_to_end", f"ps3 1 looks B={b}")


def test_plan_specialisations_compile_offline_within_the_limit(plan):
    """Every workload of the plan is in the committed compile report (benchmarks/results/aot-sm90.json),
    and each of its specialisations compiled there in at most 15 s."""
    report = load_report()
    assert report is not None
    rows = {r["spec_id"]: r for r in report["rows"]}
    workloads = set(suite_stages.stage_workloads(GPU))
    missing = sorted(workloads - set(report["workloads"]))
    assert not missing, f"workloads missing from the compile report (rerun benchmarks/aot_report.py): {missing}"
    slow = []
    for name in sorted(workloads):
        for spec in report["workloads"][name]["specs"]:
            row = rows[spec]
            if not row["ok"] or row["timed_out"] or row["compile_s"] > COMPILE_LIMIT_S:
                slow.append(f"{row['kernel']} ({name}): {row['compile_s']} s, {row.get('error') or 'ok'}")
    assert not slow, "specialisations over the compile limit:\n" + "\n".join(sorted(set(slow)))
    assert not [p for p in plan["problems"] if "report" in p or "compiles in" in p]


def test_bad_arguments():
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--out", "x", "--stages", "warmup"])
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--out", "x", "--budget-s", "0"])


def test_a_peer_wheel_is_installed_only_for_the_torch_and_cuda_it_was_built_for(tmp_path, monkeypatch):
    """xformers 0.0.35's build record names torch 2.10.0+cu128: skipped, with the reason, on another
    torch or CUDA; chosen on a matching one; a wheel without a record is skipped too."""
    import zipfile

    import torch

    peers = tmp_path / "peers"
    peers.mkdir()
    with zipfile.ZipFile(peers / "xformers-0.0.35-py39-none-manylinux_2_28_x86_64.whl", "w") as zf:
        zf.writestr("xformers/cpp_lib.json", json.dumps({"version": {"cuda": 1208, "torch": "2.10.0+cu128"}}))
    with zipfile.ZipFile(peers / "other-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("other/__init__.py", "")
    monkeypatch.setattr(gpu_suite, "WHEELS", tmp_path)
    for here_torch, here_cuda, chosen in (("2.11.0+cu130", "13.0", False), ("2.10.1+cu126", "12.6", True),
                                          ("2.10.0+cu130", "13.0", False), ("2.10.0+cpu", None, False)):
        monkeypatch.setattr(torch, "__version__", here_torch)
        monkeypatch.setattr(torch.version, "cuda", here_cuda)
        wheels, record = gpu_suite.matching_peer_wheels()
        assert [w.name.split("-")[0] for w in wheels] == (["xformers"] if chosen else [])
        assert record["xformers"].startswith("installed" if chosen else "skipped"), record
        assert "no build record" in record["other"]
    assert "built for torch 2.10.0+cu128, CUDA 12.8; this machine has torch 2.10.0+cpu without CUDA" in record["xformers"]
