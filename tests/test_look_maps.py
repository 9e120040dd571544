"""``output_look_maps``: which look selected each patch (what ps3-encode's figure outlines)."""

from __future__ import annotations

import pytest
import torch

from ps3 import PS3VisionModel
from ps3.demo import randomize_parameters_
from ps3.selection_plan import plan_looks

from helpers import tiny_vision_config


@pytest.fixture(scope="module")
def model():
    """No high-res saliency branch: it costs most of a forward at this size and the looks do not depend on it."""
    return randomize_parameters_(PS3VisionModel(tiny_vision_config(highres_selection_feature=False)), seed=3).eval()


def images(*sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=g) for h, w in sizes]


@torch.no_grad()
@pytest.mark.parametrize("looks", [dict(num_look_close=3), dict(num_look_close="all"), dict(num_token_look_close=50)])
def test_look_maps_split_the_union_into_the_looks_run_one_by_one(model, looks):
    """Look l's patches are exactly what num_look_close=l+1 adds to num_look_close=l, and each
    look takes its planned quota from each scale."""
    x = torch.stack(images((224, 224), (224, 224)))
    out = model(x, output_look_maps=True, **looks)
    encoder = model.vision_model
    grids = [encoder.feature_size_scale_i(x, s) for s in (1, 2)]
    plan = plan_looks([h * w for h, w in grids], encoder.max_select_num_each_scale, looks.get("num_look_close"),
                      looks.get("num_token_look_close"))
    assert len(plan) >= 2
    for s, (look_map, union) in enumerate(zip(out.look_maps, out.selection_maps)):
        assert look_map.dtype == torch.long and look_map.shape == union.shape
        assert torch.equal(look_map >= 0, union.bool())
        for look, quotas in enumerate(plan):
            assert (look_map == look).flatten(1).sum(1).tolist() == [quotas[s]] * 2
    full_looks = len(plan) if "num_look_close" in looks else len(plan) - 1  # a token budget's last look is partial
    for k in range(1, full_looks + 1):
        first_k = model(x, num_look_close=k)
        for look_map, union in zip(out.look_maps, first_k.selection_maps):
            assert torch.equal((look_map >= 0) & (look_map < k), union.bool()), k


@torch.no_grad()
def test_off_by_default_and_other_outputs_unchanged(model):
    x = torch.stack(images((224, 224)))
    plain = model(x, num_look_close=2)
    with_looks = model(x, num_look_close=2, output_look_maps=True)
    assert plain.look_maps is None and len(plain.to_tuple()) == len(with_looks.to_tuple()) - 1
    for a, b in zip(plain.to_tuple(), with_looks.to_tuple()):
        for u, v in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
            assert torch.equal(u, v)


@torch.no_grad()
def test_list_input_gives_each_image_its_own_maps(model):
    ims = images((224, 168), (140, 224), (224, 224), seed=1)
    out = model(ims, num_look_close=2, output_look_maps=True)
    for im, maps in zip(ims, out.look_maps):
        alone = model(im[None], num_look_close=2, output_look_maps=True)
        assert len(maps) == 2 and all(torch.equal(a, b) for a, b in zip(maps, alone.look_maps))


@torch.no_grad()
def test_pooled_mode_no_look_and_bad_flag(model):
    x = torch.stack(images((224, 224)))
    pooled = model(x, output_hidden_states=False, output_look_maps=True)
    assert all(torch.equal(m >= 0, u.bool()) and int(m.max()) == 0 for m, u in zip(pooled.look_maps, pooled.selection_maps))
    assert model(x, num_look_close=0, output_look_maps=True).look_maps is None
    with pytest.raises(TypeError, match="output_look_maps"):
        model(x, num_look_close=1, output_look_maps=1)
