"""pytest-benchmark smoke test of the varlen prefix attention (PyTorch backend, tiny shapes; CI ~1 s).

Also runs the benchmark script's check-and-time loop on the CPU with a stub timer, so its
bookkeeping (records, FLOPs, speed ratios) is exercised without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import bench_varlen_attention as bench
from ps3_kernels import use_backend, varlen_prefix_attention
from ps3_kernels.backend import triton_available

TINY = dict(heads=2, head_dim=24, prefix_len=5)


def test_bench_varlen_prefix_attention_torch(benchmark):
    case = bench.make_case([7, 0, 12], [1, 0, 1], torch.float32, "cpu", **TINY)
    with use_backend("torch"):
        out = benchmark(varlen_prefix_attention, **case)
    assert out.shape == (19, 2, 24) and torch.isfinite(out).all()


def test_cases_and_flops():
    names = {name: lengths for name, lengths, _ in bench.cases([1, 16])}
    assert sum(names["4k_all"]) == bench.ALL_4K_TOKENS and max(names["4k_all"]) == bench.LOOK
    case = bench.make_case([3, 4], [0, 0], torch.float32, "cpu", **TINY)
    assert bench.forward_flops(case) == 4 * (3 * 8 + 4 * 9) * 24 * 2


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_bench_case_bookkeeping(monkeypatch):
    monkeypatch.setattr(bench, "timed", lambda fn, leaves=None: (fn(), 2.0)[1])
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the kernel compiled on a GPU, interpreted on the CPU
    records = bench.bench_case("batch1", [9], [0], ["triton", "sdpa"], torch.float32, device=device, **TINY)
    assert {(r["impl"], r["mode"]) for r in records} == {(i, m) for i in ("triton", "sdpa") for m in ("fwd", "fwd_bwd")}
    assert all(r["error"] is None and r["triton_speedup"] == 1.0 and r["rel_err"] < 1e-5 for r in records)
