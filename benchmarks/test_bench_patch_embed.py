"""pytest-benchmark smoke test of the sparse patch embed (PyTorch backend, tiny shapes; CI ~1 s).

Also checks the benchmark script's pieces on the CPU: its emulation of upstream's dense way
agrees with the library op, and its byte floor counts what it should.
"""

from __future__ import annotations

import torch

from bench_patch_embed import floor_bytes, make_case, sparse_embed, upstream_embed
from ps3_kernels import use_backend


def test_bench_sparse_patch_embed_torch(benchmark):
    case = make_case([28, 56, 112], batch=2, num_tokens=20, dtype=torch.float32, device="cpu", width=32)
    with use_backend("torch"):
        out = benchmark(sparse_embed, case)
    ref = upstream_embed(case)
    assert out.shape == (2 * 20, 32)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-5


def test_floor_bytes_identity_scale_counts_patch_pixels():
    """At the identity scale the footprint of a patch is the patch itself."""
    case = make_case([14, 28], batch=1, num_tokens=3, dtype=torch.float32, device="cpu", width=8)
    tokens = len(case["tokens"])
    rows = 2 * case["index"].unique().numel()
    expected = (tokens * 3 * 14 * 14 * 4 + 8 * 3 * 14 * 14 * 4 + 8 * 4 + rows * 8 * 4 + tokens * 6 * 8
                + tokens * 8 * 4)
    assert floor_bytes(case) == expected
