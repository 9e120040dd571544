"""The offline sm_90 build (benchmarks/aot_report.py) and the specialisations it counts: the CI subset
compiles without spills; the committed report covers every kernel, dtype and launch variant with
a compile time on every row, and still matches what the code launches; the attention and patch
embed kernels compile one binary per dtype and head dim, whatever the batch. CI time: about 40 s."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bench_patch_embed
import bench_varlen_attention
from launch_variants import VARIANTS
from ps3_kernels import use_backend, varlen_prefix_attention
from triton_launches import recorded_launches

HERE = Path(__file__).resolve().parent
REPORT = HERE / "results" / "aot-sm90.json"
KERNELS = {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_embed_kernel", "_gather_kernel"}
SELECTION = {"_cosine_map_kernel", "_probs_kernel", "_probs_bwd_kernel", "_prompt_grad_kernel", "_assign_kernel"}
ROW_FIELDS = {"spec_id", "kernel", "dtype", "key", "signature", "workloads", "config", "ok", "timed_out", "compile_s",
              "wall_s"}


def run_report(*args: str) -> subprocess.CompletedProcess:
    """aot_report.py in a process without TRITON_INTERPRET (the root conftest sets it for this one)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(HERE / "aot_report.py"), *args], env=env, capture_output=True,
                          text=True, timeout=900)


def test_ci_subset_compiles_for_sm90_without_spills(tmp_path):
    """bf16 attention forward and backward at head dim 72, the patch embed (both kernels) and the
    selection kernels at a 4x4 grid against a 54x54 high-res map (the largest pooling bins), built
    by Triton's compiler for sm_90a; --fail-on-spill makes a compile error or a 16-bit spill fail the run."""
    pytest.importorskip("triton")
    out = tmp_path / "aot.json"
    done = run_report("--subset", "ci", "--fail-on-spill", "--out", str(out))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert {r["kernel"] for r in rows} == KERNELS | SELECTION
    for r in rows:
        assert ROW_FIELDS <= set(r) and r["ok"] and not r["timed_out"], r
        assert r["spills"] == 0 and 0 < r["registers"] <= 255, r
        assert r["dtype"] == "bf16" or r["kernel"] in SELECTION, r  # scoring maps and sums are fp32, looks int64
        # A scoring tile that grew with the bin took minutes (and ~300 KB of spills) at this grid.
        assert 0 < r["compile_s"] < 60 and r["workloads"]
    attention = [r for r in rows if r["kernel"] in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")]
    assert all(r["mma"] == "wgmma" and r["config"]["HEAD_DIM"] == 72 for r in attention)
    assert next(r for r in rows if r["kernel"] == "_embed_kernel")["mma"] in ("wgmma", "mma.sync")
    assert set(report["workloads"]) == {r["workloads"][0] for r in rows}


def test_committed_report_covers_every_kernel_dtype_and_variant():
    report = json.loads(REPORT.read_text())
    rows = report["rows"]
    for r in rows:
        assert ROW_FIELDS <= set(r), r["kernel"]
        assert r["compile_s"] is not None and r["compile_s"] > 0, r["kernel"]
    built = [r for r in rows if r["ok"]]
    assert KERNELS | SELECTION <= {r["kernel"] for r in built}
    for kernel in KERNELS | SELECTION - {"_assign_kernel"}:  # the assignment has no float operand
        assert {r["dtype"] for r in built if r["kernel"] == kernel} >= {"bf16", "fp16", "fp32"}, kernel
    for op, variants in VARIANTS.items():
        for variant in variants[1:]:
            compiled = [r for r in built if variant.name in {w.rsplit("[", 1)[-1].rstrip("]") for w in r["workloads"]}]
            # a spilling variant is no candidate
            assert compiled and all(r["spills"] == 0 for r in compiled), (op, variant.name)
    for r in built:
        assert r["mma"] in ("wgmma", "mma.sync", "fma")
        if r["dtype"] in ("bf16", "fp16") and r["kernel"] in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
            assert r["mma"] == "wgmma" and r["spills"] == 0, r
    ids = {r["spec_id"] for r in rows}
    for name, info in report["workloads"].items():
        assert set(info["specs"]) <= ids, name


def test_committed_report_matches_what_the_code_launches():
    """Cheap workloads recorded again (no compile): their specialisations must be the committed report's,
    so a kernel change that adds or changes one cannot pass with a stale report."""
    pytest.importorskip("triton")
    done = run_report("--check", str(REPORT))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


# ----------------------------------------------------------------------------- specialisations and the batch


OURS = ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_embed_kernel", "_gather_kernel")


def _keys(fn) -> set[str]:
    with recorded_launches() as launches:
        fn()
    return {launch.key for launch in launches if launch.kernel in OURS}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_specialisations_do_not_depend_on_the_batch(dtype):
    """One look of 2560 over its image's 729-token prefix, and three looks of odd lengths over two
    prefix rows: the same binaries (before, a single prefix row, a token count divisible by 16 or
    not, a stride of 1 each made another). SO400M's 16 heads x 72."""
    def run(lengths, rows):
        case = bench_varlen_attention.make_case(lengths, rows, dtype, "cpu", heads=16, head_dim=72, prefix_len=729)
        names = ("q", "k", "v", "prefix_k", "prefix_v")
        for n in names:
            case[n].requires_grad_()
        out = varlen_prefix_attention(**case, impl="triton")
        out.backward(torch.ones_like(out))
        low = {**case, "prefix_k": None, "prefix_v": None, "prefix_index": None}
        varlen_prefix_attention(**low, impl="triton").sum().backward()

    one, many = _keys(lambda: run([2560], [0])), _keys(lambda: run([2560, 37, 1999], [0, 1, 1]))
    assert one == many
    assert {k.split("(")[0] for k in one} == {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}
    assert len(one) == 5  # forward and dQ with and without a prefix, dK/dV


def test_patch_embed_specialisations_do_not_depend_on_the_batch():
    def run(batch, tokens):
        case = bench_patch_embed.make_case([378, 756, 1512], batch, tokens, torch.bfloat16, "cpu", width=1152)
        case["weight"].requires_grad_()
        with use_backend("triton"):
            bench_patch_embed.sparse_embed(case).sum().backward()

    one, many = _keys(lambda: run(1, 1280)), _keys(lambda: run(3, 37))
    assert one == many and len(one) == 2  # the embed and the gather of the weight gradient


def test_model_specialisations_do_not_depend_on_images_or_looks():
    """The tests' tiny model on one image with one look and on three images of different sizes with
    two looks, forward and backward: the same attention and patch embed binaries."""
    from helpers import tiny_vision_config
    from ps3 import PS3VisionModel

    model = PS3VisionModel(tiny_vision_config())

    def run(images, looks):
        with use_backend("triton"):
            out = model(images, num_look_close=looks).last_hidden_state
            sum(o.sum() for o in (out if isinstance(out, list) else [out])).backward()

    one = _keys(lambda: run([torch.randn(3, 224, 224)], 1))
    many = _keys(lambda: run([torch.randn(3, 224, 180), torch.randn(3, 150, 224), torch.randn(3, 224, 224)], 2))
    assert one == many and len(one) == 7
