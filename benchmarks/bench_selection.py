"""Benchmark selection scoring and look assignment against upstream PS3's way (CUDA only).

Upstream scores with a chain of PyTorch ops (the library's reference, timed as is) and then, for
every look, loops in Python over images and scales: already-selected patches get p = -1 and a
``topk`` takes the look's quota. The library scores in two Triton launches for the whole batch
(high-res cosine map, then the scoring) and assigns every look of a scale with one stable sort
plus one Triton launch, without host syncs (so the assignment is also timed inside a CUDA graph).
The scoring's forward + backward (gradients of all four inputs, as a selection head's training
step needs them: two Triton launches against the reference's autograd) is timed too, and its
gradients compared with float64.

Shapes follow PS3-4K / 1.5K: 1152-channel 27x27 features, a 512-channel 54x54 high-res map, the
first high-res scale's map nearest-upsampled to every scale (ties), default quotas per look.

    python benchmarks/bench_selection.py --out selection.json
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from ps3.bench import scale_set
from ps3.bench.harness import bench, op_parser, require_cuda, write_results
from ps3.selection_plan import default_quotas
from ps3_kernels import use_backend
from ps3_kernels.selection import assign_looks, selection_probs

PATCH = 14
LOW_GRID = 27


def make_case(scales: list[int], batch: int, looks: int, num_tokens: int, dtype: torch.dtype, device: str,
              channels: int = 1152, hr_channels: int = 512, hr_grid: int = 54, low_grid: int = LOW_GRID,
              seed: int = 0) -> dict[str, Any]:
    """Scoring inputs (feature in the model's channels-last layout) and per-look quotas that fit."""
    gen = torch.Generator().manual_seed(seed)
    feature = torch.randn(batch, low_grid, low_grid, channels, generator=gen).permute(0, 3, 1, 2)
    quotas = default_quotas(num_tokens, scales)
    grids = [s // PATCH for s in scales[1:]]
    if any(q * looks > g * g for q, g in zip(quotas, grids)):
        raise ValueError(f"{looks} looks of {quotas} do not fit grids {grids}")
    return dict(
        feature=feature.to(device=device, dtype=dtype),
        prompt=torch.randn(batch, channels, generator=gen).to(device=device, dtype=dtype),
        hr_feature=torch.randn(batch, hr_channels, hr_grid, hr_grid, generator=gen).to(device=device, dtype=dtype),
        hr_prompt=torch.randn(batch, hr_channels, generator=gen).to(device=device, dtype=dtype),
        grids=grids,
        quotas=[torch.tensor([[q] * looks] * batch, device=device) for q in quotas],  # per scale, (B, L)
        host_quotas=[[[q] * looks] * batch for q in quotas],  # upstream keeps quotas as Python ints
    )


def per_scale(probs: torch.Tensor, grids: list[int]) -> list[torch.Tensor]:
    """The low-res map nearest-upsampled to each scale's grid, flattened: ``(B, g*g)`` per scale."""
    return [F.interpolate(probs[:, None].float(), size=(g, g), mode="nearest")[:, 0].flatten(1).to(probs.dtype)
            for g in grids]


def score(case: dict[str, Any]) -> torch.Tensor:
    return selection_probs(case["feature"], case["prompt"], case["hr_feature"], case["hr_prompt"])


INPUTS = ("feature", "prompt", "hr_feature", "hr_prompt")


def score_backward(case: dict[str, Any], grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Forward and backward of the scoring: the gradients of the four inputs for output gradient ``grad``."""
    leaves = {k: case[k].detach().requires_grad_() for k in INPUTS}
    probs = score({**case, **leaves})
    return torch.autograd.grad(probs, list(leaves.values()), grad)


def grad_errors(case: dict[str, Any], grad: torch.Tensor, grads: tuple[torch.Tensor, ...]) -> float:
    """Largest relative (Frobenius) error of ``grads`` against the reference's backward in float64."""
    with use_backend("torch"):
        ref = score_backward({**case, **{k: case[k].double() for k in INPUTS}}, grad.double())
    return max(((g.double() - r).norm() / r.norm()).item() for g, r in zip(grads, ref))


def kernel_argmax(case: dict[str, Any]) -> torch.Tensor:
    """Each bin's maximum cell as the Triton op chose it, ``(B, h, w)`` flat indices into the high-res map."""
    return torch.ops.ps3_kernels.selection_probs(*(case[k] for k in INPUTS))[2]


def routed_backward(case: dict[str, Any], grad: torch.Tensor, argmax: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], float]:
    """The reference's math (``selection_probs_reference``) and backward in float64, with each
    bin's maximum read at ``argmax`` instead of recomputed: in 16-bit dtypes rounding can change
    which cell of a bin is the largest (cosines one unit in the last place apart), and the
    gradient follows the choice. Returns the gradients of the four inputs and how far the chosen
    cells fall below their bins' float64 maxima (a few units in the last place of the dtype at most)."""
    leaves = [case[k].detach().double().requires_grad_() for k in INPUTS]
    feature, prompt, hr_feature, hr_prompt = leaves
    logits = (F.normalize(feature, dim=1) * F.normalize(prompt, dim=-1)[:, :, None, None]).sum(dim=1)
    hr = (F.normalize(hr_feature, dim=1) * F.normalize(hr_prompt, dim=-1)[:, :, None, None]).sum(dim=1)
    chosen = hr.flatten(1).gather(1, argmax.flatten(1).long()).view_as(logits)
    gap = (F.adaptive_max_pool2d(hr, logits.shape[-2:]) - chosen).max().item()
    logits = ((logits + chosen) / 2 * 5.0).clamp(-10, 10)
    probs = F.softmax(F.pad(logits[..., None], (0, 1)), dim=-1)[..., 0]
    return torch.autograd.grad(probs, leaves, grad.double()), gap


def assign(probs: list[torch.Tensor], case: dict[str, Any]) -> list[torch.Tensor]:
    """The library's assignment: one call per scale for all images and looks."""
    return [assign_looks(p, q) for p, q in zip(probs, case["quotas"])]


def upstream_assign(probs: list[torch.Tensor], case: dict[str, Any], stable: bool = False) -> list[torch.Tensor]:
    """Upstream's loop: per look, image and scale, mask earlier picks with -1 and take the top-k.

    ``stable=True`` replaces ``topk`` by a stable descending sort (the library's tie rule) for the
    correctness check; the timed run uses ``topk`` as upstream does.
    """
    looks = [torch.full(p.shape, -1, dtype=torch.long, device=p.device) for p in probs]
    taken = [torch.zeros(p.shape, dtype=torch.bool, device=p.device) for p in probs]
    num_looks = len(case["host_quotas"][0][0])
    for look in range(num_looks):
        for b in range(probs[0].shape[0]):
            for s, p in enumerate(probs):
                k = case["host_quotas"][s][b][look]
                masked = torch.where(taken[s][b], -1.0, p[b].float())
                if stable:
                    top = torch.sort(masked, descending=True, stable=True).indices[:k]
                else:
                    top = masked.topk(k).indices
                taken[s][b, top] = True
                looks[s][b, top] = look
    return looks


def backward_timings(case: dict[str, Any]) -> dict[str, Any]:
    """Forward + backward of the scoring on both backends: times, and gradient errors against float64
    (the Triton path's must stay within twice the reference's own, or 1e-5)."""
    grad = torch.randn(case["feature"].shape[:1] + case["feature"].shape[2:], device="cuda",
                       dtype=case["feature"].dtype)
    out = {}
    for name in ("reference", "triton"):
        with use_backend("torch" if name == "reference" else "triton"):
            out[f"score_fwd_bwd_{name}_ms"] = bench(lambda: score_backward(case, grad)).ms
            out[f"{name}_grad_rel_err_vs_float64"] = grad_errors(case, grad, score_backward(case, grad))
    out["score_fwd_bwd_speedup"] = out["score_fwd_bwd_reference_ms"] / out["score_fwd_bwd_triton_ms"]
    out["grad_ok"] = out["triton_grad_rel_err_vs_float64"] <= max(2 * out["reference_grad_rel_err_vs_float64"], 1e-5)
    return out


def _graph_ms(fn: Callable[[], Any]) -> float | None:
    """Median time of ``fn`` replayed from a CUDA graph (None if it cannot be captured)."""
    try:
        return bench(fn, graph=True).ms
    except RuntimeError as e:
        print(f"  (CUDA graph capture failed: {e})")
        return None


def main() -> None:
    parser = op_parser(__doc__, batches=[1, 4, 16], resolutions=[1512, 3780], dtype="float32")
    parser.add_argument("--tokens", type=int, default=2560, help="selected tokens per look and image")
    parser.add_argument("--looks", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    require_cuda("bench_selection.py")
    dtype = getattr(torch, args.dtype)
    rows = []
    backward: dict[int, dict[str, Any]] = {}
    for resolution in args.resolutions:
        for looks in args.looks:
            for batch in args.batches:
                case = make_case(scale_set(resolution), batch, looks, args.tokens, dtype, "cuda")
                with use_backend("torch"):
                    ref_probs = score(case)
                with use_backend("triton"):
                    probs = score(case)
                    prob_err = (probs.float() - ref_probs.float()).abs().max().item()
                    scaled = per_scale(probs, case["grids"])
                    got = assign(scaled, case)
                    want = upstream_assign(scaled, case, stable=True)
                    assign_equal = all(torch.equal(g, w) for g, w in zip(got, want))
                    t_score = bench(lambda: score(case)).ms
                    t_assign = bench(lambda: assign(scaled, case)).ms
                    t_assign_graph = _graph_ms(lambda: assign(scaled, case))
                with use_backend("torch"):
                    t_score_ref = bench(lambda: score(case)).ms
                if batch not in backward:  # the scoring's shapes depend on the batch only
                    backward[batch] = backward_timings(case)
                t_loop = bench(lambda: upstream_assign(scaled, case)).ms
                row = dict(
                    resolution=resolution, scales=scale_set(resolution), batch=batch, looks=looks,
                    quotas_per_look=[int(q[0, 0]) for q in case["quotas"]], max_abs_prob_err=prob_err,
                    ok=prob_err <= 2 * torch.finfo(dtype).eps and assign_equal and backward[batch]["grad_ok"],
                    assign_equal=assign_equal,
                    score_reference_ms=t_score_ref, score_triton_ms=t_score, score_speedup=t_score_ref / t_score,
                    **backward[batch],
                    assign_upstream_loop_ms=t_loop, assign_triton_ms=t_assign, assign_triton_graph_ms=t_assign_graph,
                    assign_speedup=t_loop / t_assign,
                    total_speedup=(t_score_ref + t_loop) / (t_score + t_assign),
                )
                rows.append(row)
                graph = f"{t_assign_graph:.3f}" if t_assign_graph is not None else "n/a"
                print(f"{resolution:5d}px L={looks:<2d} B={batch:<3d} score {t_score_ref:.3f} -> {t_score:.3f} ms   "
                      f"fwd+bwd {row['score_fwd_bwd_reference_ms']:.3f} -> {row['score_fwd_bwd_triton_ms']:.3f} ms   "
                      f"assign {t_loop:8.3f} -> {t_assign:.3f} ms (graph {graph})   "
                      f"total x{row['total_speedup']:.1f}")
    wrong = [f"{r['resolution']}px/L={r['looks']}/B={r['batch']}" for r in rows if not r["ok"]]
    write_results(args.out, dict(dtype=args.dtype, tokens_per_look=args.tokens), rows, wrong,
                  "scoring off the reference by more than 2 eps, gradients off float64 by more than twice the "
                  "reference's error, or assignment different from upstream's loop,")


if __name__ == "__main__":
    main()
