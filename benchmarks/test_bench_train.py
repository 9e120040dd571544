"""The training benchmark: the live-bytes tracker on hand-checkable allocations, and the tiny
preset through ``run_case`` (upstream's side too when ``PS3_UPSTREAM_PYTHON`` names its venv).
CI time: about 10 s on 2 idle cores (30 s more with upstream's side)."""

from __future__ import annotations

import json
import os

import pytest
import torch

import bench_train
from ps3.bench.harness import LiveBytes


def test_live_bytes_known_allocations():
    with LiveBytes() as live:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(2000, dtype=torch.float64)  # 16000
        del a
        c = torch.empty(500)  # 2000
        view = c.view(10, 50)[1:]  # a view: the same storage, counted once
        c.add_(1)  # in place: nothing new
        out = torch.empty(0)
        torch.add(b[:100], 1, out=out)  # an out= op growing an empty float32 tensor: 0 -> 400 bytes
    assert live.peak == 20000 and live.current == 16000 + 2000 + 400
    del b, c, view, out
    assert live.current == 0  # frees are counted after the span too


def test_live_bytes_counts_saved_tensors_tracked_roots_read_tensors_and_backward():
    x = torch.randn(1000, requires_grad=True)  # 4000 bytes, alive before: tracked
    read = torch.randn(10_000)  # 40000, alive before: counted once an op reads it
    unused = torch.randn(10_000)  # alive before, never touched: not counted
    live = LiveBytes().track([x])
    with live:
        y = x.exp()  # saved for backward
        z = read[:5000] * 0  # reads `read` (40000) and makes 20000
        del z
        y.sum().backward()  # x.grad: another 4000
    assert live.current == 4000 + 4000 + 40000 + 4000  # x, y, read and x.grad; the loss scalar is gone
    assert live.peak == 4000 + 4000 + 40000 + 20000  # x, y, read and z at once: the largest moment
    del read, unused
    live.reset_peak()
    with live:
        w = torch.empty(10)
    assert live.peak == live.current == 12000 + 40  # x, y, x.grad and w
    del w


def test_live_bytes_labels_where_the_peak_bytes_come_from():
    with LiveBytes(where=True) as live:
        big = torch.zeros(5000)
        small = torch.ones(10)
        del big
    labels = dict(live.at_peak())
    assert sorted(labels.values()) == [40, 20000]
    assert all(k.startswith(("zeros<test_bench_train.py", "ones<test_bench_train.py")) for k in labels), labels
    del small


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compares with the CUDA allocator")
def test_live_bytes_equals_cuda_max_memory_allocated():
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with LiveBytes() as live:  # sizes in multiples of 512 bytes: the allocator's rounding adds nothing
        a = torch.empty(2**20, device="cuda")
        b = a * 2
        del a
        c = torch.empty(3 * 2**18, device="cuda")
    torch.cuda.synchronize()
    assert live.peak == torch.cuda.max_memory_allocated() - base
    del b, c


def test_implied_max_batch_is_a_line_through_the_two_largest_batches():
    rows = [dict(side="s", model="m", resolution=1, dtype="d", status="ok", batch=b, peak_live_bytes=10 + 3 * b)
            for b in (1, 2, 4)]
    assert bench_train.implied_max_batch(rows, budget=100) == {("s", "m", 1, "d"): 30}


def test_implied_max_batch_follows_the_phase_that_grows():
    """The update peaks at batch 1 but hardly grows; the forward grows 3 a sample and limits the batch."""
    def row(batch, forward, optimizer):
        return dict(side="s", model="m", resolution=1, dtype="d", status="ok", batch=batch,
                    peak_live_bytes=max(forward, optimizer),
                    record=dict(phase_peak_bytes=dict(forward=forward, optimizer=optimizer)))

    rows = [row(1, 5, 10), row(2, 8, 10.5)]
    assert bench_train.implied_max_batch(rows, budget=100) == {("s", "m", 1, "d"): 32}
    assert bench_train.implied_max_batch([row(1, 5, 120), row(2, 8, 120)], budget=100) == {("s", "m", 1, "d"): 0}


def test_tiny_case_runs_both_sides_and_agrees(tmp_path):
    upstream = os.environ.get("PS3_UPSTREAM_PYTHON")
    case = bench_train.PRESETS["tiny"].cases[1]  # batch 2: one local and one global caption
    rows = bench_train.run_case(case, steps=2, upstream_python=upstream)
    assert len(rows) == (2 if upstream else 1)
    for row in rows:
        assert row["status"] == "ok", row["error"]
        record = row["record"]
        # two timed steps, then the tracked one
        assert len(record["losses"]) == 3 and all(set(s) == set(bench_train.LOSS_TERMS) for s in record["losses"])
        assert record["losses"][1] != record["losses"][0]  # the optimizer stepped
        assert set(record["phase_peak_bytes"]) == {"zero_grad", "forward", "backward", "optimizer"}
        assert row["peak_live_bytes"] >= row["fwd_bwd_peak_live_bytes"] > row["start_live_bytes"] > 0
        assert row["step_ms"] > 0 and row["step_cpu_ms"] > 0
        # the step's start holds the parameters, their gradients and AdamW's two moments (and the inputs)
        params = sum(p.numel() * 4 for p in bench_train.build_model(*bench_train.configs("tiny", 1)).parameters())
        assert 4 * params <= row["start_live_bytes"] <= 4 * params + 2**22
    if upstream:
        assert rows[1]["loss_max_rel_diff"] < 1e-5
        assert rows[1]["start_live_bytes"] == rows[0]["start_live_bytes"]  # same parameters, same state
    table = bench_train.markdown(rows)
    assert "| tiny | 224 | 2 | float32 |" in table


def test_main_writes_json(tmp_path, monkeypatch):
    monkeypatch.delenv("PS3_UPSTREAM_PYTHON", raising=False)
    out = tmp_path / "r.json"
    assert bench_train.main(["--preset", "tiny", "--only", "0", "--steps", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["preset"] == "tiny" and [r["side"] for r in data["results"]] == ["ps3-kernels"]
