"""pytest-benchmark smoke test of selection scoring + look assignment (PyTorch backend, tiny shapes).

Also checks the benchmark script's emulation of upstream's per-look loop against the library.
"""

from __future__ import annotations

import torch

from bench_selection import assign, make_case, per_scale, score, upstream_assign
from ps3_kernels import use_backend


def test_bench_selection_torch(benchmark):
    case = make_case([28, 56, 112], batch=2, looks=3, num_tokens=10, dtype=torch.float32, device="cpu",
                     channels=16, hr_channels=8, hr_grid=4, low_grid=2)

    def run():
        return assign(per_scale(score(case), case["grids"]), case)

    with use_backend("torch"):
        looks = benchmark(run)
        scaled = per_scale(score(case), case["grids"])
    want = upstream_assign(scaled, case, stable=True)
    assert all(torch.equal(g, w) for g, w in zip(looks, want))
    assert [int((g >= 0).sum()) for g in looks] == [2 * 3 * q for q in (2, 8)]
