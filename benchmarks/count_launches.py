"""Kernel launches of one PS3 vision forward, counted on the CPU (no GPU needed).

Counts depend on the geometry (scales, patch, token budget, depth, images, looks), not on the
width or the values, so the model here has PS3-4K's geometry (378/756/1512/3780, patch 14, 2560
tokens per look, 27 layers, selection on layers 0/9/18/26, high-res selection ConvNet) with a
16-wide trunk. :func:`ps3_kernels.counting.count_launches` records, with a ``TorchDispatchMode``,
every ATen op that launches a kernel (views and allocations apart; the ops inside this package's
custom ops included) and every Triton launch; the attention, patch-embed and scoring kernels are
counted without being run (the interpreter would take hours at these sizes). The ops' CPU-only
index validation is switched off, as it is for GPU tensors, so the counts are a GPU forward's.

    python benchmarks/count_launches.py --out benchmarks/results/launch-counts-4k.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import ps3_kernels.backend  # noqa: E402
from ps3 import PS3VisionConfig, PS3VisionModel  # noqa: E402
from ps3.bench.harness import environment  # noqa: E402
from ps3.demo import randomize_parameters_  # noqa: E402
from ps3_kernels import use_backend  # noqa: E402
from ps3_kernels.counting import count_launches  # noqa: E402

DRY = ("_fwd_kernel", "_embed_kernel", "_cosine_map_kernel", "_probs_kernel")


def ps3_4k_geometry(width: int = 16) -> PS3VisionConfig:
    return PS3VisionConfig(
        model_name="ps3_4k_geometry", hidden_size=width, depth=27, num_heads=1, mlp_ratio=1.0, patch_size=14,
        ps3_scales=[378, 756, 1512, 3780], select_based_on_layer=[0, 9, 18, 26], max_select_num=2560,
        highres_selection_module_hidden_dim=8, highres_selection_module_out_dim=8, highres_selection_module_depth=1,
    )


def count(model, backend: str, batch: int, looks: int, side: int) -> dict:
    x = torch.randn(batch, 3, side, side)
    with torch.no_grad(), use_backend(backend):
        for _ in range(2):  # the first call builds the per-layout device tables
            with count_launches(dry=DRY) as counts:
                out = model(x, num_look_close=looks)
    return dict(backend=backend, batch=batch, looks=looks, tokens=out.last_hidden_state.shape[1],
                **counts.summary(), triton_by_kernel=dict(counts.triton), custom_by_op=dict(counts.custom),
                aten_by_op=dict(counts.aten.most_common()),
                host_copies=counts.views["lift_fresh"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", nargs="+", default=["triton", "torch"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--looks", nargs="+", type=int, default=[1, 6])
    parser.add_argument("--side", type=int, default=3780, help="input image side in pixels")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    ps3_kernels.backend.host_readable = lambda t: False
    model = randomize_parameters_(PS3VisionModel(ps3_4k_geometry()), seed=0).eval()
    rows = []
    print(f"{'backend':8} {'B':>2} {'looks':>5} {'tokens':>7} {'launches':>8} {'aten':>5} {'triton':>6} "
          f"{'custom ops':>10} {'host copies':>11}")
    for backend in args.backends:
        for batch in args.batches:
            for looks in args.looks:
                r = count(model, backend, batch, looks, args.side)
                rows.append(r)
                print(f"{backend:8} {batch:>2} {looks:>5} {r['tokens']:>7} {r['launches']:>8} {r['aten']:>5} "
                      f"{r['triton']:>6} {r['custom_ops']:>10} {r['host_copies']:>11}", flush=True)
    if args.out:
        args.out.write_text(json.dumps(dict(environment=environment("cpu"), config=ps3_4k_geometry().to_dict(),
                                             counts=rows), indent=1, default=str))


if __name__ == "__main__":
    main()
