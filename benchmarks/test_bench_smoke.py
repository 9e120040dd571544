"""ps3-bench end to end on a tiny subset of the cpu-smoke preset, plus its failure handling."""

from __future__ import annotations

import json
import os

import pytest
import torch

from ps3 import bench

REQUIRED = {"method", "resolution", "batch", "tokens", "flops", "latency_ms", "peak_mem_mb", "status",
            "device", "torch", "triton", "git_commit"}
STATUSES = {"ok", "OOM", "failed", "skipped", "counted"}


def test_cpu_smoke_subset_writes_json_table_and_plot(tmp_path, capsys):
    methods = "ps3-1,anyres,s2,llava-uhd,upstream-ps3-1"
    assert bench.main(["--preset", "cpu-smoke", "--max-resolution", "756", "--methods", methods,
                       "--warmup", "0", "--reps", "1", "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "results.json").read_text())
    assert isinstance(records, list) and len(records) == 2 * 5
    for r in records:
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["status"] in STATUSES
    by = {(r["method"], r["resolution"]): r for r in records}
    assert by[("ps3-1", 378)]["status"] == "skipped"
    assert by[("upstream-ps3-1", 756)]["status"] == "skipped" and "--upstream-python" in by[("upstream-ps3-1", 756)]["error"]
    for method in ("ps3-1", "anyres", "s2", "llava-uhd"):
        r = by[(method, 756)]
        assert r["status"] == "ok", r["error"]
        assert r["latency_ms"] > 0 and r["peak_mem_mb"] is not None and r["flops"] > 0
        assert r["attn_flops_counted"] == r["attn_flops"]  # one sequence length: counter == analytic
    assert by[("ps3-1", 756)]["tokens"] == by[("ps3-1", 756)]["out_tokens"] == 729 + 1280
    assert by[("anyres", 756)]["tokens"] == 5 * 729 and by[("s2", 756)]["tokens"] == 5 * 729
    table = (tmp_path / "results.md").read_text()
    assert "| method | resolution |" in table and table in capsys.readouterr().out
    assert (tmp_path / "cost_vs_resolution.png").stat().st_size > 1000


def test_so400m_counts_at_4k_on_meta(tmp_path):
    """Hardware-free counts with SO400M shapes: 3780 -> 729+2560 / 101 crops / 121 crops."""
    bench.main(["--preset", "gpu-4k", "--count-only", "--resolutions", "3780", "--batches", "1",
                "--methods", "ps3-1,anyres,s2", "--out", str(tmp_path)])
    by = {r["method"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert all(r["status"] == "counted" for r in by.values())
    assert (by["ps3-1"]["tokens"], by["anyres"]["tokens"], by["s2"]["tokens"]) == (3289, 101 * 729, 121 * 729)
    assert by["s2"]["flops"] * 101 == by["anyres"]["flops"] * 121  # both are 729-token crops of one trunk
    assert by["ps3-1"]["flops"] < by["anyres"]["flops"] / 10


def test_a_failing_method_is_recorded_not_raised(monkeypatch):
    config = bench.model_config(bench.PRESETS["cpu-smoke"], 756)
    model = bench.build_model(config, "meta", torch.float32)

    def broken(method, model, resolution):
        def fn(x):
            raise RuntimeError("boom")
        return fn

    monkeypatch.setattr(bench, "method_fn", broken)
    rec = bench.run_method({"resolution": 756, "batch": 1}, "anyres", None, model, None, 0, 1)
    assert rec["status"] == "failed" and "boom" in rec["error"]


def test_bad_cli_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--methods", "ps3-3"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--resolutions", "1000"])
    with pytest.raises(ValueError, match="multiple"):
        bench.scale_set(500)
    assert bench.scale_set(3780) == [378, 756, 1512, 3780]
    assert bench.scale_set(756) == [378, 756]


@pytest.mark.skipif(not os.environ.get("PS3_UPSTREAM_PYTHON"), reason="set PS3_UPSTREAM_PYTHON to a venv with ps3-torch and timm")
def test_upstream_worker_matches_our_counts(tmp_path):
    bench.main(["--preset", "cpu-smoke", "--resolutions", "756", "--methods", "ps3-1,upstream-ps3-1", "--warmup", "0",
                "--reps", "1", "--upstream-python", os.environ["PS3_UPSTREAM_PYTHON"], "--out", str(tmp_path)])
    ours, upstream = json.loads((tmp_path / "results.json").read_text())
    assert upstream["status"] == "ok", upstream["error"]
    assert upstream["tokens"] == ours["tokens"]
    assert abs(upstream["flops"] / ours["flops"] - 1) < 0.05
