"""Varlen attention with a KV prefix: the Triton kernels (interpreted on CPU) and the peers
against the float64 PyTorch reference, which is itself checked against a brute-force loop."""

from __future__ import annotations

import types
import warnings

import pytest
import torch

from ps3_kernels import PackedSequences, TritonNotSupportedError
from ps3_kernels.backend import triton_available
from ps3_kernels.layout import is_shared_table
from ps3_kernels.varlen_attention import (
    available_impls,
    prepare_impl,
    varlen_prefix_attention,
    varlen_prefix_attention_reference,
)

from helpers import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3}

# (sequence lengths, heads, prefix) with prefix None or (P, prefix rows, prefix_index or None).
# The interpreter runs 16-wide blocks, so 17/31/33/40 cover partial and multiple blocks.
CASES = {
    "single_token_no_prefix": ([1], 1, None),
    "empty_seq_P0": ([17, 0, 33], 2, (0, 3, None)),
    "shared_rows_P19": ([5, 40, 16, 3], 3, (19, 2, [1, 0, 1, 1])),
    "P1_empty_first": ([0, 31, 1], 4, (1, 3, None)),
    "unused_rows_P20": ([16, 32], 1, (20, 4, [3, 3])),
    "equal_lengths_P7": ([9, 9, 9], 2, (7, 2, [0, 1, 1])),  # the reference's unpadded path
    "equal_lengths_no_prefix": ([12, 12], 2, None),
}


def make_inputs(lengths, heads, prefix, head_dim, dtype, seed=0, requires_grad=False):
    """Fresh random inputs (seeded) for one case; returns the argument dict of the public op."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def randn(*shape):
        t = torch.randn(*shape, generator=gen).to(DEVICE, dtype)
        return t.requires_grad_(requires_grad)

    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    args = dict(q=randn(total, heads, head_dim), k=randn(total, heads, head_dim), v=randn(total, heads, head_dim),
                cu_seqlens=cu, prefix_k=None, prefix_v=None, prefix_index=None)
    if prefix is not None:
        plen, rows, index = prefix
        args.update(prefix_k=randn(rows, heads, plen, head_dim), prefix_v=randn(rows, heads, plen, head_dim))
        if index is not None:
            args["prefix_index"] = torch.tensor(index, dtype=torch.int32, device=DEVICE)
    return args


def float64_reference(args, grad_out=None):
    """The reference on float64 copies; with ``grad_out`` also the gradients of the float tensors."""
    copies = {n: (t.detach().double().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
              for n, t in args.items()}
    out = varlen_prefix_attention_reference(**copies)
    if grad_out is None:
        return out, {}
    out.backward(grad_out.double())
    return out, {n: t.grad for n, t in copies.items() if isinstance(t, torch.Tensor) and t.is_floating_point()}


# ----------------------------------------------------------------------------- reference


def brute_force(q, k, v, cu_seqlens, prefix_k=None, prefix_v=None, prefix_index=None, softmax_scale=None):
    """softmax(Q K^T) V per sequence, written out."""
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    cu = cu_seqlens.tolist()
    for s in range(len(cu) - 1):
        lo, hi = cu[s], cu[s + 1]
        keys, values = k[lo:hi], v[lo:hi]
        if prefix_k is not None:
            row = prefix_index[s] if prefix_index is not None else s
            keys = torch.cat([prefix_k[row].transpose(0, 1), keys])
            values = torch.cat([prefix_v[row].transpose(0, 1), values])
        for h in range(q.shape[1]):
            scores = q[lo:hi, h] @ keys[:, h].T * scale
            out[lo:hi, h] = torch.softmax(scores, dim=-1) @ values[:, h]
    return out


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_brute_force(case):
    args = make_inputs(*CASES[case], head_dim=24, dtype=torch.float64)
    for scale in (None, 0.3):
        out = varlen_prefix_attention_reference(**args, softmax_scale=scale)
        assert rel_err(out, brute_force(**args, softmax_scale=scale)) < 1e-12


def layout_of(args) -> PackedSequences:
    """The case's layout built from host lengths, as the model builds it."""
    cu = args["cu_seqlens"].tolist()
    index = args["prefix_index"].tolist() if args["prefix_index"] is not None else None
    return PackedSequences.from_lengths([b - a for a, b in zip(cu, cu[1:])], DEVICE, index)


@pytest.mark.parametrize("case", CASES)
def test_layout_dense_mask_is_the_attention_pattern(case):
    """softmax over all packed keys masked by the layout's dense mask == the per-sequence brute force;
    the layout call of the op equals its loose (flash-attn style) call."""
    args = make_inputs(*CASES[case], head_dim=24, dtype=torch.float64)
    seqs = layout_of(args)
    q, k, v, pk, pv = (args[n] for n in ("q", "k", "v", "prefix_k", "prefix_v"))
    rows, plen = (pk.shape[0], pk.shape[2]) if pk is not None else (0, 0)
    mask = seqs.dense_mask(rows, plen)
    assert mask.shape == (q.shape[0], rows * plen + q.shape[0])
    if pk is not None:
        k = torch.cat([pk.transpose(1, 2).reshape(rows * plen, *k.shape[1:]), k])
        v = torch.cat([pv.transpose(1, 2).reshape(rows * plen, *v.shape[1:]), v])
    scores = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
    dense = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), v)
    assert rel_err(dense, brute_force(**args)) < 1e-12
    loose = varlen_prefix_attention(**args)
    assert torch.equal(varlen_prefix_attention(args["q"], args["k"], args["v"], seqs, pk, pv), loose)
    assert seqs.max_seqlen == max(CASES[case][0]) and seqs.total_tokens == q.shape[0]


def test_layout_tables_are_shared_until_written_to():
    a, b = PackedSequences.from_lengths([2, 3]), PackedSequences.from_lengths([2, 3])
    assert a.cu_seqlens is b.cu_seqlens and is_shared_table(a.cu_seqlens)
    a.cu_seqlens[1:] += 1  # a caller writing into the shared table does not change later layouts
    c = PackedSequences.from_lengths([2, 3])
    assert not is_shared_table(a.cu_seqlens) and c.cu_seqlens.tolist() == [0, 2, 5] and is_shared_table(c.cu_seqlens)


def test_layout_rejects_bad_lengths():
    with pytest.raises(ValueError, match="lengths"):
        PackedSequences.from_lengths([3, -1])
    with pytest.raises(ValueError, match="prefix_index"):
        PackedSequences.from_lengths([3, 1], prefix_index=[0])
    seqs = PackedSequences.from_lengths([3, 1], prefix_index=[0, 0])
    args = make_inputs([3, 1], 1, (2, 1, [0, 0]), head_dim=16, dtype=torch.float32)
    with pytest.raises(ValueError, match="prefix_index and max_seqlen come from the layout"):
        varlen_prefix_attention(args["q"], args["k"], args["v"], seqs, args["prefix_k"], args["prefix_v"],
                                prefix_index=args["prefix_index"])


# ----------------------------------------------------------------------------- triton


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [24, 40, 64, 72, 96, 128])
@pytest.mark.parametrize("case", CASES)
def test_triton_forward(case, head_dim, dtype, poisoned):
    args = make_inputs(*CASES[case], head_dim=head_dim, dtype=dtype, seed=head_dim)
    max_seqlen = max(CASES[case][0]) if head_dim % 48 == 0 else None  # both grid bounds
    out = varlen_prefix_attention(**args, max_seqlen=max_seqlen, impl="triton")
    assert out.dtype == dtype and out.shape == args["q"].shape
    assert rel_err(out, float64_reference(args)[0]) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_dim", [136, 256])  # two head-dim tiles beyond 128; the widest
@pytest.mark.parametrize("case", ["shared_rows_P19", "equal_lengths_no_prefix"])
def test_triton_forward_wide_heads(case, head_dim, dtype, poisoned):
    args = make_inputs(*CASES[case], head_dim=head_dim, dtype=dtype, seed=head_dim)
    out = varlen_prefix_attention(**args, impl="triton")
    assert rel_err(out, float64_reference(args)[0]) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("head_dim", [40, 72, 128])
@pytest.mark.parametrize("case", ["empty_seq_P0", "shared_rows_P19", "P1_empty_first", "unused_rows_P20",
                                  "equal_lengths_no_prefix"])
def test_triton_backward(case, head_dim, dtype, poisoned):
    args = make_inputs(*CASES[case], head_dim=head_dim, dtype=dtype, seed=head_dim, requires_grad=True)
    out = varlen_prefix_attention(**args, impl="triton")
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    out.backward(grad_out)
    ref_out, ref_grads = float64_reference(args, grad_out)
    assert rel_err(out, ref_out) < TOL[dtype]
    for name, ref in ref_grads.items():
        grad = args[name].grad
        assert grad.dtype == dtype, name
        assert rel_err(grad, ref) < 2 * TOL[dtype], name
        if name.startswith("prefix") and ref.numel():
            unused = ref.abs().flatten(1).amax(1) == 0  # rows no sequence reads get exact zeros
            assert torch.equal(grad[unused], torch.zeros_like(grad[unused])), name


@needs_triton
def test_triton_strided_and_mixed_dtype_inputs():
    """q/k/v as views of a fused qkv projection (kept as is), misaligned strides (copied), and a
    float32 prefix under bfloat16 queries (cast like the reference; its gradient stays float32)."""
    gen = torch.Generator().manual_seed(3)
    lengths, heads, head_dim = [9, 20], 2, 72
    total = sum(lengths)
    qkv = torch.randn(total, 3, heads, head_dim, generator=gen).to(DEVICE, torch.bfloat16)
    q, _, v = qkv.unbind(1)
    k = torch.randn(total, heads, head_dim + 3, generator=gen).to(DEVICE, torch.bfloat16)[..., :head_dim]
    prefix_k, prefix_v = (torch.randn(2, heads, 7, head_dim, generator=gen).to(DEVICE).requires_grad_()
                          for _ in range(2))
    cu = torch.tensor([0, 9, 29], dtype=torch.int32, device=DEVICE)
    args = dict(q=q, k=k, v=v, cu_seqlens=cu, prefix_k=prefix_k, prefix_v=prefix_v)
    out = varlen_prefix_attention(**args, impl="triton")
    out.float().sum().backward()
    ref_out, ref_grads = float64_reference(args, torch.ones_like(out))
    assert rel_err(out, ref_out) < TOL[torch.bfloat16]
    assert prefix_k.grad.dtype == torch.float32
    assert rel_err(prefix_k.grad, ref_grads["prefix_k"]) < 2 * TOL[torch.bfloat16]
    assert rel_err(prefix_v.grad, ref_grads["prefix_v"]) < 2 * TOL[torch.bfloat16]


@needs_triton
@pytest.mark.parametrize("lengths", [[], [0, 0]], ids=["no_seqs", "all_empty"])
def test_triton_without_queries(lengths):
    """No query tokens: empty output, and all-zero prefix gradients."""
    args = make_inputs(lengths, 2, (5, len(lengths), None), head_dim=16, dtype=torch.float32, requires_grad=True)
    out = varlen_prefix_attention(**args, impl="triton")
    assert out.shape == (0, 2, 16)
    out.sum().backward()
    assert torch.equal(args["prefix_k"].grad, torch.zeros_like(args["prefix_k"]))


@needs_triton
def test_triton_under_inference_mode_and_with_refilled_cu_seqlens():
    """A layout built under inference mode (inference tensors have no version counter) runs; a
    caller's ``cu_seqlens`` refilled in place between calls (a CUDA-graph static buffer, or a write
    through ``.data``) gets its new block schedule, never the one of its earlier contents."""
    args = make_inputs([4, 36], 2, (3, 2, [1, 0]), head_dim=16, dtype=torch.float32)
    with torch.inference_mode():
        seqs = PackedSequences.from_lengths([4, 36], DEVICE, prefix_index=[1, 0])
        loose = {n: t for n, t in args.items() if n not in ("cu_seqlens", "prefix_index")}
        out = varlen_prefix_attention(**loose, cu_seqlens=seqs, impl="triton")
    assert rel_err(out, float64_reference(args)[0]) < 1e-5
    cu = args["cu_seqlens"]
    varlen_prefix_attention(**args, impl="triton")
    cu.data.copy_(torch.tensor([0, 36, 40], dtype=cu.dtype))  # no version bump
    out = varlen_prefix_attention(**args, impl="triton")
    assert rel_err(out, float64_reference(args)[0]) < 1e-5


# ----------------------------------------------------------------------------- custom op (opcheck: test_op_gradients.py)


@needs_triton
def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    import ps3_kernels.triton.varlen_attention  # noqa: F401

    with FakeTensorMode():
        q = torch.empty(10, 3, 40, dtype=torch.bfloat16)
        prefix = torch.empty(2, 3, 7, 40, dtype=torch.bfloat16)
        cu, index = torch.zeros(3, dtype=torch.int32), torch.zeros(2, dtype=torch.int32)
        out, lse = torch.ops.ps3_kernels.varlen_prefix_attention(q, q, q, cu, prefix, prefix, index, 0.1, None)
        grads = torch.ops.ps3_kernels.varlen_prefix_attention_backward(
            out, q, q, q, out, lse, cu, prefix, prefix, index, 0.1, None)
    assert (out.shape, out.dtype) == ((10, 3, 40), torch.bfloat16)
    assert (lse.shape, lse.dtype) == ((3, 10), torch.float32)
    assert [g.shape for g in grads] == [q.shape] * 3 + [prefix.shape] * 2


@needs_triton
def test_torch_compile_full_graph():
    """A layer using the op traces with fullgraph=True (no graph break), forward and backward."""
    args = make_inputs([6, 11], 2, (4, 1, [0, 0]), head_dim=16, dtype=torch.float32, requires_grad=True)

    def layer(q, k, v, prefix_k, prefix_v):
        out = varlen_prefix_attention(q, k, v, args["cu_seqlens"], prefix_k, prefix_v,
                                      prefix_index=args["prefix_index"], max_seqlen=11, impl="triton")
        return (out * out).sum()

    leaves = [args[n] for n in ("q", "k", "v", "prefix_k", "prefix_v")]
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    expected = torch.autograd.grad(layer(*leaves), leaves)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


# ----------------------------------------------------------------------------- input errors


BAD_INPUTS = [
    ("q", lambda a: a.update(q=a["q"][0]), ValueError),
    ("k", lambda a: a.update(k=a["k"][:-1]), ValueError),
    ("v", lambda a: a.update(v=a["v"].double()), TypeError),
    ("cu_seqlens", lambda a: a.update(cu_seqlens=a["cu_seqlens"].float()), TypeError),
    ("cu_seqlens", lambda a: a.update(cu_seqlens=a["cu_seqlens"][None]), ValueError),
    ("prefix_k and prefix_v", lambda a: a.update(prefix_v=None), ValueError),
    ("prefix heads", lambda a: a.update(prefix_k=a["prefix_k"][:, :1], prefix_v=a["prefix_v"][:, :1]), ValueError),
    ("prefix_k", lambda a: a.update(prefix_k=a["prefix_k"].int(), prefix_v=a["prefix_v"].int()), TypeError),
    ("prefix_index", lambda a: a.update(prefix_index=a["prefix_index"][:1]), ValueError),
    ("prefix_index", lambda a: a.update(prefix_index=a["prefix_index"].float()), TypeError),
    ("prefix_index needs", lambda a: a.update(prefix_k=None, prefix_v=None), ValueError),
    ("one row per sequence", lambda a: a.update(prefix_index=None), ValueError),
    ("impl", lambda a: a.update(impl="cudnn"), ValueError),
]


@pytest.mark.parametrize("needle, mutate, error", BAD_INPUTS, ids=[f"{n}-{e.__name__}" for n, _, e in BAD_INPUTS])
def test_bad_inputs(needle, mutate, error):
    args = make_inputs([3, 4], 2, (5, 1, [0, 0]), head_dim=16, dtype=torch.float32)
    mutate(args)
    with pytest.raises(error, match=needle):
        varlen_prefix_attention(**args)


@needs_triton
@pytest.mark.parametrize("head_dim, dtype, reason", [(12, torch.float32, "head_dim is 12"),
                                                     (20, torch.float32, "head_dim is 20"),
                                                     (264, torch.float32, "head_dim is 264"),
                                                     (16, torch.float64, "q is float64")])
def test_triton_rejects_unsupported(head_dim, dtype, reason):
    """Explicit triton where it cannot run: an error listing the reasons; auto runs the reference."""
    args = make_inputs([3], 1, None, head_dim=head_dim, dtype=dtype)
    with pytest.raises(TritonNotSupportedError, match=reason):
        varlen_prefix_attention(**args, impl="triton")
    torch.testing.assert_close(varlen_prefix_attention(**args), varlen_prefix_attention_reference(**args))


# ----------------------------------------------------------------------------- peers


def test_available_impls():
    names = available_impls()
    assert {"torch", "sdpa"} <= set(names)
    assert ("triton" in names) == triton_available()


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
@pytest.mark.parametrize("case", ["empty_seq_P0", "shared_rows_P19", "P1_empty_first", "single_token_no_prefix"])
def test_torch_peers(impl, case):
    if impl not in available_impls():
        pytest.skip(f"{impl} does not import here")
    args = make_inputs(*CASES[case], head_dim=24, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FlexAttention warns when run eagerly (CPU)
        out = varlen_prefix_attention(**args, impl=impl)
    assert rel_err(out, float64_reference(args)[0]) < 1e-5


def _fake_flash_attn():
    """flash_attn_varlen_func's contract, brute force: packed q against packed k/v per cu_seqlens_k."""
    def flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal):
        assert not causal and cu_q.dtype == cu_k.dtype == torch.int32
        lq, lk = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
        assert max(lq, default=0) <= max_q and max(lk, default=0) <= max_k
        out = torch.zeros_like(q)
        for s in range(len(lq)):
            qs, ks = slice(cu_q[s], cu_q[s + 1]), slice(cu_k[s], cu_k[s + 1])
            probs = torch.softmax(torch.einsum("qhd,khd->hqk", q[qs], k[ks]) * softmax_scale, -1)
            out[qs] = torch.einsum("hqk,khd->qhd", probs, v[ks])
        return out

    return types.SimpleNamespace(flash_attn_varlen_func=flash_attn_varlen_func)


def _fake_xformers():
    """memory_efficient_attention with a BlockDiagonalMask, brute force, (1, tokens, heads, dim)."""
    class BlockDiagonalMask:
        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen):
            mask = cls()
            mask.q_seqlen, mask.kv_seqlen = q_seqlen, kv_seqlen
            return mask

    def memory_efficient_attention(q, k, v, attn_bias, scale):
        cu_q = torch.tensor([0] + attn_bias.q_seqlen).cumsum(0).to(torch.int32)
        cu_k = torch.tensor([0] + attn_bias.kv_seqlen).cumsum(0).to(torch.int32)
        return _fake_flash_attn().flash_attn_varlen_func(q[0], k[0], v[0], cu_q, cu_k, q.shape[1], k.shape[1],
                                                         softmax_scale=scale, causal=False)[None]

    return types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention,
                                 fmha=types.SimpleNamespace(BlockDiagonalMask=BlockDiagonalMask))


@pytest.mark.parametrize("impl", ["flash_attn", "xformers"])
@pytest.mark.parametrize("case", ["empty_seq_P0", "shared_rows_P19", "P1_empty_first", "single_token_no_prefix"])
def test_concatenating_peers_inputs(impl, case, monkeypatch):
    """The inputs built for flash-attn / xformers (concatenated K/V, cu_seqlens_k, masks), run by
    brute-force stand-ins of those libraries (neither is installed on the CPU runner)."""
    from ps3_kernels import attention_peers

    fakes = {"flash_attn": _fake_flash_attn, "xformers": _fake_xformers}
    monkeypatch.setattr(attention_peers, "import_peer", lambda name: fakes[name]())
    args = make_inputs(*CASES[case], head_dim=24, dtype=torch.float64, requires_grad=True)
    out = prepare_impl(impl, **args)()
    ref = varlen_prefix_attention_reference(**args)
    assert rel_err(out, ref) < 1e-12
    if args["prefix_k"] is not None:  # the concatenation is differentiable back to the prefix
        (grad,) = torch.autograd.grad(out.sum(), args["prefix_k"])
        (ref_grad,) = torch.autograd.grad(ref.sum(), args["prefix_k"])
        assert rel_err(grad, ref_grad) < 1e-10


@pytest.mark.parametrize("impl", ["flash_attn", "xformers"])
def test_missing_peer_names_its_package(impl):
    if impl in available_impls():
        pytest.skip(f"{impl} is installed")
    args = make_inputs([3], 1, None, head_dim=16, dtype=torch.float32)
    with pytest.raises(ImportError, match=impl.split("_")[0]):
        varlen_prefix_attention(**args, impl=impl)
