"""Stage ``op_checks``: every op at PS3-4K shapes (SO400M 16 heads x 72; the 729-token low-res
pass; 2560-token looks over the 729-token prefix; a 3780 px image) against float64 on fresh
random inputs (seed recorded) with NaN-poisoned outputs, forward and backward: bf16 at B = 1
first, then B = 4, fp16 and fp32."""

from __future__ import annotations

from typing import Any

import torch

import bench_patch_embed
import bench_selection
import bench_varlen_attention
from ps3_kernels import use_backend, varlen_prefix_attention

from . import workloads
from .base import DTYPES, Shapes, Stage, StageContext, WorkItem, rel, seed
from .checks import check_item

# Relative Frobenius error against float64 (outputs; gradients get twice as much).
TOL = {"bf16": 1e-2, "fp16": 5e-3, "fp32": 1e-5}
PATCH_TOL = {"bf16": 5e-3, "fp16": 1e-3, "fp32": 1e-5}
SELECTION_TOL = {"bf16": 1e-2, "fp16": 5e-3, "fp32": 1e-6}


def check_attention(ctx: StageContext, tag: str, batch: int, look: bool) -> dict[str, Any]:
    """Forward and backward of the Triton op against float64, poisoned outputs.

    ``look=True``: ``batch`` high-res looks, each over its own image's low-res prefix; else the
    low-res pass (``batch`` sequences of ``prefix_len`` tokens, no prefix).
    """
    from test_varlen_attention import float64_reference

    from helpers import poisoned_empty

    sh, s = ctx.shapes, seed()
    lengths = [sh.look if look else sh.prefix_len] * batch
    case = bench_varlen_attention.make_case(lengths, list(range(batch)), DTYPES[tag], sh.device, seed=s,
                                            heads=sh.heads, head_dim=sh.head_dim, prefix_len=sh.prefix_len)
    if not look:
        case.update(prefix_k=None, prefix_v=None, prefix_index=None)
    names = [n for n in ("q", "k", "v", "prefix_k", "prefix_v") if case[n] is not None]
    for n in names:
        case[n].requires_grad_()
    grad_out = torch.randn(case["q"].shape, generator=torch.Generator().manual_seed(s + 1)).to(case["q"])
    with poisoned_empty():
        out = varlen_prefix_attention(**case, impl="triton")
        out.backward(grad_out)
    ref_out, ref_grads = float64_reference(case, grad_out)
    errors = {"out": rel(out, ref_out), **{f"d{n}": rel(case[n].grad, ref_grads[n]) for n in names}}
    tol = TOL[tag]
    return dict(errors=errors, tol=tol, bounds={k: tol if k == "out" else 2 * tol for k in errors}, dtype=tag,
                shape=f"{batch} x {lengths[0]} tokens{f' + prefix {sh.prefix_len}' if look else ''}, "
                      f"{sh.heads} heads x {sh.head_dim}", seed=s)


def check_patch_embed(ctx: StageContext, tag: str, batch: int) -> dict[str, Any]:
    """Sparse gather + embed (Triton) against the reference with float64 parameters (the resize
    itself is fp32 in both), forward and the gradients of weight, bias and both tables."""
    from helpers import poisoned_empty

    sh, s = ctx.shapes, seed()
    case = bench_patch_embed.make_case(list(sh.scales), batch, sh.patch_tokens, DTYPES[tag], sh.device,
                                       patch=sh.patch, width=sh.width, seed=s)
    params = ("weight", "bias")

    def leaves(c: dict[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
        def leaf(t):
            return (t.detach().to(dtype) if dtype else t.detach()).requires_grad_()

        return {**c, **{p: leaf(c[p]) for p in params}, "pos_tables": [leaf(t) for t in c["pos_tables"]],
                "res_tables": [leaf(t) for t in c["res_tables"]]}

    ours, ref = leaves(case, None), leaves(case, torch.float64)
    with use_backend("triton"), poisoned_empty():
        out = bench_patch_embed.sparse_embed(ours)
        grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(s + 1)).to(out)
        out.backward(grad)
    with use_backend("torch"):
        ref_out = bench_patch_embed.sparse_embed(ref)
        ref_out.backward(grad.double())

    def cat_grads(c, key):
        return torch.cat([t.grad for t in c[key]])

    errors = {"out": rel(out, ref_out), **{f"d{p}": rel(ours[p].grad, ref[p].grad) for p in params},
              "dpos_table": rel(cat_grads(ours, "pos_tables"), cat_grads(ref, "pos_tables")),
              "dres_table": rel(cat_grads(ours, "res_tables"), cat_grads(ref, "res_tables"))}
    tol = PATCH_TOL[tag]
    return dict(errors=errors, tol=tol, bounds={k: tol if k == "out" else 2 * tol for k in errors}, dtype=tag,
                shape=f"B={batch} {sh.resolution} px, {len(case['tokens'])} tokens, width {sh.width}", seed=s)


def check_selection(ctx: StageContext, tag: str, batch: int) -> dict[str, Any]:
    """Scoring against float64 (and within two units in the last place of the same-dtype
    reference, whose rounding the kernel reproduces); the gradients of its four inputs against the
    reference's backward in float64 routed through the bins' maxima the kernel chose, each choice
    within 4 units in the last place of its bin's float64 maximum; look assignment equal to
    upstream's loop."""
    from helpers import poisoned_empty

    sh, s = ctx.shapes, seed()
    dtype = DTYPES[tag]
    case = bench_selection.make_case(list(sh.scales), batch, sh.looks, sh.patch_tokens, dtype, sh.device,
                                     channels=sh.width, hr_channels=sh.sel_hr_channels, hr_grid=sh.sel_hr_grid,
                                     low_grid=sh.low_grid, seed=s)
    with use_backend("triton"), poisoned_empty():
        probs = bench_selection.score(case)
        scaled = bench_selection.per_scale(probs, case["grids"])
        looks = bench_selection.assign(scaled, case)
        grad = torch.randn(probs.shape, generator=torch.Generator().manual_seed(s)).to(probs)
        grads = bench_selection.score_backward(case, grad)
        argmax = bench_selection.kernel_argmax(case)
    with use_backend("torch"):
        same = bench_selection.score(case)
        wide = {k: case[k].double() for k in bench_selection.INPUTS}
        ref64 = bench_selection.score({**case, **wide})
    want = bench_selection.upstream_assign(scaled, case, stable=True)
    max_abs = (probs.float() - same.float()).abs().max().item()
    equal = all(torch.equal(g, w) for g, w in zip(looks, want))
    ref_grads, gap = bench_selection.routed_backward(case, grad, argmax)
    errors = {"probs": rel(probs, ref64),
              **{f"d{k}": rel(g, r) for k, g, r in zip(bench_selection.INPUTS, grads, ref_grads)}}
    tol = SELECTION_TOL[tag]
    return dict(errors=errors, tol=tol, bounds={k: tol if k == "probs" else 2 * tol for k in errors},
                extra_ok=max_abs <= 2 * torch.finfo(dtype).eps and equal and gap <= 4 * torch.finfo(dtype).eps,
                max_abs_vs_same_dtype=max_abs, argmax_gap=gap, assign_equal_upstream_loop=equal, dtype=tag,
                shape=f"B={batch}, {sh.width} x {sh.low_grid}^2 + hr {sh.sel_hr_channels} x {sh.sel_hr_grid}^2, "
                      f"{sh.looks} looks of {sh.patch_tokens}", seed=s)


def check_selection_autocast(ctx: StageContext) -> dict[str, Any]:
    """Under CUDA autocast (bf16) both backends score in float32, as upstream's AMP does: float32
    output equal to the float32 reference of the bf16 inputs' values."""
    sh, s = ctx.shapes, seed()
    case = bench_selection.make_case(list(sh.scales), 1, sh.looks, sh.patch_tokens, torch.bfloat16, sh.device,
                                     channels=sh.width, hr_channels=sh.sel_hr_channels, hr_grid=sh.sel_hr_grid,
                                     low_grid=sh.low_grid, seed=s)
    with use_backend("torch"):
        want = bench_selection.score({**case, **{k: case[k].float() for k in bench_selection.INPUTS}})
    errors, dtypes = {}, {}
    for backend in ("triton", "torch"):
        with use_backend(backend), torch.autocast("cuda", dtype=torch.bfloat16):
            got = bench_selection.score(case)
        errors[backend], dtypes[backend] = rel(got, want), str(got.dtype)
    return dict(errors=errors, tol=SELECTION_TOL["fp32"], extra_ok=set(dtypes.values()) == {"torch.float32"},
                dtypes=dtypes, dtype="bf16 autocast", shape=f"B=1, {sh.width} x {sh.low_grid}^2", seed=s)


def ops(sh: Shapes, tag: str, batch: int) -> list[WorkItem]:
    # Estimates: the float64 references and the Python around them dominate on the GPU.
    slow = 1.0 + 0.25 * batch if sh.gpu else 0.0
    return [
        check_item(f"attention look fwd+bwd {tag} B={batch}", 1.5 * slow,
                   lambda ctx: check_attention(ctx, tag, batch, True), (workloads.attention(sh, tag, batch, True),)),
        check_item(f"attention low-res fwd+bwd {tag} B={batch}", slow,
                   lambda ctx: check_attention(ctx, tag, batch, False), (workloads.attention(sh, tag, batch, False),)),
        check_item(f"patch embed fwd+bwd {tag} B={batch}", slow, lambda ctx: check_patch_embed(ctx, tag, batch),
                   (workloads.patch_embed(sh, tag, batch),)),
        check_item(f"selection fwd+bwd {tag} B={batch}", 0.5 * slow, lambda ctx: check_selection(ctx, tag, batch),
                   (workloads.selection(sh, tag, batch, backward=True),)),
    ]


def items(sh: Shapes) -> list[WorkItem]:
    first, *more = sh.check_batches
    out = ops(sh, "bf16", first) + [i for b in more for i in ops(sh, "bf16", b)]
    out += ops(sh, "fp16", first) + ops(sh, "fp32", first)
    out += [i for b in more for tag in ("fp16", "fp32") for i in ops(sh, tag, b)]
    if sh.gpu:  # autocast needs CUDA
        out.append(check_item("selection under CUDA autocast, both backends", 0.5, check_selection_autocast,
                              (workloads.selection(sh, "fp32", 1),)))
    return out


STAGE = Stage("op_checks", 0.12, __doc__.split("\n\n")[0], items)
