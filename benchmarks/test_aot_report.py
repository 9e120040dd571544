"""The offline sm_90 build (benchmarks/aot_report.py): the CI subset compiles without spills, and
the committed full report covers every kernel, dtype and launch variant. CI time: about 30 s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from launch_variants import VARIANTS

HERE = Path(__file__).resolve().parent
REPORT = HERE / "results" / "aot-sm90.json"
SELECTION = {"_cosine_map_kernel", "_probs_kernel", "_probs_bwd_kernel", "_prompt_grad_kernel", "_assign_kernel"}
KERNELS = {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_embed_kernel", "_gather_kernel", *SELECTION}


def test_ci_subset_compiles_for_sm90_without_spills(tmp_path):
    """bf16 attention forward and backward at head dim 72, the patch embed (both kernels) and the
    selection kernels at a 4x4 grid against a 54x54 high-res map (the largest pooling bins), built
    by Triton's compiler for sm_90a in a process without TRITON_INTERPRET (the root conftest sets
    it for this one); --fail-on-spill makes a compile error or a 16-bit spill fail the run."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    done = subprocess.run([sys.executable, str(HERE / "aot_report.py"), "--subset", "ci", "--fail-on-spill",
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["kernel"] for r in rows} == KERNELS
    for r in rows:
        assert r["ok"] and r["dtype"] == "bf16" and r["spills"] == 0 and 0 < r["registers"] <= 255, r
    attention = [r for r in rows if r["workload"] == "attention_look"]
    assert all(r["mma"] == "wgmma" and r["config"]["HEAD_DIM"] == 72 for r in attention)
    # A scoring tile that grew with the bin took minutes (and ~300 KB of spills) at this grid; now seconds.
    assert all(r["compile_s"] < 60 for r in rows if r["kernel"] in SELECTION)
    assert next(r for r in rows if r["kernel"] == "_embed_kernel")["mma"] in ("wgmma", "mma.sync")


def test_committed_report_covers_every_kernel_dtype_and_variant():
    report = json.loads(REPORT.read_text())
    rows = report["rows"]
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
    defaults = [r for r in rows if r["variant"] == "default"]
    assert {r["kernel"] for r in defaults} == KERNELS
    for kernel in KERNELS - {"_assign_kernel"}:  # the assignment kernel has no float operand
        assert {r["dtype"] for r in defaults if r["kernel"] == kernel} == {"bf16", "fp16", "fp32"}, kernel
    for op, variants in VARIANTS.items():
        for variant in variants[1:]:
            built = [r for r in rows if r["variant"] == variant.name]
            assert {r["dtype"] for r in built} == {"bf16", "fp16"}, (op, variant.name)
            assert all(r["spills"] == 0 for r in built), (op, variant.name)  # a spilling variant is no candidate
    for r in rows:
        assert {"kernel", "dtype", "config", "ok", "registers", "spills", "shared_mem", "mma"} <= set(r)
        assert r["mma"] in ("wgmma", "mma.sync", "fma")
        if r["dtype"] in ("bf16", "fp16") and r["kernel"] in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
            assert r["mma"] == "wgmma" and r["spills"] == 0, r
