"""C-RADIO trunks (``radio: true``): parity with upstream on its own tiny C-RADIO models (forward
on the Triton backend, gradients on both backends, upstream's real 1152-wide MAP head), upstream's
real model configs built as its trainer builds them (meta device), the cropped position
embedding, and config checks.

The torch-backend forward parity of the C-RADIO cases runs with every other fixture case in
``test_model_parity.py``; see ``make_upstream_fixtures.py`` ("C-RADIO trunks") for how upstream made them.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy

from ps3 import PS3VisionConfig, PS3VisionModel
from ps3.baselines import dense_features, trunk_pos_embed
from ps3.demo import randomize_parameters_
from ps3.modeling_ps3 import PS3VisionEncoder
from ps3_kernels import use_backend

from fixtures.seeded_weights import INFO_NAME, digest, seeded_weights
from helpers import DEVICE, FIXTURES, case_names, load_case, rel_err
from test_model_parity import PARITY_TOL, check_case, flatten_output

RADIO_MODELS = ("radio3", "radio4", "radio3_v1", "radio_pool1152")
RADIO_CASES = [c for c in case_names() if load_case(c)[0].get("model") in RADIO_MODELS]
GRAD_CASES = [c for c in RADIO_CASES if "grad" in load_case(c)[0]]
SEEDED_CASES = [c for c in RADIO_CASES if load_case(c)[0]["call"] == "vision_seeded_weights"]
GRAD_TOL = PARITY_TOL  # gradients too: fp32 summation-order noise is ~1e-6


def test_radio_fixtures_present():
    assert len(RADIO_CASES) >= 15 and len(GRAD_CASES) >= 4 and len(SEEDED_CASES) >= 2, RADIO_CASES


# ----------------------------------------------------------------------------- parity with upstream


# Interpreted on the CPU, so a few; the Triton gradient cases below check their forward outputs too.
@pytest.mark.parametrize("case", ["r3_topdown_wide_look2", "r4_tokens_wide"])
def test_radio_parity_triton_backend(case):
    pytest.importorskip("triton")
    check_case(case, "triton")


@pytest.fixture(scope="module")
def seeded_folders(tmp_path_factory):
    """The seeded-weight fixture models as complete checkpoint folders (the stored part plus the
    regenerated MAP head), checked against the digest upstream's generator recorded."""
    folders = {}
    for name in sorted({load_case(c)[0]["model"] for c in SEEDED_CASES}):
        src = FIXTURES / "models" / name
        info = json.loads((src / INFO_NAME).read_text())
        extra = seeded_weights(info["shapes"], info["seed"])
        assert digest(extra) == info["sha256"], "numpy's RandomState stream changed: the seeded weights differ"
        folder = tmp_path_factory.mktemp(name)
        shutil.copy(src / "config.json", folder / "config.json")
        stored = load_numpy(str(src / "model.safetensors"))
        assert not set(stored) & set(extra)
        save_numpy({**stored, **extra}, str(folder / "model.safetensors"), metadata={"format": "pt"})
        folders[name] = folder
    return folders


@pytest.mark.parametrize("case", SEEDED_CASES)
def test_radio_real_pool_head_parity(case, seeded_folders):
    """Upstream's unpatched 1152-wide, 16-head MAP head after a tiny trunk and adapter."""
    meta, tensors = load_case(case)
    model = PS3VisionModel.from_pretrained(seeded_folders[meta["model"]]).eval()
    out = _call(model, meta, tensors, grad=False)[0]
    assert out.pooled_output.shape[-1] == 1152
    got = flatten_output(out)
    for key, ref in ((k[4:], v) for k, v in tensors.items() if k.startswith("out.")):
        if key.startswith("selection_maps"):
            assert torch.equal(got[key].to(ref.dtype), ref), key
        else:
            assert rel_err(got[key], ref) <= PARITY_TOL, key


def _call(model, meta, tensors, grad: bool, device="cpu"):
    """The case's call on ``model``; with ``grad`` the prompt requires grad. Returns (output, inputs)."""
    inputs = {k[3:]: v.to(device) for k, v in tensors.items() if k.startswith("in.")}
    for key, dtype in meta.get("tensor_dtypes", {}).items():
        if key.startswith("in."):
            inputs[key[3:]] = inputs[key[3:]].to(getattr(torch, dtype))
    if grad and "prompt" in inputs:
        inputs["prompt"].requires_grad_()
    encoder = model.vision_model
    encoder.num_hidden_layers_to_return = meta.get("num_hidden_layers_to_return") or encoder.layers
    with torch.set_grad_enabled(grad):
        out = model(**inputs, **meta["kwargs"])
    return out, inputs


def gradient_errors(case: str, backend: str) -> dict[str, float]:
    """Relative error of every output (``out.*``) and of every parameter's (and the prompt's)
    gradient (``grad.*``, by upstream's parameter name) against upstream's for the case's loss;
    a different selection or a gradient that is missing on one side only: inf."""
    meta, tensors = load_case(case)
    device = DEVICE if backend == "triton" else "cpu"
    model = PS3VisionModel.from_pretrained(FIXTURES / "models" / meta["model"]).to(device).train()
    with use_backend(backend):
        out, inputs = _call(model, meta, tensors, grad=True, device=device)
        got = flatten_output(out)
        loss = sum((got[k] * tensors[f"aux.loss_w.{k}"].to(device)).sum() for k in meta["grad"]["loss_terms"])
        loss.backward()
    errors = {}
    for key, ref in ((k, v) for k, v in tensors.items() if k.startswith("out.")):
        value = got[key[4:]].detach().cpu()
        if key.startswith("out.selection_maps."):
            errors[key] = 0.0 if torch.equal(value.to(ref.dtype), ref) else float("inf")
        else:
            errors[key] = rel_err(value, ref)
    grads = {f"grad.{n}": p.grad for n, p in model.named_parameters()}
    if "prompt" in inputs:
        grads["grad.in.prompt"] = inputs["prompt"].grad
    expected = {k for k in tensors if k.startswith("grad.")}
    for key, g in grads.items():
        if key in expected:
            errors[key] = float("inf") if g is None else rel_err(g.cpu(), tensors[key])
        elif g is not None and g.abs().max() > 0:  # upstream gives this parameter no gradient
            errors[key] = float("inf")
    errors.update({k: float("inf") for k in expected - set(grads)})
    return errors


@pytest.mark.parametrize("case", GRAD_CASES)
def test_radio_gradient_parity_torch_backend(case):
    errors = gradient_errors(case, "torch")
    assert sum(k.startswith("grad.") for k in errors) > 20 and any(k.startswith("out.") for k in errors)
    bad = {k: e for k, e in errors.items() if not e <= GRAD_TOL}
    assert not bad, bad


@pytest.mark.parametrize("case", ["r3_pooled_gt", "rv1_wide_look2"])
def test_radio_gradient_parity_triton_backend(case):
    pytest.importorskip("triton")
    bad = {k: e for k, e in gradient_errors(case, "triton").items() if not e <= GRAD_TOL}
    assert not bad, bad


# ----------------------------------------------------------------------------- upstream's real configs

REAL_CONFIGS = json.loads((FIXTURES / "real_configs.json").read_text())


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_configs_build_upstreams_parameters(name):
    """``PS3VisionEncoder(PS3VisionConfig(**vision_cfg))`` as upstream's trainer builds the tower
    from its model config JSON (extra keys such as ``ps3`` included), on the meta device: the
    same parameter names and shapes as upstream's, widths and budgets."""
    record = REAL_CONFIGS[name]
    with torch.device("meta"):
        enc = PS3VisionEncoder(PS3VisionConfig(**record["vision_cfg"]))
    shapes = {k: list(v.shape) for k, v in enc.state_dict().items()}
    assert shapes == record["state_dict_shapes"]
    assert enc.width == record["width"]
    assert enc.trunk.attn_pool.latent.shape[-1] == record["pooled_width"]
    assert enc.max_select_num_each_scale == record["max_select_num_each_scale"]
    assert enc.low_res_token_num == record["low_res_token_num"]


@pytest.mark.parametrize("name", [n for n in sorted(REAL_CONFIGS) if "RADIO" in n])
def test_real_radio_config_geometry(name):
    """PS3-C-RADIO: ViT-L/16 (1024 wide, 16 heads of 64), 24x24 low-res grid, a 54x54 ConvNet map,
    the 256x256 native position grid cropped for every grid up to it, a 1152-wide pooled output."""
    config = PS3VisionConfig(**REAL_CONFIGS[name]["vision_cfg"])
    spec = config.trunk_spec()
    assert (spec.width, spec.depth, spec.num_heads, spec.head_dim, spec.patch_size, spec.mlp_hidden) == (1024, 24, 16, 64, 16, 4096)
    assert spec.cropped_pos_embed and not spec.final_norm and spec.pool_shape == (1152, 16, 3.7362)
    with torch.device("meta"):
        enc = PS3VisionEncoder(config)
        convnet = enc.highres_selection_feature_module(torch.empty(1, 3, 1512, 1512))
        assert isinstance(enc.trunk.norm, torch.nn.Identity)
        assert enc.pool(torch.empty(2, 7, 1024)).shape == (2, 1152)
        assert enc.pos_embed_for_grid(24, 24).shape == (576, 1024)
        assert enc.pos_embed_for_grid(240, 150, exact=True).shape == (240 * 150, 1024)
        with pytest.raises(ValueError, match="img_size >= 4112"):
            enc.pos_embed_for_grid(257, 10)
        largest = enc.geometry.highres_grids((4000, 3000))[-1]
        assert largest == (config.ps3_scales[-1] // 16, config.ps3_scales[-1] // 16 * 3 // 4)  # 96x72 or 240x180
        assert enc.pos_embed_for_grid(*largest).shape == (largest[0] * largest[1], 1024)
    assert enc.trunk.grid_size == 256 and enc.feature_size_scale_i((1536, 1536), 0) == (24, 24)
    assert tuple(convnet.shape[-2:]) == (54, 54)


# ----------------------------------------------------------------------------- cropped position embedding


def tiny_radio_config(**overrides) -> PS3VisionConfig:
    kwargs = dict(
        model_name="tiny_radio_vit", hidden_size=64, depth=2, num_heads=1, mlp_ratio=1.0, patch_size=16,
        ps3_scales=[64, 128, 256], select_based_on_layer=[0, 1], max_select_num=20, img_size=320, radio=True,
        radio_adapter_mlp_version="v2", radio_adapter_mlp_input_dim=64, radio_adapter_mlp_hidden_dim=24,
        radio_adapter_mlp_output_dim=32, radio_adapter_mlp_num_inner=1, highres_selection_module_hidden_dim=4,
        highres_selection_module_out_dim=8, highres_selection_module_depth=1,
    )
    kwargs.update(overrides)
    return PS3VisionConfig(**kwargs)


@pytest.fixture(scope="module")
def radio_model():
    return randomize_parameters_(PS3VisionModel(tiny_radio_config()), seed=3).eval()


def test_cropped_pos_table_is_the_native_corner(radio_model):
    enc = radio_model.vision_model
    native = enc.trunk.pos_embed[0].view(20, 20, -1)
    for h, w in [(4, 4), (8, 13), (16, 5), (20, 20), (20, 3)]:
        corner = native[:h, :w].reshape(h * w, -1)
        assert torch.equal(enc.pos_embed_for_grid(h, w), corner)
        assert torch.equal(enc.pos_embed_for_grid(h, w, exact=True), corner)  # LLaVA-UHD's path crops too
        assert torch.equal(trunk_pos_embed(enc, (h, w), "exact"), corner)


@pytest.mark.parametrize("size", [(21, 4), (4, 21), (30, 30)])
def test_grid_beyond_the_native_table_is_a_value_error(radio_model, size):
    with pytest.raises(ValueError, match=r"crops its 20x20 position table.*img_size >= "):
        radio_model.vision_model.pos_embed_for_grid(*size)


def test_look_beyond_the_native_table_is_a_value_error():
    model = randomize_parameters_(PS3VisionModel(tiny_radio_config(img_size=192)), seed=1).eval()  # 12x12 table
    x = torch.randn(1, 3, 64, 64)
    model(x, num_look_close=0)  # the 4x4 low-res grid fits
    with pytest.raises(ValueError, match=r"crops its 12x12 position table .* a 16x16 token grid; that needs img_size >= 256"):
        model(x, num_look_close="all")


def test_dense_baseline_runs_on_cropped_table(radio_model):
    enc = radio_model.vision_model
    x = torch.randn(2, 3, 48, 80)
    with torch.no_grad():
        crop, exact = dense_features(enc, x), dense_features(enc, x, pos_mode="exact")
    assert torch.equal(crop, exact) and crop.shape == (2, 15, 64)


def test_cropped_table_receives_gradient_only_where_used(radio_model):
    model = randomize_parameters_(PS3VisionModel(tiny_radio_config()), seed=4).train()
    out = model(torch.randn(1, 3, 64, 96), num_look_close="all")
    out.last_hidden_state.square().sum().backward()
    grad = model.vision_model.trunk.pos_embed.grad[0].view(20, 20, -1).abs().sum(-1)
    used = torch.zeros(20, 20, dtype=torch.bool)
    used[:8, :16] = True  # the largest look grid (8 x 16) covers the others and the 4x4 low-res grid
    assert (grad[used] > 0).all() and (grad[~used] == 0).all()


# ----------------------------------------------------------------------------- config and checkpoints


def test_radio_config_round_trips_and_reloads(radio_model, tmp_path):
    radio_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["radio"] is True and saved["final_norm"] is False
    assert {k: saved[f"radio_adapter_mlp_{k}"] for k in ("version", "input_dim", "hidden_dim", "output_dim", "num_inner")} == \
        dict(version="v2", input_dim=64, hidden_dim=24, output_dim=32, num_inner=1)
    loaded = PS3VisionModel.from_pretrained(tmp_path).eval()
    assert loaded.config.radio_adapter_mlp_num_inner == 1
    assert not any(k.startswith("vision_model.trunk.norm.") for k in loaded.state_dict())
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        a, b = radio_model(x, num_look_close=2), loaded(x, num_look_close=2)
        pa, pb = (m(x, output_hidden_states=False).pooled_output for m in (radio_model, loaded))
    assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(pa, pb)
    assert a.last_hidden_state.shape[-1] == 64 and pa.shape == (2, 32)


def test_final_norm_and_v1_adapter_parameters():
    model = PS3VisionModel(tiny_radio_config(final_norm=True, radio_adapter_mlp_version="v1", radio_adapter_mlp_num_inner=2))
    names = {k.removeprefix("vision_model.trunk.") for k in model.state_dict() if ".trunk.norm." in k or "siglip_proj" in k}
    assert names == {"norm.weight", "norm.bias", "siglip_proj.fc1.weight", "siglip_proj.fc1.bias", "siglip_proj.norm.weight",
                     "siglip_proj.norm.bias", "siglip_proj.fc2.weight", "siglip_proj.fc2.bias",
                     *(f"siglip_proj.inner.{i}.{p}" for i in (0, 1, 3, 4) for p in ("weight", "bias"))}
    no_inner = PS3VisionModel(tiny_radio_config(radio_adapter_mlp_version="v1", radio_adapter_mlp_num_inner=0))
    assert not any("inner" in k for k in no_inner.state_dict())


@pytest.mark.parametrize("field, value, match", [
    ("radio_adapter_mlp_version", None, "radio_adapter_mlp_version must be one of"),
    ("radio_adapter_mlp_version", "v3", "radio_adapter_mlp_version must be one of"),
    ("radio_adapter_mlp_input_dim", 32, "radio_adapter_mlp_input_dim=32 must equal the trunk width"),
    ("radio_adapter_mlp_hidden_dim", None, "radio_adapter_mlp_hidden_dim must be a positive int"),
    ("radio_adapter_mlp_output_dim", 40, "radio_adapter_mlp_output_dim=40 must be divisible by the 16 heads"),
    ("radio_adapter_mlp_num_inner", -1, "radio_adapter_mlp_num_inner must be an int >= 0"),
    ("radio_adapter_mlp_num_inner", True, "radio_adapter_mlp_num_inner must be an int >= 0"),
])
def test_bad_adapter_fields_raise_naming_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        PS3VisionModel(tiny_radio_config(**{field: value}))


def test_known_trunk_width_must_match_hidden_size():
    with pytest.raises(ValueError, match="config.hidden_size=1152 but the trunk 'vit_large_patch16_224' is 1024 wide"):
        PS3VisionConfig(model_name="vit_large_patch16_224", radio=True).trunk_spec()


def test_siglip_trunks_ignore_final_norm():
    """As upstream: only the radio branch drops the final norm."""
    from helpers import tiny_vision_config

    spec = tiny_vision_config(final_norm=False).trunk_spec()
    assert spec.final_norm and not spec.cropped_pos_embed and spec.adapter is None
    assert spec.pool_shape == (64, 2, 2.0)


def test_radio_forward_has_no_host_reads_and_traces_as_one_graph(radio_model):
    """The cropped tables and the adapter keep the forward free of host syncs and graph breaks."""
    from test_no_host_sync import forbid_host_reads

    images = [torch.randn(3, 96, 64), torch.randn(3, 64, 80)]
    with torch.no_grad(), use_backend("torch"), forbid_host_reads():
        radio_model(images, prompt=torch.randn(2, 64), num_look_close=2)
        radio_model(images, output_hidden_states=False, is_global_text=torch.tensor([True, False]))
    x = torch.randn(2, 3, 64, 96)
    compiled = torch.compile(radio_model, backend="eager", fullgraph=True)
    try:
        with torch.no_grad(), use_backend("torch"):
            assert torch.equal(compiled(x, output_hidden_states=False).pooled_output,
                               radio_model(x, output_hidden_states=False).pooled_output)
    finally:
        torch._dynamo.reset()
