"""Bad index metadata: a ValueError naming the argument where it can be read for free (CPU tensors,
host ints) on both backends; checked mode (argument or PS3_KERNELS_CHECKED) for metadata on the GPU;
and kernels that stay inside their tensors when unchecked bad metadata reaches them (run under the
interpreter's memory checker; GPU metadata is emulated by telling the ops it is not host-readable)."""

from __future__ import annotations

import pytest
import torch

import ps3_kernels.backend as backend
from ps3_kernels import PackedSequences, assign_looks, sparse_patch_embed, use_backend, varlen_prefix_attention
from ps3_kernels.patch_embed import PatchTokens

from memcheck import memcheck
from test_patch_embed import make_case
from test_varlen_attention import make_inputs

BACKENDS = ["torch", "triton"]
needs_interpreter = pytest.mark.skipif(not backend.triton_interpreted(), reason="the memory checker needs the "
                                       "Triton interpreter")


@pytest.fixture
def on_gpu_metadata(monkeypatch):
    """Index tensors behave like GPU tensors: not read on the host unless in checked mode."""
    monkeypatch.setattr(backend, "host_readable", lambda t: False)


# ----------------------------------------------------------------------------- attention


def attention_args(**changes):
    args = make_inputs([2, 2, 5], 2, (3, 2, [0, 1, 1]), head_dim=16, dtype=torch.float32, requires_grad=True)
    args.update({n: torch.tensor(v, dtype=torch.int32) if isinstance(v, list) else v for n, v in changes.items()})
    return args


# (case, changes, message); the first six need the metadata values, the rest only host ints.
ATTENTION = [
    ("cu_not_from_0", dict(cu_seqlens=[2, 4, 6, 9]), "cu_seqlens must start at 0"),
    ("cu_decreasing", dict(cu_seqlens=[0, 2, 9, 4]), r"cu_seqlens must be non-decreasing.*cu_seqlens\[3\]=4"),
    ("cu_past_tokens", dict(cu_seqlens=[0, 2, 4, 40]), "cu_seqlens must end at q's number of tokens 9, got 40"),
    ("prefix_index_negative", dict(prefix_index=[0, 1, -1]),
     r"prefix_index must lie in \[0, 2\).*prefix_index\[2\]=-1"),
    ("prefix_index_past_rows", dict(prefix_index=[5, 0, 1]), r"prefix_index\[0\]=5"),
    ("max_seqlen_too_small", dict(max_seqlen=4), "max_seqlen=4 is less than the longest sequence"),
    ("max_seqlen_past_total", dict(max_seqlen=10), "max_seqlen=10 cannot be the longest"),
    ("max_seqlen_under_average", dict(max_seqlen=2), "max_seqlen=2 cannot be the longest of 3 sequences"),
    ("max_seqlen_negative", dict(max_seqlen=-1), "max_seqlen must be an int >= 0"),
    ("max_seqlen_bool", dict(max_seqlen=True), "max_seqlen must be an int >= 0"),
    ("tokens_without_sequences", dict(cu_seqlens=[0], prefix_index=None, prefix_k=None, prefix_v=None),
     "cu_seqlens describes no sequence"),
]
VALUE_CASES = 6


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case, changes, message", ATTENTION, ids=[c[0] for c in ATTENTION])
def test_attention_rejects(case, changes, message, backend_name):
    with use_backend(backend_name), pytest.raises(ValueError, match=message):
        varlen_prefix_attention(**attention_args(**changes))


def test_attention_layout_is_checked_without_reading_device_memory(on_gpu_metadata):
    """A layout built from host lengths is validated from those ints, even when tensors are on the GPU."""
    args = attention_args()
    seqs = PackedSequences.from_lengths([2, 2, 5], prefix_index=[0, 2, 1])
    with pytest.raises(ValueError, match=r"prefix_index\[1\]=2"):
        varlen_prefix_attention(args["q"], args["k"], args["v"], seqs, args["prefix_k"], args["prefix_v"])
    seqs = PackedSequences.from_lengths([2, 2, 4], prefix_index=[0, 1, 1])
    with pytest.raises(ValueError, match="do not match"):
        varlen_prefix_attention(args["q"], args["k"], args["v"], seqs, args["prefix_k"], args["prefix_v"])


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case, changes, message", ATTENTION[:VALUE_CASES], ids=[c[0] for c in ATTENTION[:VALUE_CASES]])
def test_attention_checked_mode(case, changes, message, backend_name, on_gpu_metadata, monkeypatch):
    with use_backend(backend_name), pytest.raises(ValueError, match=message):
        varlen_prefix_attention(**attention_args(**changes), checked=True)
    monkeypatch.setenv("PS3_KERNELS_CHECKED", "1")
    with use_backend(backend_name), pytest.raises(ValueError, match=message):
        varlen_prefix_attention(**attention_args(**changes))


@needs_interpreter
@pytest.mark.parametrize("case, changes, message", ATTENTION[:VALUE_CASES], ids=[c[0] for c in ATTENTION[:VALUE_CASES]])
def test_attention_kernels_stay_in_bounds(case, changes, message, on_gpu_metadata):
    """Unchecked bad metadata: forward and backward kernels run, touching only their own tensors."""
    args = attention_args(**changes)
    with memcheck():
        out = varlen_prefix_attention(**args, impl="triton")
        out.sum().backward()
    assert args["q"].grad is not None and args["prefix_k"].grad is not None


# ----------------------------------------------------------------------------- patch embed


def embed_args(**changes):
    images, sizes, tokens, weight, bias, pos, pos_index, res, res_index = make_case(
        [(12, 12), (12, 8)], [[(12, 12), (4, 4)], [(12, 8)]], 4, 16, torch.float32, torch.float32, seed=1)
    args = dict(images=images, resized_sizes=sizes, tokens=tokens, weight=weight.requires_grad_(),
                bias=bias.requires_grad_(), pos_table=pos.requires_grad_(), pos_index=pos_index,
                res_table=res.requires_grad_(), res_index=res_index)
    fields = {f: changes.pop(f) for f in ("image", "scale", "row", "col") if f in changes}
    last_scale1 = int((tokens.scale == 1).nonzero()[-1])  # a token of image 0's second scale
    for field, (position, value) in fields.items():
        t = getattr(tokens, field).clone()
        t[last_scale1 if position == "scale1" else position] = value
        setattr(tokens, field, t)
    for name, value in changes.items():  # pos_index / res_index: one bad value for every token
        args[name] = torch.full_like(args[name], value)
    return args


# Image 0 has scales of 3x3 and 1x1 patches, image 1 one scale of 3x2 patches (its tokens come last);
# identity resizes and a 3x downscale, so the valid tokens take the kernel's one-tap path, which
# (unlike the bicubic path) has no tap clamping of its own. pos has 40 rows, res 25.
EMBED = [
    ("image_past_images", dict(image=(0, 2)), r"tokens.image\[0\]=2 is outside \[0, 2\)"),
    ("image_negative", dict(image=(3, -1)), r"tokens.image\[3\]=-1"),
    ("scale_past_image_scales", dict(scale=(-1, 1)), r"tokens.scale\[\d+\]=1 is outside \[0, 1\)"),
    ("scale_past_all_scales", dict(scale=(0, 7)), r"tokens.scale\[0\]=7 is outside \[0, 2\)"),
    ("row_past_grid", dict(row=("scale1", 2)), r"tokens.row\[\d+\]=2 is outside \[0, 1\)"),
    ("row_negative", dict(row=(0, -1)), r"tokens.row\[0\]=-1"),
    ("row_far_past_grid", dict(row=(-1, 9)), r"tokens.row\[\d+\]=9 is outside \[0, 3\)"),
    ("col_negative", dict(col=(-1, -4)), r"tokens.col\[\d+\]=-4 is outside \[0, 2\)"),
    ("col_past_grid", dict(col=("scale1", 1)), r"tokens.col\[\d+\]=1 is outside \[0, 1\)"),
    ("pos_index_past_rows", dict(pos_index=40), r"pos_index\[0\]=40 is outside \[0, 40\)"),
    ("res_index_negative", dict(res_index=-2), r"res_index\[0\]=-2"),
]


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case, changes, message", EMBED, ids=[c[0] for c in EMBED])
def test_patch_embed_rejects(case, changes, message, backend_name):
    with use_backend(backend_name), pytest.raises(ValueError, match=message):
        sparse_patch_embed(**embed_args(**changes))


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("case, changes, message", EMBED[::2], ids=[c[0] for c in EMBED[::2]])
def test_patch_embed_checked_mode(case, changes, message, backend_name, on_gpu_metadata):
    with use_backend(backend_name), pytest.raises(ValueError, match=message):
        sparse_patch_embed(**embed_args(**changes), checked=True)


@needs_interpreter
@pytest.mark.parametrize("case, changes, message", EMBED, ids=[c[0] for c in EMBED])
def test_patch_embed_kernels_stay_in_bounds(case, changes, message, on_gpu_metadata):
    args = embed_args(**changes)
    with memcheck(), use_backend("triton"):
        out = sparse_patch_embed(**args)
        out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(args["weight"].grad).all()


@needs_interpreter
def test_patch_embed_missing_scale_of_odd_sized_image_stays_in_bounds(on_gpu_metadata):
    """A token of a scale its image does not have, unchecked: the scale is clamped to the image's
    last one, so an odd-sized image (whose 1-pixel "size" would be an odd integer downscale, the
    one-tap path without tap clamping) is still sampled inside its pixels."""
    images, sizes, tokens, *params = make_case([(9, 15), (12, 12)], [[(8, 12)], [(12, 12), (4, 4)]], 4, 16,
                                               torch.float32, torch.float32, seed=2)
    weight = params[0].requires_grad_()
    tokens.scale = torch.where(tokens.image == 0, 1, tokens.scale)  # image 0 comes first in the pixels
    with memcheck(), use_backend("triton"):
        out = sparse_patch_embed(images, sizes, tokens, weight, *params[1:])
        out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(weight.grad).all()


def test_patch_embed_rejects_bad_sizes_and_empty_images():
    args = embed_args()
    for size in ((12, 0), (12, 3)):  # a resized image holds at least one patch (4 px here)
        with pytest.raises(ValueError, match=r"resized_sizes\[1\] must hold .* >= the patch size 4"):
            sparse_patch_embed(**{**args, "resized_sizes": [[(12, 12)], [size]]})
    with pytest.raises(ValueError, match=r"images\[1\] is empty"):
        sparse_patch_embed(**{**args, "images": [args["images"][0], torch.zeros(3, 0, 4)]})
    with pytest.raises(TypeError, match="tokens must be a PatchTokens"):
        sparse_patch_embed(**{**args, "tokens": tuple(vars(args["tokens"]).values())})
    assert isinstance(args["tokens"], PatchTokens)


# ----------------------------------------------------------------------------- look assignment


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_negative_quotas(backend_name, monkeypatch):
    probs, quotas = torch.rand(2, 6), torch.tensor([[2, 1], [3, -1]])
    with use_backend(backend_name), pytest.raises(ValueError, match=r"quotas must be >= 0, got quotas\[1, 1\]=-1"):
        assign_looks(probs, quotas)
    monkeypatch.setattr(backend, "host_readable", lambda t: False)
    with use_backend(backend_name), pytest.raises(ValueError, match="quotas must be >= 0"):
        assign_looks(probs, quotas, checked=True)
    with use_backend(backend_name), pytest.raises(TypeError, match="quotas must be an integer tensor"):
        assign_looks(probs, quotas.float())
    if backend_name == "triton" and backend.triton_interpreted():
        with memcheck():  # unchecked: a meaningless but in-bounds assignment
            out = assign_looks(probs, quotas)
        assert ((out >= -1) & (out < 2)).all()
