"""Dense baselines (AnyRes, S2, LLaVA-UHD): naive per-crop re-implementations, counts, shapes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ps3 import PS3VisionModel
from ps3.baselines import (
    SequenceGroup,
    UHDResampler,
    anyres_encode,
    anyres_geometry,
    anyres_grid,
    attention_flops,
    count_tokens,
    dense_features,
    llava_uhd_encode,
    llava_uhd_geometry,
    llava_uhd_slices,
    s2_encode,
    s2_forward,
    s2_geometry,
    trunk_pos_embed,
)
from ps3.demo import demo_config, randomize_parameters_
from ps3.vit import PackedSequences

from helpers import tiny_vision_config


@pytest.fixture(scope="module")
def tiny():
    """Scales 56/112/224, patch 14 (16 tokens per 56-px crop), width 32, 2 layers."""
    cfg = tiny_vision_config(hidden_size=32, depth=2, select_based_on_layer=[0, 1])
    return randomize_parameters_(PS3VisionModel(cfg), seed=3).eval().vision_model


def _meta_encoder(**overrides):
    """Real PS3 geometry (378/756/1512/3780, patch 14) on the meta device: shapes, no compute."""
    kwargs = dict(hidden_size=32, depth=1, num_heads=2, select_based_on_layer=[0], ps3_scales=[378, 756, 1512, 3780])
    kwargs.update(overrides)
    with torch.device("meta"):
        return PS3VisionModel(demo_config(**kwargs)).eval().requires_grad_(False).vision_model


def _resize(x, size):
    return F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False)


def _naive_dense(enc, crop):
    """Last layer of ``encode_dense`` on one crop: the model's own dense path."""
    return enc.encode_dense(crop)[0][-1][0]


def _naive_exact(enc, crop):
    """One slice with the pos-embed interpolated straight to its grid, written out by hand."""
    p, g = enc.patch_size, enc.trunk.grid_size
    h, w = crop.shape[-2] // p, crop.shape[-1] // p
    table = enc.trunk.pos_embed.reshape(1, g, g, -1).permute(0, 3, 1, 2)
    pos = F.interpolate(table, size=(h, w), mode="bicubic", antialias=True)[0].flatten(1).T
    tokens = F.conv2d(crop, enc.trunk.patch_embed.proj.weight, enc.trunk.patch_embed.proj.bias, stride=p)[0].flatten(1).T
    out = enc.trunk(tokens + pos, PackedSequences.from_lengths([h * w], crop.device))
    return out.hidden_states[-1]


@torch.no_grad()
def test_dense_features_equals_encode_dense(tiny):
    x = torch.randn(2, 3, 56, 84)
    for layer in (-1, 0):
        hidden, _ = tiny.encode_dense(x)
        torch.testing.assert_close(dense_features(tiny, x, layer=layer), hidden[layer])


def test_pos_modes_agree_on_square_grids_only(tiny):
    torch.testing.assert_close(trunk_pos_embed(tiny, (6, 6), "crop"), trunk_pos_embed(tiny, (6, 6), "exact"))
    assert not torch.allclose(trunk_pos_embed(tiny, (4, 6), "crop"), trunk_pos_embed(tiny, (4, 6), "exact"))
    torch.testing.assert_close(trunk_pos_embed(tiny, (4, 4), "exact"), tiny.trunk.pos_embed[0])


@torch.no_grad()
def test_anyres_equals_naive_crop_loop(tiny):
    s0 = 56
    x = torch.randn(2, 3, 100, 90)
    rows, cols = 2, 3
    out = anyres_encode(tiny, x, (rows, cols))
    for b in range(2):
        img = x[b : b + 1]
        big = _resize(img, (rows * s0, cols * s0))
        expected = [_naive_dense(tiny, _resize(img, (s0, s0)))]
        for r in range(rows):
            for c in range(cols):
                expected.append(_naive_dense(tiny, big[:, :, r * s0 : (r + 1) * s0, c * s0 : (c + 1) * s0]))
        torch.testing.assert_close(out[b], torch.cat(expected))
    torch.testing.assert_close(anyres_encode(tiny, x, resolution=(112, 168)), out)


@torch.no_grad()
def test_s2_equals_naive_crop_loop(tiny):
    x = torch.randn(2, 3, 112, 112)
    scales = [56, 112, 224]
    out = s2_encode(tiny, x, scales)
    t = 4  # 56 px / patch 14
    for b in range(2):
        maps = []
        for s in scales:
            n = s // 56
            img = _resize(x[b : b + 1], (s, s))
            full = torch.zeros(32, n * t, n * t)
            for r in range(n):
                for c in range(n):
                    feats = _naive_dense(tiny, img[:, :, r * 56 : (r + 1) * 56, c * 56 : (c + 1) * 56])
                    full[:, r * t : (r + 1) * t, c * t : (c + 1) * t] = feats.T.reshape(32, t, t)
            maps.append(F.avg_pool2d(full[None], n)[0])
        expected = torch.cat(maps).flatten(1).T
        torch.testing.assert_close(out[b], expected)
    # s2wrapper-style call: scales multiply the input side; feature maps in, maps out
    as_maps = s2_forward(lambda c: dense_features(tiny, c).transpose(1, 2).unflatten(2, (t, t)), x,
                         scales=[0.5, 1, 2], max_split_size=56, output_shape="bchw")
    torch.testing.assert_close(as_maps.flatten(2).transpose(1, 2), out)


@torch.no_grad()
def test_s2_forward_batches_equal_crops_once(tiny):
    calls = []

    def model_fn(crops):
        calls.append(crops.shape[0])
        return dense_features(tiny, crops)

    s2_forward(model_fn, torch.randn(3, 3, 56, 56), img_sizes=[56, 112, 224])
    assert calls == [3 * (1 + 4 + 16)]
    calls.clear()
    s2_forward(model_fn, torch.randn(1, 3, 56, 56), img_sizes=[56, 112], max_split_size=112)
    assert sorted(calls) == [1, 1]  # 56-px and 112-px crops are different shapes


# ---------------------------------------------------------------- s2wrapper drop-in


class CropEncoder(torch.nn.Module):
    """A per-crop encoder whose features depend on the whole crop (like a ViT's): patch conv,
    then each token mixed with the crop's mean token; optionally a class token in front
    (``"bnc"``) or a feature map (``"bchw"``)."""

    def __init__(self, in_channels=3, dim=6, patch=8, class_token=False, layout="bnc"):
        super().__init__()
        gen = torch.Generator().manual_seed(in_channels * 10 + dim)
        self.weight = torch.nn.Parameter(torch.randn(dim, in_channels, patch, patch, generator=gen) / patch)
        self.mix = torch.nn.Parameter(torch.randn(dim, dim, generator=gen) / dim**0.5)
        self.patch, self.class_token, self.layout = patch, class_token, layout

    def forward(self, crops):
        maps = F.conv2d(crops, self.weight, stride=self.patch)
        tokens = maps.flatten(2).transpose(1, 2)
        tokens = tokens + torch.tanh(tokens.mean(1, keepdim=True) @ self.mix)
        if self.layout == "bchw":
            return tokens.transpose(1, 2).reshape(maps.shape)
        if self.class_token:
            tokens = torch.cat([tokens.square().mean(1, keepdim=True), tokens], dim=1)
        return tokens


def s2wrapper_reference(model, x, sizes, split, out_idx=0, prefix=0, layout="bnc"):
    """s2wrapper's math spelled out: per scale resize (bicubic, fp32), encode every crop
    position for the whole batch, place the crops' features on the scale's grid, area-resize
    to the grid of scale ``out_idx``, concatenate channels; prefix tokens are averaged over a
    scale's crops and put in front."""
    B = x.shape[0]
    grids, prefixes = [], []
    for size in sizes:
        n = math.ceil(size / split)
        c = size // n
        img = F.interpolate(x.float(), size=(size, size), mode="bicubic").to(x.dtype)
        rows, prefix_sum = [], 0
        for i in range(n):
            row = []
            for j in range(n):
                out = model(img[:, :, i * c : (i + 1) * c, j * c : (j + 1) * c])
                if layout == "bnc":
                    prefix_sum = prefix_sum + out[:, :prefix]
                    tokens = out[:, prefix:]
                    g = math.isqrt(tokens.shape[1])
                    out = tokens.transpose(1, 2).reshape(B, -1, g, g)
                row.append(out)
            rows.append(torch.cat(row, dim=3))
        grids.append(torch.cat(rows, dim=2))
        prefixes.append(prefix_sum / (n * n))
    side = grids[out_idx].shape[-1]
    merged = torch.cat([F.interpolate(g.float(), size=(side, side), mode="area").to(g.dtype) for g in grids], dim=1)
    if layout == "bchw":
        return merged
    merged = merged.flatten(2).transpose(1, 2)
    return torch.cat([torch.cat(prefixes, dim=-1), merged], dim=1) if prefix else merged


S2_SETTINGS = [  # input side, s2_forward kwargs, the pixel sizes and split they mean
    (32, dict(scales=[1]), [32], 32),
    (32, dict(scales=[1, 2]), [32, 64], 32),
    (64, dict(scales=[0.5, 1, 2]), [32, 64, 128], 64),
    (32, dict(scales=[1, 2, 3], resize_output_to_idx=-1), [32, 64, 96], 32),
    (32, dict(scales=[1, 2], max_split_size=16), [32, 64], 16),
    (40, dict(img_sizes=[16, 48, 64], max_split_size=32, resize_output_to_idx=1), [16, 48, 64], 32),
]


@pytest.mark.parametrize("side, kwargs, sizes, split", S2_SETTINGS)
def test_s2_forward_is_s2wrappers_math(side, kwargs, sizes, split):
    for (layout, prefix), batch, split_forward in itertools.product(
        [("bnc", 0), ("bnc", 1), ("bchw", 0)], [1, 3], [False, True]
    ):
        model = CropEncoder(class_token=prefix > 0, layout=layout)
        x = torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            got = s2_forward(model, x, **kwargs, num_prefix_token=prefix, output_shape=layout, split_forward=split_forward)
            ref = s2wrapper_reference(model, x, sizes, split, kwargs.get("resize_output_to_idx", 0), prefix, layout)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, msg=f"{layout} prefix={prefix} B={batch} split_forward={split_forward}")


def test_s2_forward_signature_is_s2wrappers():
    import inspect

    params = inspect.signature(s2_forward).parameters
    expected = [("model", inspect.Parameter.empty), ("input", inspect.Parameter.empty), ("scales", None),
                ("img_sizes", None), ("max_split_size", None), ("resize_output_to_idx", 0), ("num_prefix_token", 0),
                ("output_shape", "bnc"), ("split_forward", False)]
    assert [(name, p.default) for name, p in params.items()] == expected
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params.values())


@torch.no_grad()
def test_s2_forward_defaults_and_argument_forms():
    model = CropEncoder()
    x = torch.randn(2, 3, 64, 64)
    # max_split_size defaults to the input's own side (not the smallest scale)
    default = s2_forward(model, x, [0.5, 1, 2])  # positional, as s2wrapper is called
    torch.testing.assert_close(default, s2wrapper_reference(model, x, [32, 64, 128], 64))
    assert not torch.allclose(default, s2wrapper_reference(model, x, [32, 64, 128], 32))
    # img_sizes wins when both are given; numpy integers are sizes
    torch.testing.assert_close(s2_forward(model, x, scales=[1, 2], img_sizes=[32, 96]), s2_forward(model, x, img_sizes=[32, 96]))
    np_sizes = s2_forward(model, x, img_sizes=np.array([32, 64]), max_split_size=np.int64(32), resize_output_to_idx=np.int64(0))
    torch.testing.assert_close(np_sizes, s2_forward(model, x, img_sizes=[32, 64], max_split_size=32))
    torch.testing.assert_close(s2_forward(model, x, scales=np.array([0.5, 1.0])), s2_forward(model, x, img_sizes=[32, 64]))
    # any channel count
    for channels in (1, 4):
        other = CropEncoder(in_channels=channels)
        y = torch.randn(2, channels, 32, 32)
        torch.testing.assert_close(s2_forward(other, y, [1, 2]), s2wrapper_reference(other, y, [32, 64], 32))


def test_s2_forward_split_forward_bounds_each_call():
    calls = []

    def model(crops):
        calls.append(crops.shape[0])
        return CropEncoder()(crops)

    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        grouped = s2_forward(model, x, [1, 2, 3])
        assert calls == [3 * (1 + 4 + 9)]  # equal-size crops of every scale in one call
        calls.clear()
        split = s2_forward(model, x, [1, 2, 3], split_forward=True)
    assert calls == [3] * (1 + 4 + 9)  # one crop position of the batch per call
    torch.testing.assert_close(split, grouped)


def test_s2_forward_bad_arguments():
    model, x = CropEncoder(), torch.randn(1, 3, 32, 32)
    with pytest.raises(ValueError, match="scales .* or img_sizes"):
        s2_forward(model, x)
    with pytest.raises(ValueError, match="num_prefix_token"):
        s2_forward(model, x, [1], num_prefix_token=1, output_shape="bchw")
    with pytest.raises(ValueError, match="needs max_split_size"):
        s2_forward(model, torch.randn(1, 3, 32, 48), img_sizes=[32, 64])
    with pytest.raises(TypeError, match="img_sizes must be an int"):
        s2_forward(model, x, img_sizes=[32.5])
    with pytest.raises(ValueError, match="resize_output_to_idx"):
        s2_forward(model, x, [1, 2], resize_output_to_idx=2)
    with pytest.raises(TypeError, match="split_forward"):
        s2_forward(model, x, [1], split_forward="yes")
    with pytest.raises(ValueError, match="equal crops"):
        s2_forward(model, x, img_sizes=[32, 63], max_split_size=32)
    with pytest.raises(ValueError, match="square grid"):
        s2_forward(model, x, [1], num_prefix_token=2)


@pytest.mark.parametrize(
    "H, W, max_slices, expected",
    [
        (1512, 1512, None, (4, 4)),
        (3780, 3780, None, (10, 10)),
        (378, 378, None, (1, 1)),
        (300, 200, None, (1, 1)),
        (378, 1512, None, (1, 4)),
        (1512, 378, None, (4, 1)),
        (1512, 1512, 6, (2, 3)),
        (672, 1088, 6, (2, 3)),
    ],
)
def test_llava_uhd_slices(H, W, max_slices, expected):
    assert llava_uhd_slices(H, W, 378, max_slices) == expected


@torch.no_grad()
@pytest.mark.parametrize("pos_mode", ["exact", "crop"])
def test_llava_uhd_equals_naive_slice_loop(tiny, pos_mode):
    x = torch.randn(2, 3, 70, 140)
    layout = llava_uhd_geometry(70, 140, 56, 14)
    assert (layout.rows, layout.cols, layout.slice_grid, layout.overview_grid) == (1, 3, (5, 3), (3, 6))
    out = llava_uhd_encode(tiny, x, pos_mode=pos_mode)
    encode = _naive_exact if pos_mode == "exact" else _naive_dense
    sh, sw = 5 * 14, 3 * 14
    for b in range(2):
        img = x[b : b + 1]
        expected = [encode(tiny, _resize(img, (3 * 14, 6 * 14)))]
        big = _resize(img, (sh, 3 * sw))
        for c in range(3):
            expected.append(encode(tiny, big[:, :, :, c * sw : (c + 1) * sw]))
        torch.testing.assert_close(out[b], torch.cat(expected))
    other = llava_uhd_encode(tiny, x, pos_mode="crop" if pos_mode == "exact" else "exact")
    assert not torch.allclose(out, other)  # 5x3 slices: the two pos-embed rules differ


@torch.no_grad()
def test_uhd_resampler_compresses_every_slice(tiny):
    resampler = UHDResampler(32, num_queries=5, num_heads=2, out_dim=48)
    assert resampler(torch.randn(4, 15, 32), (5, 3)).shape == (4, 5, 48)
    out = llava_uhd_encode(tiny, torch.randn(2, 3, 70, 140), resampler=resampler)
    assert out.shape == (2, (1 + 3) * 5, 48)
    with pytest.raises(ValueError):
        resampler(torch.randn(4, 16, 32), (5, 3))


def test_token_counts_at_ps3_geometry():
    t = 729
    assert anyres_grid(378, resolution=1512) == (4, 4)
    assert count_tokens(anyres_geometry(378, 14, (4, 4))) == 17 * t
    assert count_tokens(anyres_geometry(378, 14, anyres_grid(378, resolution=3780))) == 101 * t
    assert count_tokens(s2_geometry([378, 756, 1512], 14)) == 21 * t
    assert [g.count for g in s2_geometry([378, 756, 1512, 3780], 14)] == [1, 4, 16, 100]
    assert count_tokens(s2_geometry([378, 756, 1512, 3780], 14)) == 121 * t
    assert count_tokens(llava_uhd_geometry(3780, 3780, 378, 14).groups()) == 101 * t
    assert attention_flops([SequenceGroup(2, 3)], width=8, depth=5, prefix=4) == 5 * 2 * 4 * 3 * 7 * 8


@torch.no_grad()
def test_output_shapes_at_1512_run_on_cpu():
    model = PS3VisionModel(demo_config(hidden_size=16, depth=1, num_heads=2, select_based_on_layer=[0]))
    enc = randomize_parameters_(model).eval().vision_model
    x = torch.randn(1, 3, 1512, 1512)
    assert anyres_encode(enc, x, resolution=1512).shape == (1, 17 * 729, 16)
    assert s2_encode(enc, x, [378, 756, 1512]).shape == (1, 729, 48)


@torch.no_grad()
def test_output_shapes_at_3780_on_meta():
    enc = _meta_encoder()
    x = torch.empty(2, 3, 3780, 3780, device="meta")
    assert anyres_encode(enc, x, resolution=3780).shape == (2, 101 * 729, 32)
    assert s2_encode(enc, x, [378, 756, 1512, 3780]).shape == (2, 729, 128)
    assert llava_uhd_encode(enc, x).shape == (2, 101 * 729, 32)
    assert llava_uhd_encode(enc, torch.empty(1, 3, 2000, 3000, device="meta"), max_slices=6).shape[1] == count_tokens(
        llava_uhd_geometry(2000, 3000, 378, 14, 6).groups()
    )


def test_bad_arguments(tiny):
    x = torch.randn(1, 3, 56, 56)
    with pytest.raises(ValueError, match="exactly one"):
        anyres_encode(tiny, x, (1, 1), resolution=56)
    with pytest.raises(ValueError, match="multiple"):
        anyres_encode(tiny, x, resolution=100)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        anyres_encode(tiny, x[0], (1, 1))
    with pytest.raises(TypeError):
        anyres_encode(tiny, x.numpy(), (1, 1))
    with pytest.raises(TypeError, match="PS3VisionEncoder"):
        anyres_encode(torch.nn.Linear(1, 1), x, (1, 1))
    with pytest.raises(ValueError, match="equal crops"):
        s2_encode(tiny, x, [56, 105])
    with pytest.raises(ValueError, match="pos_mode"):
        llava_uhd_encode(tiny, x, pos_mode="nearest")
    with pytest.raises(ValueError, match="layer"):
        dense_features(tiny, x, layer=2)
    with pytest.raises(ValueError, match="patch"):
        dense_features(tiny, torch.randn(1, 3, 50, 56))
    with pytest.raises(ValueError, match="max_slices"):
        llava_uhd_slices(100, 100, 56, max_slices=0)
    with pytest.raises(ValueError, match="square grid"):
        s2_forward(lambda c: torch.zeros(c.shape[0], 5, 2), x, img_sizes=[56])
