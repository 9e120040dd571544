"""Model behaviour beyond the upstream fixtures: mixed-size batches, dtypes, loading, errors."""

from __future__ import annotations

import random

import pytest
import torch

from ps3 import PS3VisionConfig, PS3VisionModel
from ps3.demo import randomize_parameters_
from ps3_kernels import use_backend

from helpers import rel_err, tiny_vision_config


@pytest.fixture(scope="module")
def model():
    return randomize_parameters_(PS3VisionModel(tiny_vision_config()), seed=1).eval()


def images(*sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=gen) for h, w in sizes]


@pytest.mark.parametrize("kwargs", [
    dict(num_look_close=2),
    dict(num_look_close="all"),
    dict(num_token_look_close=[7, 30, 1]),
    dict(num_look_close=1, only_select_first_n_scale=[1, 2, 1]),
])
def test_mixed_size_list_equals_each_image_alone(model, kwargs):
    ims = images((240, 200), (120, 300), (224, 224))
    with torch.no_grad(), use_backend("torch"):
        packed = model(ims, **kwargs)
        for b, im in enumerate(ims):
            one = {k: (v[b] if isinstance(v, list) else v) for k, v in kwargs.items()}
            if "only_select_first_n_scale" in one:
                one["only_select_first_n_scale"] = [one["only_select_first_n_scale"]]
            alone = model(im[None], **one)
            assert rel_err(packed.last_hidden_state[b], alone.last_hidden_state) < 1e-5
            for got, ref in zip(packed.hidden_states[b], alone.hidden_states):
                assert rel_err(got, ref) < 1e-5
            for got, ref in zip(packed.selection_maps[b], alone.selection_maps):
                assert torch.equal(got, ref)
            for got, ref in zip(packed.selection_probs[b], alone.selection_probs):
                assert rel_err(got, ref) < 1e-6  # batch size changes matmul rounding only


def _alone_kwargs(kwargs: dict, b: int) -> dict:
    """Arguments of image ``b`` encoded alone, from the arguments of a list call."""
    one = {}
    for key, value in kwargs.items():
        if key == "prompt":
            one[key] = value[b : b + 1]
        elif key == "gt_selection_maps":
            one[key] = value[b][None]
        elif key == "only_select_first_n_scale":
            one[key] = [value[b]]
        elif key == "is_global_text":
            one[key] = value[b : b + 1]
        else:
            one[key] = value[b] if isinstance(value, list) else value
    return one


def assert_list_equals_each_alone(model, ims, kwargs):
    with torch.no_grad(), use_backend("torch"):
        packed = model(ims, **kwargs)
        for b, im in enumerate(ims):
            alone = model(im[None], **_alone_kwargs(kwargs, b))
            where = f"image {b} {tuple(im.shape[1:])} of {[tuple(i.shape[1:]) for i in ims]}, {sorted(kwargs)}"
            if alone.pooled_output is not None:
                assert rel_err(packed.pooled_output[b], alone.pooled_output) < 1e-5, where
            else:
                for got, ref in zip(packed.hidden_states[b], alone.hidden_states):
                    assert rel_err(got, ref) < 1e-5, where
            for got, ref in zip(packed.selection_maps[b] or [], alone.selection_maps or []):
                assert torch.equal(got, ref), where
            for got, ref in zip(packed.selection_probs[b], alone.selection_probs):
                assert rel_err(got, ref) < 1e-6, where


@pytest.mark.parametrize("trial", range(6))
def test_list_of_random_sizes_and_orientations_equals_each_alone(model, trial):
    """Fuzz: random sizes, both orientations (often the transposed twin of another image, which
    has the same patch count per scale), random selection arguments."""
    rng = random.Random(1000 + trial)
    sizes = []
    for _ in range(rng.randint(2, 4)):
        if sizes and rng.random() < 0.4:
            h, w = rng.choice(sizes)
            sizes.append((w, h))
        else:
            long_side, short_side = rng.randint(56, 300), rng.randint(8, 300)
            sizes.append((long_side, short_side) if rng.random() < 0.5 else (short_side, long_side))
    ims = images(*sizes, seed=trial)
    B = len(ims)
    gen = torch.Generator().manual_seed(trial)
    kwargs = {}
    mode = ["looks", "tokens", "first_n", "pooled"][trial % 4]
    if mode == "looks":
        kwargs["num_look_close"] = rng.choice([0, 1, 2, "all"])
    elif mode == "tokens":
        kwargs["num_token_look_close"] = [rng.randint(0, 60) for _ in range(B)]
    elif mode == "first_n":
        kwargs.update(num_look_close=rng.randint(1, 3), only_select_first_n_scale=[rng.randint(1, 2) for _ in range(B)])
    else:
        kwargs.update(output_hidden_states=False, is_global_text=torch.rand(B, 1, generator=gen) < 0.5)
    if rng.random() < 0.5:
        kwargs["prompt"] = torch.randn(B, 64, generator=gen)
    if rng.random() < 0.5:
        kwargs["gt_selection_maps"] = [(torch.rand(rng.randint(1, 12), rng.randint(1, 12), generator=gen) < 0.3).float() for _ in range(B)]
    if mode != "pooled" and rng.random() < 0.3:
        kwargs["smooth_selection_prob"] = True
    assert_list_equals_each_alone(model, ims, kwargs)


def test_transposed_photos_on_ps3_1_5k_geometry():
    """1512x1134 and 1134x1512 have equal patch counts per scale with transposed grids."""
    from ps3.demo import demo_model

    ps3_1_5k = demo_model(seed=2, depth=2, select_based_on_layer=[0, 1])
    ims = images((1512, 1134), (1134, 1512), (1134, 1512), seed=13)
    assert_list_equals_each_alone(ps3_1_5k, ims, dict(num_look_close=1))


def test_list_of_same_size_matches_batch_tensor(model):
    x = torch.stack(images((200, 240), (200, 240), seed=3))
    prompt = torch.randn(2, 64)
    with torch.no_grad():
        batch = model(x, num_look_close=2, prompt=prompt)
        listed = model(list(x), num_look_close=2, prompt=prompt)
    for b in range(2):
        assert rel_err(listed.last_hidden_state[b], batch.last_hidden_state[b : b + 1]) < 1e-6


def test_pooled_mode_with_mixed_sizes(model):
    ims = images((240, 200), (224, 224))
    with torch.no_grad():
        packed = model(ims, output_hidden_states=False, is_global_text=torch.tensor([False, True]))
        alone = model(ims[0][None], output_hidden_states=False)
    assert rel_err(packed.pooled_output[0], alone.pooled_output) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_fp32(model, dtype):
    x = torch.stack(images((224, 224), (224, 224), seed=5))
    with torch.no_grad():
        ref = model(x, num_look_close=1)
        low = model.to(dtype)(x.to(dtype), num_look_close=1)
    model.float()
    assert low.last_hidden_state.dtype == dtype
    assert torch.isfinite(low.last_hidden_state).all()
    # Selections can differ where probabilities are near-ties; the low-res tokens cannot.
    assert rel_err(low.last_hidden_state[:, :16], ref.last_hidden_state[:, :16]) < 5e-2


def test_look_counts_and_feature_maps(model):
    x = torch.stack(images((224, 224), (224, 224), seed=6))
    enc = model.vision_model
    with torch.no_grad():
        out = model(x, num_look_close="all")
    assert out.last_hidden_state.shape[1] == 16 + 64 + 256
    assert all(bool(m.all()) for m in out.selection_maps)
    maps = enc.format_features_into_feature_maps(out.last_hidden_state, out.selection_maps)
    assert [tuple(m.shape) for m in maps] == [(2, 64, 4, 4), (2, 64, 8, 8), (2, 64, 16, 16)]
    assert torch.equal(maps[0].flatten(2).transpose(1, 2), out.last_hidden_state[:, :16])


def test_save_and_load_round_trip(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = PS3VisionModel.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    x = torch.stack(images((224, 224), seed=7))
    with torch.no_grad():
        assert torch.equal(model(x, num_look_close=1).last_hidden_state, loaded(x, num_look_close=1).last_hidden_state)
    assert PS3VisionModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_loading_mismatched_checkpoint_lists_the_weights(model, tmp_path):
    model.save_pretrained(tmp_path)
    other = tiny_vision_config(separate_pos_emb=False, highres_selection_feature=False)
    other.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="pos_emb_residual"):
        PS3VisionModel.from_pretrained(tmp_path)


def test_auto_classes_resolve(model, tmp_path):
    from transformers import AutoConfig, AutoModel

    model.save_pretrained(tmp_path)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PS3VisionConfig)
    assert isinstance(AutoModel.from_pretrained(tmp_path), PS3VisionModel)


def test_caller_tensors_not_mutated(model):
    x = torch.stack(images((224, 224), (224, 224), seed=8))
    gt = torch.zeros(2, 10, 10)
    gt[:, :3, :3] = 1
    prompt = torch.randn(2, 64)
    copies = [t.clone() for t in (x, gt, prompt)]
    with torch.no_grad():
        model(x, output_hidden_states=False, gt_selection_maps=gt, pool_gt_token_only=True, prompt=prompt)
    for t, c in zip((x, gt, prompt), copies):
        assert torch.equal(t, c)


def test_gradients_flow_to_all_trunk_parameters(model):
    x = torch.stack(images((224, 224), seed=9))
    model.train()
    try:
        out = model(x, num_look_close=1)
        out.last_hidden_state.square().mean().backward()
    finally:
        model.eval()
    grads = {n: p.grad for n, p in model.named_parameters() if n.startswith("vision_model.trunk.blocks")}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    model.zero_grad(set_to_none=True)


BAD_INPUTS = [
    (dict(pixel_values=torch.randn(3, 224, 224)), ValueError, "pixel_values"),
    (dict(pixel_values=torch.randn(1, 4, 224, 224)), ValueError, "3 channels"),
    (dict(pixel_values=torch.randn(1, 3, 40, 40)), ValueError, "low-res scale"),
    (dict(pixel_values=torch.zeros(1, 3, 224, 224, dtype=torch.uint8)), TypeError, "floating point"),
    (dict(prompt=torch.randn(1, 63)), ValueError, "prompt"),
    (dict(prompt=torch.randn(2, 64)), ValueError, "prompt"),
    (dict(num_look_close=-1), ValueError, "num_look_close"),
    (dict(num_look_close=1.5), ValueError, "num_look_close"),
    (dict(num_look_close="some"), ValueError, "num_look_close"),
    (dict(num_look_close=1, num_token_look_close=5), ValueError, "only one"),
    (dict(num_look_close=None), ValueError, "num_look_close or num_token_look_close"),
    (dict(gt_selection_maps=torch.ones(1, 1, 8, 8)), ValueError, "gt_selection_maps"),
    (dict(only_select_first_n_scale=3), ValueError, "only_select_first_n_scale"),
    (dict(num_token_look_close=[1, 2]), ValueError, "num_token_look_close"),
    (dict(output_hidden_states=False, num_look_close=1), ValueError, "pre-training"),
    (dict(pixel_values="image.png"), TypeError, "pixel_values"),
    # Switches take bools only: 0.5 or 'false' must not silently mean True.
    (dict(smooth_selection_prob=0.5), TypeError, "smooth_selection_prob"),
    (dict(smooth_selection_prob="false"), TypeError, "smooth_selection_prob"),
    (dict(output_hidden_states="false"), TypeError, "output_hidden_states"),
    (dict(output_hidden_states=1), TypeError, "output_hidden_states"),
    (dict(num_look_close=None, output_hidden_states=False, pool_gt_token_only=1, gt_selection_maps=torch.ones(1, 4, 4)),
     TypeError, "pool_gt_token_only"),
    (dict(num_look_close=None, output_hidden_states=False, is_global_text=torch.tensor([[0.5]])), ValueError,
     r"is_global_text must hold only 0 and 1 .* got is_global_text\[0\]=0.5"),
    (dict(num_look_close=None, output_hidden_states=False, is_global_text=torch.tensor([[2]])), ValueError, "only 0 and 1"),
    (dict(num_look_close=None, output_hidden_states=False, is_global_text=torch.tensor([[1j]])), ValueError, "is_global_text"),
    (dict(num_look_close=None, output_hidden_states=False, is_global_text=torch.ones(1, 2)), ValueError,
     r"shape \(B,\) or \(B, 1\) with B=1, got \(1, 2\)"),
    (dict(num_look_close=None, output_hidden_states=False, is_global_text=True), ValueError, "is_global_text"),
    (dict(num_look_close=None, output_hidden_states=False, is_global_text=[1]), ValueError, "is_global_text"),
    (dict(num_look_close=None, output_hidden_states=False, is_global_text=torch.ones(1, 1, dtype=torch.bool, device="meta")),
     ValueError, "is_global_text is on meta"),
    (dict(prompt=torch.ones(1, 64, dtype=torch.long)), TypeError, "prompt must be a floating-point"),
    (dict(prompt=torch.ones(1, 64, device="meta")), ValueError, "prompt is on meta"),
    (dict(gt_selection_maps=torch.ones(1, 4, 4, device="meta")), ValueError, "gt_selection_maps is on meta"),
    (dict(gt_selection_maps=torch.ones(1, 0, 4)), ValueError, "gt_selection_maps.0. is empty"),
    (dict(gt_selection_maps=[torch.ones(4, 0)]), ValueError, "gt_selection_maps.0. is empty"),
]


@pytest.mark.parametrize("kwargs, error, match", BAD_INPUTS)
def test_bad_input_raises_clear_errors(model, kwargs, error, match):
    call = dict(pixel_values=torch.randn(1, 3, 224, 224), num_look_close=1)
    call.update(kwargs)
    with pytest.raises(error, match=match):
        model(**call)


def test_upstream_switch_and_mask_types_still_work(model):
    x = torch.stack(images((224, 224), (224, 224), seed=14))
    gt = torch.zeros(2, 6, 6, dtype=torch.bool)
    gt[:, :2, :3] = True
    import numpy as np

    with torch.no_grad():
        ref = model(x, output_hidden_states=False, is_global_text=torch.tensor([[True], [False]]))
        flat = model(x, output_hidden_states=np.bool_(False), is_global_text=torch.tensor([True, False]))
        assert torch.equal(ref.pooled_output, flat.pooled_output)
        model(x, output_hidden_states=False, pool_gt_token_only=True, gt_selection_maps=gt)
        model(x, num_look_close=1, smooth_selection_prob=np.bool_(True), prompt=torch.randn(2, 64).half().float())


@pytest.mark.parametrize("mask", [torch.tensor([[1], [0]]), torch.tensor([1.0, 0.0]),
                                  torch.tensor([1, 0], dtype=torch.uint8), torch.tensor([[1.0], [0.0]], dtype=torch.float64)])
def test_is_global_text_takes_upstreams_0_1_masks(model, mask):
    """Upstream multiplies by ``is_global_text``, so 0/1 integer and floating masks work there too."""
    x = torch.stack(images((224, 224), (224, 224), seed=16))
    with torch.no_grad():
        ref = model(x, output_hidden_states=False, is_global_text=torch.tensor([True, False])).pooled_output
        assert torch.equal(model(x, output_hidden_states=False, is_global_text=mask).pooled_output, ref)


def test_is_global_text_values_on_a_device_are_checked_in_checked_mode(model, monkeypatch):
    """Reading a GPU mask's values would sync: like the ops' metadata, it is checked only in
    checked mode; unchecked, any non-zero entry counts as 1."""
    import ps3_kernels.backend as backend

    monkeypatch.setattr(backend, "host_readable", lambda t: False)
    x = torch.stack(images((224, 224), (224, 224), seed=17))
    half = torch.tensor([0.5, 0.0])
    with torch.no_grad():
        got = model(x, output_hidden_states=False, is_global_text=half).pooled_output
        assert torch.equal(got, model(x, output_hidden_states=False, is_global_text=half != 0).pooled_output)
        monkeypatch.setenv("PS3_KERNELS_CHECKED", "1")
        with pytest.raises(ValueError, match="only 0 and 1"):
            model(x, output_hidden_states=False, is_global_text=half)


def test_format_features_into_feature_maps_rejects_mismatched_inputs(model):
    x = torch.stack(images((224, 224), (224, 224), seed=15))
    enc = model.vision_model
    with torch.no_grad():
        out = model(x, num_look_close=1)
    with pytest.raises(ValueError, match=r"selection_maps\[0\] must be a \(B=1"):
        enc.format_features_into_feature_maps(out.last_hidden_state[:1], out.selection_maps)
    with pytest.raises(ValueError, match="2 .B, h, w. tensors"):
        enc.format_features_into_feature_maps(out.last_hidden_state, out.selection_maps[:1])
    with pytest.raises(ValueError, match="features must be a .B, N, C. tensor"):
        enc.format_features_into_feature_maps(out.last_hidden_state[0], out.selection_maps)
    with pytest.raises(ValueError, match="is on meta"):
        enc.format_features_into_feature_maps(out.last_hidden_state, [m.to("meta") for m in out.selection_maps])
    with pytest.raises(ValueError, match="tokens per image"):
        enc.format_features_into_feature_maps(out.last_hidden_state[:, :-1], out.selection_maps)


@pytest.mark.parametrize("field, value", [
    ("num_heads", 0), ("num_heads", 2.5), ("depth", 0), ("hidden_size", -64), ("hidden_size", True),
    ("mlp_ratio", 0), ("mlp_ratio", "4"), ("patch_size", 0), ("img_size", 0), ("img_size", 10),
])
def test_bad_trunk_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"config.{'img_size' if field == 'img_size' else field}"):
        PS3VisionModel(tiny_vision_config(**{field: value}))


def test_unknown_trunk_without_fields_is_rejected():
    with pytest.raises(ValueError, match="depth"):
        PS3VisionModel(PS3VisionConfig(model_name="not_a_trunk", ps3_scales=[56, 112]))


def test_known_trunk_shapes_on_meta_device():
    with torch.device("meta"):
        m = PS3VisionModel(PS3VisionConfig(model_name="vit_so400m_patch14_siglip_384", ps3_scales=[378, 756, 1512, 3780], max_select_num=2560))
    enc = m.vision_model
    assert (enc.width, enc.layers, enc.low_res_token_num) == (1152, 27, 729)
    assert enc.max_select_num_each_scale == [85, 341, 2134]
    assert enc.trunk.blocks[0].attn.qkv.weight.shape == (3456, 1152)
    assert enc.trunk.blocks[0].mlp.fc1.weight.shape == (4304, 1152)


def test_towers_load_from_a_combined_ps3_checkpoint(tmp_path):
    from ps3 import PS3Config, PS3Model, PS3TextConfig, PS3TextModel

    text = PS3TextConfig(width=32, heads=2, layers=1, context_length=8, vocab_size=50, output_dim=64, prompt_proj_dim=64)
    full = randomize_parameters_(PS3Model(PS3Config(text_config=text.to_dict(), vision_config=tiny_vision_config().to_dict())))
    full.save_pretrained(tmp_path)
    vision = PS3VisionModel.from_pretrained(tmp_path).eval()
    text_model = PS3TextModel.from_pretrained(tmp_path).eval()
    x = torch.stack(images((224, 224), seed=10))
    ids = torch.tensor([[3, 7, 9, 2, 0, 0, 0, 0]])
    with torch.no_grad():
        assert torch.equal(vision(x, num_look_close=1).last_hidden_state, full.eval().encode_image(x, num_look_close=1).last_hidden_state)
        assert rel_err(text_model(ids).prompt, full.encode_text(ids).prompt) < 1e-6


@pytest.mark.parametrize("switch", ["transformers", "timm"])
def test_gradient_checkpointing_gives_the_same_gradients(switch):
    """Both switches: transformers' ``gradient_checkpointing_enable`` and timm's
    ``trunk.set_grad_checkpointing(enable=True)``, which VILA calls for ``ps3_grad_checkpointing``."""
    def grads(checkpointing: bool):
        model = randomize_parameters_(PS3VisionModel(tiny_vision_config()), seed=4).train()
        if checkpointing and switch == "timm":
            model.vision_model.trunk.set_grad_checkpointing(enable=True)
        elif checkpointing:
            model.gradient_checkpointing_enable()
        assert model.vision_model.trunk.grad_checkpointing == checkpointing
        calls = []
        for block in model.vision_model.trunk.blocks:
            block.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation may stop early
        x = torch.stack(images((224, 200), seed=11))
        out = model(x, num_look_close=2).last_hidden_state
        forward_calls = len(calls)
        out.square().mean().backward()
        recomputed = len(calls) - forward_calls
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, recomputed

    (plain, plain_recomputed), (checkpointed, recomputed) = grads(False), grads(True)
    assert plain_recomputed == 0 and recomputed > 0  # the blocks really ran again in backward
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name in plain:
        assert rel_err(checkpointed[name], plain[name]) < 1e-5, name


def test_edge_cases_found_in_review(model):
    ims = images((224, 224), (224, 224), seed=12)
    x = torch.stack(ims)
    with torch.no_grad():
        # No high-res token at all, for every image.
        out = model(ims, num_token_look_close=[0, 0])
        assert [t.shape[1] for t in out.last_hidden_state] == [16, 16]
        # gt maps of different shapes for images of one size.
        gt = [torch.ones(10, 10), torch.zeros(5, 7)]
        out = model(ims, num_look_close=1, gt_selection_maps=gt)
        assert out.selection_probs[0][0].min() == 1  # fully covered by its gt map
        # Integer-like look counts.
        assert model(x, num_look_close=torch.tensor(1)).last_hidden_state.shape == model(x, num_look_close=1).last_hidden_state.shape
    with pytest.raises(ValueError, match="list of images"):
        model(x, num_token_look_close=[5, 30])
    with pytest.raises(TypeError, match="pixel_values are torch.float64"):
        model(x.double(), num_look_close=1)


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="max_select_num_each_scale"):
        PS3VisionModel(tiny_vision_config(max_select_num_each_scale=[4]))
    with pytest.raises(ValueError, match="max_select_num_each_scale"):
        PS3VisionModel(tiny_vision_config(max_select_num_each_scale=[4, -1]))
    with pytest.raises(ValueError, match="select_based_on_layer"):
        PS3VisionModel(tiny_vision_config(select_based_on_layer=[0, 9]))
    PS3VisionModel(tiny_vision_config(select_based_on_layer=[0, -1]))  # negative indices as upstream


def test_token_budget_with_first_n_scales_that_floors_to_zero():
    from ps3.selection_plan import plan_looks

    with pytest.raises(ValueError, match="only_select_first_n_scale"):
        plan_looks([48, 192], [4, 16], None, 21, 1)
