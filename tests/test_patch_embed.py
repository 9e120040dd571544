"""Sparse patch embed: the Triton kernel (interpreted on CPU) against the float64 PyTorch reference."""

from __future__ import annotations

import pytest
import torch

from ps3_kernels import TritonNotSupportedError, use_backend
from ps3_kernels.patch_embed import PatchTokens, image_layout, sparse_patch_embed, sparse_patch_embed_reference

from helpers import DEVICE, rel_err, run_triton, to_device


def select_tokens(resized_sizes, p, gen, keep=0.35, counts=None) -> PatchTokens:
    """Random patches of every (image, scale) plus its four corner patches (border handling).

    ``counts[b]`` overrides image ``b``'s token count (0 or 1 for the edge cases).
    """
    rows = []
    for b, sizes in enumerate(resized_sizes):
        mine = []
        for s, (h, w) in enumerate(sizes):
            gh, gw = h // p, w // p
            cells = {(r, c) for r in range(gh) for c in range(gw) if torch.rand((), generator=gen) < keep}
            cells |= {(0, 0), (gh - 1, gw - 1), (0, gw - 1), (gh - 1, 0)}
            mine += [(b, s, r, c) for r, c in sorted(cells)]
        if counts is not None and counts.get(b) is not None:
            mine = mine[-counts[b]:] if counts[b] else []
        rows += mine
    t = torch.tensor(rows, dtype=torch.long).reshape(-1, 4).t()
    return PatchTokens(image=t[0].clone(), scale=t[1].clone(), row=t[2].clone(), col=t[3].clone())


def make_case(image_sizes, resized_sizes, p, c_out, img_dtype, w_dtype, seed=0, counts=None, with_res=True):
    gen = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, h, w, generator=gen).to(img_dtype) for h, w in image_sizes]
    tokens = select_tokens(resized_sizes, p, gen, counts=counts)
    n = len(tokens)
    weight = (torch.randn(c_out, 3, p, p, generator=gen) / p).to(w_dtype)
    bias = torch.randn(c_out, generator=gen).to(w_dtype)
    pos_table = torch.randn(40, c_out, generator=gen).to(w_dtype)
    pos_index = torch.randint(0, 40, (n,), generator=gen)
    res_table = torch.randn(25, c_out, generator=gen).to(w_dtype) if with_res else None
    res_index = torch.randint(0, 25, (n,), generator=gen) if with_res else None
    return images, resized_sizes, tokens, weight, bias, pos_table, pos_index, res_table, res_index


def reference64(images, sizes, tokens, weight, bias, pos_table, pos_index, res_table, res_index):
    """The reference with float64 parameters: only the resize itself is fp32 (as in the kernel)."""
    dbl = [None if t is None else t.double() for t in (weight, bias, pos_table, res_table)]
    return sparse_patch_embed_reference(images, sizes, tokens, dbl[0], dbl[1], dbl[2], pos_index, dbl[3], res_index)


def run_kernel(*case):
    return run_triton(sparse_patch_embed, *case)


# Zoom 1 (identity), 2, 4 and 10 up, 2 and 10 down; non-square; a 4th image without scales' patches
# of its own except a single one; one with none.
MIXED_IMAGES = [(6, 5), (12, 9), (40, 30), (8, 8)]
MIXED_SIZES = [
    [(12, 10), (24, 20), (60, 48)],   # x2, x4, ~x10 (non-integer in w)
    [(12, 8), (24, 16), (4, 4)],      # identity in h, x2 in h, /3 down
    [(20, 16), (4, 4), (40, 32)],     # /2 in h, /10, identity in h
    [(8, 8), (80, 80), (16, 16)],     # identity, x10, x2
]


@pytest.mark.parametrize("img_dtype,w_dtype,tol", [
    (torch.float32, torch.float32, 1e-6),
    (torch.bfloat16, torch.float32, 5e-5),  # a pixel may round to the neighbouring 16-bit value
    (torch.float16, torch.float32, 5e-5),
    (torch.bfloat16, torch.bfloat16, 5e-3),
    (torch.float16, torch.float16, 1e-3),
])
def test_mixed_batch_matches_reference(poisoned, img_dtype, w_dtype, tol):
    case = make_case(MIXED_IMAGES, MIXED_SIZES, 4, 24, img_dtype, w_dtype, seed=1, counts={3: 1})
    out = run_kernel(*case)
    ref = reference64(*case)
    assert out.dtype == w_dtype and out.shape == ref.shape
    assert rel_err(out, ref) < tol


@pytest.mark.parametrize("img_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_pixels_match_resize(poisoned, img_dtype):
    """The gathered pixels are the reference's resized-and-cast pixels to within one unit in the last
    place (the fp32 resize may round differently by an ulp; rarely that shows after the cast)."""
    import ps3_kernels.triton.patch_embed  # noqa: F401  (registers the ops)

    case = make_case(MIXED_IMAGES, MIXED_SIZES, 4, 8, img_dtype, torch.float32, seed=6, counts={3: 1})
    images, sizes, tokens = case[:3]
    eye = torch.eye(48).reshape(48, 3, 4, 4)
    zero = torch.zeros(1, 48, dtype=torch.float64)
    ref = sparse_patch_embed_reference(images, sizes, tokens, eye.double(), None, zero, torch.zeros_like(tokens.row))
    pixels, geometry = image_layout(to_device(images), sizes)
    t = to_device(tokens)
    got = torch.ops.ps3_kernels.gather_patches(pixels, geometry, t.image, t.scale, t.row, t.col,
                                               eye.to(DEVICE, img_dtype)).double().cpu()
    diff = (got - ref).abs()
    if img_dtype == torch.float32:
        assert diff.max() < 4e-6  # rounding of unit-scale pixels (torch's resize fuses multiply-adds)
    else:
        assert torch.all(diff <= torch.finfo(img_dtype).eps * ref.abs() + 4e-6)
        assert (diff > 0).float().mean() < 0.01


def test_one_tap_blocks_and_image_without_tokens(poisoned):
    """Identity and odd integer downscales only (the kernel's one-tap path); image 2 has no token."""
    case = make_case([(8, 12), (24, 20), (16, 16)], [[(8, 12)], [(8, 4)], [(32, 32)]], 4, 16,
                     torch.float32, torch.float32, seed=2, counts={2: 0}, with_res=False)
    assert set(case[2].image.tolist()) == {0, 1}
    out = run_kernel(*case)
    assert rel_err(out, reference64(*case)) < 1e-6
    no_bias = case[:4] + (None,) + case[5:]  # the kernel's HAS_BIAS=False path
    assert rel_err(run_kernel(*no_bias), reference64(*no_bias)) < 1e-6


def test_patch_14(poisoned):
    case = make_case([(35, 22), (30, 30)], [[(28, 14), (56, 42)], [(42, 42), (14, 28)]], 14, 32,
                     torch.bfloat16, torch.float32, seed=3)
    out = run_kernel(*case)
    assert rel_err(out, reference64(*case)) < 1e-4


def test_no_tokens():
    case = make_case([(8, 8)], [[(8, 8)]], 4, 16, torch.float32, torch.float32, counts={0: 0})
    out = run_kernel(*case)
    assert out.shape == (0, 16)


def test_gradients_match_reference():
    case = make_case([(6, 5), (12, 9)], [[(12, 12), (8, 4)], [(12, 8), (36, 28)]], 4, 16,
                     torch.float32, torch.float32, seed=4)
    images, sizes, tokens, weight, bias, pos_table, pos_index, res_table, res_index = case
    gen = torch.Generator().manual_seed(5)
    grad = torch.randn(len(tokens), weight.shape[0], generator=gen)

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (weight, bias, pos_table, res_table)]
        out = fn(images, sizes, tokens, leaves[0], leaves[1], leaves[2], pos_index, leaves[3], res_index)
        out.backward(grad.to(dtype))
        return [t.grad for t in leaves]

    got = grads(run_kernel, torch.float32)
    ref = grads(sparse_patch_embed_reference, torch.float64)
    for name, g, r in zip(("weight", "bias", "pos_table", "res_table"), got, ref):
        assert g.dtype == torch.float32, name
        assert rel_err(g, r) < 2e-6, name


ARG_NAMES = ("images", "resized_sizes", "tokens", "weight", "bias", "pos_table", "pos_index", "res_table", "res_index")


@pytest.mark.parametrize("override,error", [
    (lambda a: dict(weight=a["weight"][..., :3]), ValueError),                          # non-square kernel
    (lambda a: dict(images=[a["images"][0][:2]]), ValueError),                          # channel count
    (lambda a: dict(images=[a["images"][0], a["images"][0].half()],
                    resized_sizes=[[(8, 8)], [(8, 8)]]), TypeError),                    # mixed image dtypes
    (lambda a: dict(resized_sizes=[[(8, 0)]]), ValueError),                             # empty resized size
    (lambda a: dict(pos_index=a["pos_index"][:-1]), ValueError),                        # one index per token
    (lambda a: dict(pos_index=a["pos_index"].float()), TypeError),                      # integer index
    (lambda a: dict(res_index=None), ValueError),                                       # table without index
    (lambda a: dict(bias=a["bias"][:-1]), ValueError),                                  # bias length
    (lambda a: dict(tokens=PatchTokens(a["tokens"].image, a["tokens"].scale, a["tokens"].row[:-1],
                                       a["tokens"].col)), ValueError),                  # ragged tokens
])
def test_validation(override, error):
    args = dict(zip(ARG_NAMES, make_case([(8, 8)], [[(8, 8)]], 4, 16, torch.float32, torch.float32)))
    args.update(override(args))
    with pytest.raises(error):
        sparse_patch_embed(**args)


def test_float64_parameters_are_refused_by_triton_and_run_by_auto():
    images = [torch.randn(3, 16, 16)]
    tokens = PatchTokens(*(torch.zeros(1, dtype=torch.long) for _ in range(4)))
    weight, bias = torch.randn(8, 3, 4, 4, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    table = torch.randn(4, 8, dtype=torch.float64)
    args = (images, [[(16, 16)]], tokens, weight, bias, table, torch.zeros(1, dtype=torch.long))
    with use_backend("triton"), pytest.raises(TritonNotSupportedError, match="weight is float64"):
        sparse_patch_embed(*args)
    with use_backend("auto"):  # CPU: the reference either way; on CUDA auto falls back
        torch.testing.assert_close(sparse_patch_embed(*args), sparse_patch_embed_reference(*args))


def test_image_layouts_agree(poisoned):
    """A (B, C, H, W) batch (also channels-last), views of it, crops of one image and separate copies are
    addressed in place or copied once (image_layout) and embed to the same tokens on both backends."""
    gen = torch.Generator().manual_seed(7)
    batch = torch.randn(3, 3, 12, 10, generator=gen)
    sizes = [[(8, 8), (24, 20)]] * 3
    tokens = select_tokens(sizes, 4, gen)
    weight, bias = torch.randn(16, 3, 4, 4, generator=gen) / 4, torch.randn(16, generator=gen)
    table, index = torch.randn(40, 16, generator=gen), torch.randint(0, 40, (len(tokens),), generator=gen)
    args = (sizes, tokens, weight, bias, table, index)
    ref = reference64(list(batch), *args, None, None)
    crops = torch.randn(3, 30, 10, generator=gen)
    crop_list = [crops[:, 0:12], crops[:, 9:21], crops[:, 18:30]]  # overlapping row ranges of one storage
    layouts = {
        "batch": batch, "channels_last": batch.to(memory_format=torch.channels_last),
        "views": list(batch.unbind(0)), "copies": [im.clone() for im in batch],
    }
    for name, images in layouts.items():
        pixels, geometry = image_layout(images, sizes)
        assert (pixels.data_ptr() == batch.data_ptr()) == (name in ("batch", "views")), name
        with use_backend("torch"):
            assert rel_err(sparse_patch_embed(images, *args), ref) < 1e-6, name
        assert rel_err(run_kernel(images, *args), ref) < 1e-6, name
    crop_ref = reference64([c.clone() for c in crop_list], *args, None, None)
    assert image_layout(crop_list, sizes)[0].data_ptr() == crops.data_ptr()
    assert rel_err(run_kernel(crop_list, *args), crop_ref) < 1e-6


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_per_token_position_rows(poisoned, backend):
    """``pos_index=None``: ``pos_table`` is each token's own row; the same tokens as gathering those
    rows through an index, and its gradient is the output's."""
    images, sizes, tokens, weight, bias, table, index, res_table, res_index = make_case(
        MIXED_IMAGES, MIXED_SIZES, 4, 24, torch.float32, torch.float32, seed=3)
    rows = table[index].clone().requires_grad_()
    indexed = table.clone().requires_grad_()
    call = run_triton if backend == "triton" else (lambda fn, *a: fn(*a))
    with use_backend(backend):
        out = call(sparse_patch_embed, images, sizes, tokens, weight, bias, rows, None, res_table, res_index)
        want = call(sparse_patch_embed, images, sizes, tokens, weight, bias, indexed, index, res_table, res_index)
    assert rel_err(out, want) < 1e-6
    grad = torch.randn_like(out)
    (d_rows,) = torch.autograd.grad(out, rows, grad)
    assert torch.equal(d_rows, grad)
    with pytest.raises(ValueError, match=r"a row per token"):
        sparse_patch_embed(images, sizes, tokens, weight, bias, table, None)
