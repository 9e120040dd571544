"""Stage ``launch_overhead``: the whole vision forward (PS3-4K, B = 1, one look) captured in a CUDA
graph and replayed, against the same forward made eagerly (the shared timer on both); a capture
that fails (a host sync, a pageable copy, an allocation the graph cannot own) is recorded with its
reason, and a replay must reproduce the eager output."""

from __future__ import annotations

import traceback
from typing import Any

import torch

from ps3.bench.harness import error_text

from . import workloads
from .base import Shapes, Stage, StageContext, WorkItem, calls_s, rel, seed
from .end_to_end import built_model


def eager_against_graph(ctx: StageContext) -> None:
    sh = ctx.shapes
    device = "cuda" if ctx.cuda else "cpu"
    model = built_model(sh.e2e_preset, sh.e2e_resolution, device)
    R = sh.e2e_resolution
    x = torch.randn(1, 3, R, R, generator=torch.Generator().manual_seed(seed())).to(device, model.dtype)
    entry: dict[str, Any] = dict(name=f"ps3 1 look, B=1, {R} px", eager_ms=None, graph_ms=None, ratio=None)

    def forward():
        return model(x, num_look_close=1).last_hidden_state

    with torch.inference_mode():
        entry["eager_ms"] = ctx.bench(forward).ms
        if not ctx.cuda:
            entry.update(status="skipped", error="CUDA graphs need a GPU (dry run)")
            ctx.add("launch_overhead", entry)
            return
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    eager = forward()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                static_out = forward()
            graph.replay()
            torch.cuda.synchronize()
            diff = rel(static_out, eager)
            entry["graph_ms"] = ctx.bench(graph.replay).ms
            entry.update(ratio=entry["eager_ms"] / entry["graph_ms"], replay_rel_err_vs_eager=diff,
                         status="ok" if diff <= 1e-2 else "wrong", error=None if diff <= 1e-2 else
                         f"replayed output off the eager one (rel err {diff:.2e})")
        except Exception as exc:  # noqa: BLE001 - a failed capture is the finding
            entry.update(status="capture_failed", error=error_text(exc))
            ctx.log(traceback.format_exc())
    ctx.add("launch_overhead", entry)


def items(sh: Shapes) -> list[WorkItem]:
    # The model is usually the end-to-end stage's (built in ~8 s otherwise); ~10 ms per call.
    return [WorkItem("eager against CUDA graph replay", calls_s(10.0, 3 * sum(sh.op_timer), 2.0) if sh.gpu else 0.0,
                     eager_against_graph, (workloads.encoder(sh, "ps3-1", 1),))]


STAGE = Stage("launch_overhead", 0.01, __doc__.split("\n\n")[0], items)
