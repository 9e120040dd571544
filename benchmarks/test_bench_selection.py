"""pytest-benchmark smoke test of selection scoring + look assignment (PyTorch backend, tiny shapes).

Also checks the benchmark script's emulation of upstream's per-look loop against the library, and
its forward + backward of the scoring on the Triton backend (interpreted on the CPU).
"""

from __future__ import annotations

import torch

from bench_selection import assign, grad_errors, make_case, per_scale, score, score_backward, upstream_assign
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


def test_bench_selection_backward_triton():
    case = make_case([28, 56, 112], batch=2, looks=1, num_tokens=10, dtype=torch.float32, device="cpu",
                     channels=16, hr_channels=8, hr_grid=5, low_grid=3)
    grad = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0))
    with use_backend("triton"):
        grads = score_backward(case, grad)
    assert [g.shape for g in grads] == [case[k].shape for k in ("feature", "prompt", "hr_feature", "hr_prompt")]
    assert grad_errors(case, grad, grads) < 1e-6
