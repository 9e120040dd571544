"""Benchmark the Triton varlen prefix attention against its peers on PS3 shapes (CUDA only).

PS3's high-res looks (2,560 query tokens each) attend to their own tokens plus the image's
low-res KV cache (P = 729 tokens), 16 heads of dim 72. Cases: a batch of B images with one
look each, a batch of mixed look lengths with two looks per image, and the 4K "all" case of
87,480 tokens split in looks of 2,560 that share one cache row.

Each implementation runs forward and forward+backward in bf16 (median of the shared timer,
``ps3.bench.harness.bench``: CUDA events, L2 flushed, counted repetitions); the sequences are a
layout's shared device tables, as the model passes them, so the Triton op's block schedule is
built once, not per call. Peers get the inputs their library needs (``prepare_impl``):
"prebuilt" times the attention alone, "with_prep" also builds those inputs (padding,
concatenated K/V, block mask) inside the timed region, which is what a caller pays. In
forward+backward the gradients always flow back to q/k/v/prefix, so the backward of a peer's
input building is inside both variants. TFLOP/s count 4 * q_len * (P + k_len) * d * heads per
sequence forward, and 2.5 times that more for the backward (the usual convention; the Triton
backward recomputes more than that).

    python benchmarks/bench_varlen_attention.py --out varlen_attention.json
"""

from __future__ import annotations

from typing import Any

import torch

from ps3.bench.harness import bench, op_parser, require_cuda, write_results
from ps3_kernels.layout import PackedSequences
from ps3_kernels.varlen_attention import available_impls, prepare_impl, varlen_prefix_attention

HEADS, HEAD_DIM, PREFIX_LEN, LOOK = 16, 72, 729, 2560
ALL_4K_TOKENS = 87_480
MIXED_LENGTHS = [2560, 1280, 640, 2560, 37, 1999, 2560, 512]  # two looks per image
PEERS = ("sdpa", "flex", "flash_attn", "xformers")


def make_case(lengths: list[int], prefix_index: list[int], dtype: torch.dtype, device: str, seed: int = 0,
              heads: int = HEADS, head_dim: int = HEAD_DIM, prefix_len: int = PREFIX_LEN) -> dict[str, Any]:
    """Random inputs of the public op for sequences ``lengths`` reading prefix rows ``prefix_index``.

    ``cu_seqlens`` and ``prefix_index`` are a layout's shared device tables
    (:meth:`~ps3_kernels.layout.PackedSequences.from_lengths`), as the model passes them.
    """
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn where they live: GPU-sized cases stay cheap
    total, rows = sum(lengths), max(prefix_index) + 1

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device).to(dtype)

    seqs = PackedSequences.from_lengths(lengths, device, prefix_index)
    return dict(q=randn(total, heads, head_dim), k=randn(total, heads, head_dim), v=randn(total, heads, head_dim),
                cu_seqlens=seqs.cu_seqlens, prefix_k=randn(rows, heads, prefix_len, head_dim),
                prefix_v=randn(rows, heads, prefix_len, head_dim), prefix_index=seqs.prefix_index,
                max_seqlen=seqs.max_seqlen)


def cases(batches: list[int]) -> list[tuple[str, list[int], list[int]]]:
    """(name, look lengths, prefix row of each look)."""
    out = [(f"batch{b}", [LOOK] * b, list(range(b))) for b in batches]
    out.append(("mixed", MIXED_LENGTHS, [i // 2 for i in range(len(MIXED_LENGTHS))]))
    looks = [LOOK] * (ALL_4K_TOKENS // LOOK) + ([ALL_4K_TOKENS % LOOK] if ALL_4K_TOKENS % LOOK else [])
    out.append(("4k_all", looks, [0] * len(looks)))
    return out


def forward_flops(case: dict[str, Any]) -> int:
    """4 * q_len * (P + k_len) * head_dim * heads summed over the sequences."""
    _, heads, head_dim = case["q"].shape
    prefix_len = case["prefix_k"].shape[2]
    lengths = (case["cu_seqlens"][1:] - case["cu_seqlens"][:-1]).tolist()
    return sum(4 * n * (prefix_len + n) * head_dim * heads for n in lengths)


def rel_and_max_err(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (out.float() - ref.float())
    return (diff.norm() / ref.float().norm()).item(), diff.abs().max().item()


TRITON_TOL = 1e-2  # relative error of the bf16 kernel against the float32 reference


def check(case: dict[str, Any], impls: list[str]) -> dict[str, dict[str, Any]]:
    """Errors of every implementation against the reference run in float32 (``ok``: within ``TRITON_TOL``)."""
    exact = {n: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t) for n, t in case.items()}
    ref = varlen_prefix_attention(**exact, impl="torch")
    errors = {}
    for impl in impls:
        try:
            rel, mx = rel_and_max_err(varlen_prefix_attention(**case, impl=impl), ref)
            errors[impl] = dict(rel=rel, max_abs=mx, ok=rel < TRITON_TOL)
        except Exception as e:  # a peer that cannot run this case (memory, shape limits)
            errors[impl] = dict(error=f"{type(e).__name__}: {e}"[:300])
    return errors


def check_grads(case: dict[str, Any]) -> dict[str, float]:
    """Max abs error of the Triton gradients against float32 reference gradients."""
    names = ("q", "k", "v", "prefix_k", "prefix_v")
    grads = {}
    for impl, cast in (("triton", lambda t: t), ("torch", lambda t: t.float())):
        leaves = {n: cast(case[n]).detach().requires_grad_() for n in names}
        out = varlen_prefix_attention(**{**case, **leaves}, impl=impl)
        grads[impl] = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
    return {n: (a.float() - b).abs().max().item() for n, a, b in zip(names, grads["triton"], grads["torch"])}


def timed(fn, grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median ms of ``fn()`` (the shared timer's defaults: 3 warm-up calls, 10 timed)."""
    return bench(fn, grad_to_none=grad_to_none).ms


def bench_case(name: str, lengths: list[int], index: list[int], impls: list[str], dtype: torch.dtype,
               device: str = "cuda", **shape: int) -> list[dict]:
    """Check, then time every implementation on one case; ``shape`` overrides make_case's PS3 defaults."""
    case = make_case(lengths, index, dtype, device, **shape)
    errors = check(case, impls)
    print(f"{name}: {len(lengths)} looks, {sum(lengths)} tokens; max |err| vs fp32 reference: "
          + ", ".join(f"{i} {e.get('max_abs', e.get('error'))}" for i, e in errors.items()))
    if name == "batch1":
        print("  triton grads max |err|: " + ", ".join(f"{n} {e:.2e}" for n, e in check_grads(case).items()))
    flops = forward_flops(case)
    leaves = [case[n].requires_grad_() for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    grad_out = torch.randn_like(case["q"])
    records = []
    for impl in (i for i in impls if "error" not in errors[i]):
        # sdpa's padding is part of the reference op itself, so it has no separate preparation.
        for variant in ("prebuilt", "with_prep") if impl in ("flex", "flash_attn", "xformers") else ("prebuilt",):
            for mode in ("fwd", "fwd_bwd"):
                try:
                    with torch.set_grad_enabled(mode == "fwd_bwd"):
                        if variant == "prebuilt":
                            fn = prepare_impl(impl, **case)
                        else:
                            def fn(impl=impl):
                                return prepare_impl(impl, **case)()
                        if mode == "fwd":
                            ms = timed(fn)
                        else:  # retain_graph: a prebuilt peer's input building is backpropagated every call
                            ms = timed(lambda: fn().backward(grad_out, retain_graph=True), leaves)
                    error = None
                except Exception as e:  # a peer that cannot run this case (memory, shape limits)
                    ms, error = None, f"{type(e).__name__}: {e}"[:300]
                fn = None
                torch.cuda.empty_cache()
                total_flops = flops * (3.5 if mode == "fwd_bwd" else 1.0)
                records.append(dict(
                    case=name, num_seqs=len(lengths), tokens=sum(lengths), impl=impl, variant=variant, mode=mode,
                    ms=ms, tflops=(total_flops / (ms * 1e-3) / 1e12) if ms else None, error=error,
                    max_abs_err=errors[impl]["max_abs"], rel_err=errors[impl]["rel"], ok=errors[impl]["ok"],
                ))
    ours = {r["mode"]: r["ms"] for r in records if r["impl"] == "triton"}
    for r in records:
        r["triton_speedup"] = (r["ms"] / ours[r["mode"]]) if r["ms"] and ours.get(r["mode"]) else None
        print(f"  {r['impl']:10s} {r['variant']:9s} {r['mode']:7s} "
              + (f"{r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s  triton x{r['triton_speedup']:.2f}"
                 if r["ms"] else f"failed: {r['error']}"))
    return records


def main() -> None:
    parser = op_parser(__doc__, batches=[1, 2, 4, 8, 16])
    parser.add_argument("--peers", nargs="*", default=None, help=f"subset of {PEERS} (default: all that import)")
    args = parser.parse_args()
    require_cuda("bench_varlen_attention.py")

    available = available_impls()
    peers = [p for p in (args.peers if args.peers is not None else PEERS) if p in available]
    print(f"peers: {peers} (not importable: {[p for p in PEERS if p not in available]})")
    records = []
    for name, lengths, index in cases(args.batches):
        records += bench_case(name, lengths, index, ["triton", *peers], torch.bfloat16)
    meta = dict(dtype="bfloat16", heads=HEADS, head_dim=HEAD_DIM, prefix_len=PREFIX_LEN, look=LOOK, peers=peers,
                flops="fwd: 4*q_len*(P+k_len)*d*heads per sequence; fwd_bwd: 3.5x fwd",
                triton_speedup="peer ms / triton ms, same case and mode")
    wrong = sorted({r["case"] for r in records if r["impl"] == "triton" and not r["ok"]})
    write_results(args.out, meta, records, wrong, f"Triton output off the reference by more than {TRITON_TOL}")


if __name__ == "__main__":
    main()
