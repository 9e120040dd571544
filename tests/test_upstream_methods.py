"""Upstream's step-by-step encoder API (``forward_low_res``, ``get_selection_probs``,
``get_selection_maps``, ``forward_high_res``, ``tokenize_high_res``, ``update_selection_maps``,
``aggregate_features``, ``resize_to_scale_i``, ...) and the rest of upstream's public surface.

The recipes of ``tests/fixtures/encoder_recipes.py`` ran verbatim on upstream to make the
``m_*`` cases and run here on both backends: the same return structure (containers, keys,
shapes, dtypes, plain values), fp32 relative error <= 1e-5, identical selection maps. Beyond
the fixtures: the methods against the forward, host syncs where promised and nowhere else,
errors, and the two drop-in details (``is_global_text`` masks, ``PS3_KERNELS_BACKEND``).
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ps3
import ps3_kernels.backend as backend
from ps3 import PS3VisionModel
from ps3.demo import randomize_parameters_
from ps3_kernels import assign_looks, use_backend

from helpers import DEVICE, FIXTURES, case_names, load_case, rel_err, tiny_vision_config
from test_no_host_sync import forbid_host_reads

TOL = 1e-5
_spec = importlib.util.spec_from_file_location("encoder_recipes", FIXTURES.parent / "encoder_recipes.py")
recipes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recipes)

METHOD_CASES = [c for c in case_names() if load_case(c)[0]["call"] == "method"]
# Interpreted Triton is slow: these cover every method on the kernels (scoring, look assignment,
# sparse patch embed, attention with and without a prefix, a chained cache).
TRITON_CASES = ["m_low_res_v3", "m_looks_v4_tokens_first_n", "m_chained_v4g7", "m_given_maps_unequal",
                "m_given_maps_pool_gt", "m_selection_maps_ties"]
# Recipe outputs that are selection maps: compared exactly.
MAP_OUTPUTS = {"maps1", "maps2", "union", "a", "b", "both", "c"}


@functools.lru_cache(maxsize=None)
def load_model(name: str) -> PS3VisionModel:
    return PS3VisionModel.from_pretrained(FIXTURES / "models" / name).eval()


def run_recipe(name: str, device: str):
    meta, tensors = load_case(name)
    vm = load_model(meta["model"]).to(device).vision_model
    inputs = {k[3:]: v.to(device) for k, v in tensors.items() if k.startswith("in.")}
    for key, dtype in meta["tensor_dtypes"].items():
        inputs[key[3:]] = inputs[key[3:]].to(getattr(torch, dtype))
    vm.num_hidden_layers_to_return = meta["num_hidden_layers_to_return"] or vm.layers
    try:
        with torch.no_grad():
            result = recipes.RECIPES[meta["recipe"]](vm, inputs, meta["kwargs"])
    finally:
        vm.num_hidden_layers_to_return = vm.layers
    got, structure = recipes.flatten(result)
    expected = {k: v for k, v in tensors.items() if k.startswith("out.")}
    return meta, structure, {k: v.cpu() for k, v in got.items()}, expected


def case_errors(name: str, backend_name: str) -> dict[str, float]:
    """Relative error of every output (maps: 0 if identical, else inf); the structure must match."""
    with use_backend(backend_name):
        meta, structure, got, expected = run_recipe(name, DEVICE if backend_name == "triton" else "cpu")
    assert structure == meta["structure"], "return types, keys, shapes or dtypes differ from upstream's"
    assert got.keys() == expected.keys()
    errors = {}
    for key, ref in expected.items():
        if key.split(".")[1] in MAP_OUTPUTS:
            errors[key] = 0.0 if torch.equal(got[key], ref) else float("inf")
        else:
            errors[key] = rel_err(got[key], ref)
    return errors


def test_method_fixtures_present():
    assert len(METHOD_CASES) >= 10, f"expected the m_* upstream fixtures under {FIXTURES}"
    assert set(TRITON_CASES) <= set(METHOD_CASES)


@pytest.mark.parametrize("case", METHOD_CASES)
def test_methods_match_upstream_torch_backend(case):
    bad = {k: e for k, e in case_errors(case, "torch").items() if not e <= TOL}
    assert not bad, f"outputs off upstream (inf: different selection): {bad}"


@pytest.mark.parametrize("case", TRITON_CASES)
def test_methods_match_upstream_triton_backend(case):
    pytest.importorskip("triton")
    bad = {k: e for k, e in case_errors(case, "triton").items() if not e <= TOL}
    assert not bad, f"outputs off upstream (inf: different selection): {bad}"


# ----------------------------------------------------------------------------- beyond the fixtures


@pytest.fixture(scope="module")
def model():
    return randomize_parameters_(PS3VisionModel(tiny_vision_config()), seed=31).eval()


def _by_hand(vm, x, looks: int, prompt=None):
    """``looks`` looks driven by hand, as ``encoder_recipes.looks_by_hand`` does for two."""
    low = vm.forward_low_res(x, output_hidden_states=True, return_kv_cache=True)
    feats = recipes._selection_features(vm, x, low["hidden_states"])
    probs, _, _ = vm.get_selection_probs(x, feats, recipes._highres_features(vm, x), prompt)
    maps, union, hidden = [], None, []
    for _ in range(looks):
        m = vm.get_selection_maps(probs, old_selection_maps=union)
        hidden.append(vm.forward_high_res(x, m, kv_cache=low["output_kv_cache"], output_hidden_states=True)["hidden_states"])
        maps.append(m)
        union = m if union is None else vm.update_selection_maps(union, m)
    high = vm.aggregate_features(hidden, maps)
    keep = low["hidden_states"][len(low["hidden_states"]) - len(high):]
    return [torch.cat([lo, hi], dim=1) for lo, hi in zip(keep, high)], union


@pytest.mark.parametrize("size", [(224, 168), (150, 224)])
def test_looks_by_hand_equal_the_forward(model, size):
    """Three looks through the step methods give the forward's tokens and maps (its packed pass)."""
    vm = model.vision_model
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(5))
    prompt = torch.randn(2, vm.width, generator=torch.Generator().manual_seed(6))
    vm.num_hidden_layers_to_return = 2
    try:
        with torch.no_grad(), use_backend("torch"):
            layers, union = _by_hand(vm, x, 3, prompt)
            ref = model(x, num_look_close=3, prompt=prompt)
    finally:
        vm.num_hidden_layers_to_return = vm.layers
    assert len(layers) == len(ref.hidden_states) == 2
    for got, want in zip(layers, ref.hidden_states):
        assert rel_err(got, want) < TOL
    assert all(torch.equal(g, r) for g, r in zip(union, ref.selection_maps))


@pytest.mark.parametrize("backend_name", ["torch", "triton"])
def test_step_methods_backward_matches_the_forward(backend_name):
    """Gradients through forward_low_res + forward_high_res (one look on the cache) equal the
    forward's, for every parameter of the trunk's blocks."""
    if backend_name == "triton":
        pytest.importorskip("triton")
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config(depth=2, select_based_on_layer=[0, 1])),
                                  seed=31).to(DEVICE if backend_name == "triton" else "cpu").eval()
    vm = model.vision_model
    x = torch.randn(1, 3, 224, 196, generator=torch.Generator().manual_seed(8)).to(vm.prior_prompt.device)
    with use_backend(backend_name):
        low = vm.forward_low_res(x, return_kv_cache=True)
        with torch.no_grad():
            ref_out = model(x, num_look_close=1)
        maps = [m.float() for m in ref_out.selection_maps]
        look = vm.forward_high_res(x, maps, kv_cache=low["output_kv_cache"], output_hidden_states=True)
        params = [p for n, p in model.named_parameters() if n.startswith("vision_model.trunk.blocks")]
        got = torch.autograd.grad(look["hidden_states"][-1].square().sum(), params)
        out = model(x, num_look_close=1)
        n_low = vm.low_res_token_num
        want = torch.autograd.grad(out.last_hidden_state[:, n_low:].square().sum(), params)
    assert max(rel_err(g, w) for g, w in zip(got, want)) < 1e-5
    assert min(g.norm() for g in got) > 0


def test_forward_low_res_takes_images_of_different_sizes(model):
    vm = model.vision_model
    ims = [torch.randn(3, 224, 150), torch.randn(3, 120, 224)]
    with torch.no_grad(), use_backend("torch"):
        both = vm.forward_low_res(ims, output_hidden_states=True, return_kv_cache=True)
        for b, im in enumerate(ims):
            alone = vm.forward_low_res(im[None], output_hidden_states=True, return_kv_cache=True)
            assert rel_err(both["x"][b], alone["x"][0]) < TOL
            assert rel_err(both["output_kv_cache"][:, :, b], alone["output_kv_cache"][:, :, 0]) < TOL


def test_tokenize_high_res_takes_per_scale_counts_that_differ(model):
    """Beyond upstream: per-scale counts may differ between images when the totals agree."""
    vm = model.vision_model
    x = torch.randn(2, 3, 224, 224)
    maps = [torch.zeros(2, 8, 8), torch.zeros(2, 16, 16)]
    maps[0][0, 0, :3] = 1
    maps[1][0, 2, :2] = 1
    maps[0][1, 4, :1] = 1
    maps[1][1, 5, 3:7] = 1
    with torch.no_grad(), use_backend("torch"):
        both = vm.tokenize_high_res(x, maps)
        for b in range(2):
            assert rel_err(both[b], vm.tokenize_high_res(x[b : b + 1], [m[b : b + 1] for m in maps])[0]) < 1e-6


def test_get_selection_maps_carries_quota_and_breaks_ties_low_index_first(model):
    vm = model.vision_model  # quotas [4, 16] per look on grids 8x8, 16x16
    probs = [torch.full((1, 8, 8), 0.5), torch.full((1, 16, 16), 0.5)]
    old = [torch.ones(1, 8, 8), torch.zeros(1, 16, 16)]
    old[0][0, 7, 5:] = 0  # 3 patches left on the first scale: the 4th moves to the second
    maps = vm.get_selection_maps(probs, old_selection_maps=old)
    assert maps[0].sum() == 3 and maps[0][0, 7, 5:].sum() == 3
    assert maps[1].sum() == 17 and maps[1][0, 1, :1].sum() == 1 and maps[1][0, 0].sum() == 16  # raster order


def test_step_methods_read_no_device_values():
    """On GPU tensors these methods never sync (the CPU run treats every tensor as a device one)."""
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config(ps3_scales=[56, 112, 224, 448], max_select_num=60)),
                                  seed=2).eval()
    vm = model.vision_model
    x = torch.randn(2, 3, 224, 196)
    with torch.no_grad(), use_backend("torch"):
        low = vm.forward_low_res(x, output_hidden_states=True, return_kv_cache=True)
        feats = recipes._selection_features(vm, x, low["hidden_states"])
        highres = recipes._highres_features(vm, x)
        maps1 = vm.get_selection_maps(vm.get_selection_probs(x, feats, highres)[0])
        looks = [vm.forward_high_res(x, maps1, kv_cache=low["output_kv_cache"], output_hidden_states=True)]
        with forbid_host_reads():
            low = vm.forward_low_res(x, output_hidden_states=True, return_kv_cache=True)
            probs, _, _ = vm.get_selection_probs(x, feats, highres, torch.randn(2, vm.width),
                                                 torch.ones(2, 9, 9), smooth_selection_prob=True)
            maps = vm.get_selection_maps(probs, num_select_token=40, only_select_first_n_scale=[2, 3])
            maps2 = vm.get_selection_maps(probs, old_selection_maps=maps1, only_select_first_n_scale=2)
            union = vm.update_selection_maps(maps1, maps2)
            vm.resize_to_scale_i(x, 1)
        looks.append(vm.forward_high_res(x, maps2, kv_cache=low["output_kv_cache"], output_hidden_states=True))
        with forbid_host_reads():
            vm.aggregate_features([lk["hidden_states"] for lk in looks], [maps1, maps2])
        reads = []
        with forbid_host_reads(record=reads):  # documented: the maps' counts size the tokens
            vm.forward_high_res(x, union, kv_cache=low["output_kv_cache"], return_kv_cache=True)
        assert reads == ["tolist"]
    assert sum(m.sum(dim=(1, 2)) for m in maps).tolist() == [60, 60]  # first-n scales: topped up to the budget


@pytest.mark.parametrize("call, error, match", [
    (lambda vm, x, m, c: vm.forward_high_res(x, m[:1]), ValueError, "selection_maps must be a list of 2"),
    (lambda vm, x, m, c: vm.forward_high_res(x, [m[0][:, :4], m[1]]), ValueError,
     r"selection_maps\[0\] must be a \(2, 8, 8\)"),
    (lambda vm, x, m, c: vm.forward_high_res(x, [m[0], torch.cat([m[1][:1], m[1][1:] * 0])]), ValueError,
     r"select \[9, 4\] patches per image"),
    (lambda vm, x, m, c: vm.forward_high_res(x, [m[0] * 0, m[1] * 0]), ValueError, "select no patch"),
    (lambda vm, x, m, c: vm.forward_high_res(x, m, kv_cache=c[:, :, :1]), ValueError, "kv_cache must be"),
    (lambda vm, x, m, c: vm.forward_high_res(x, m, kv_cache=list(c)), ValueError, "kv_cache must be"),
    (lambda vm, x, m, c: vm.forward_high_res(x, m, pool_gt_token_only=True), ValueError, "needs gt_selection_maps"),
    (lambda vm, x, m, c: vm.forward_high_res(list(x), m), TypeError, r"one \(B, 3, H, W\) tensor"),
    (lambda vm, x, m, c: vm.forward_high_res(x, m, return_kv_cache=1), TypeError, "return_kv_cache"),
    (lambda vm, x, m, c: vm.forward_low_res(x, output_hidden_states="yes"), TypeError, "output_hidden_states"),
    (lambda vm, x, m, c: vm.get_selection_maps(m, num_select_token=21), ValueError, "num_select_token"),
    (lambda vm, x, m, c: vm.get_selection_maps(m, only_select_first_n_scale=3), ValueError, "only_select_first_n_scale"),
    (lambda vm, x, m, c: vm.get_selection_maps(m, old_selection_maps=m[:1]), ValueError, "old_selection_maps"),
    (lambda vm, x, m, c: vm.get_selection_maps([t.long() for t in m]), TypeError, "select_probs must be floating"),
    (lambda vm, x, m, c: vm.update_selection_maps(m, m), ValueError, "must be exclusive"),
    (lambda vm, x, m, c: vm.aggregate_features([[torch.zeros(2, 5, 64)]], [m]), ValueError, "hold 5 tokens"),
    (lambda vm, x, m, c: vm.aggregate_features([[torch.zeros(2, 9, 64)]] * 2, [m, m]), ValueError, "must be exclusive"),
    (lambda vm, x, m, c: vm.aggregate_features([[torch.zeros(2, 9, 64)]], [m, m]), ValueError, "one entry per look"),
    (lambda vm, x, m, c: vm.get_selection_probs(x, torch.zeros(2, 64, 4, 4)), ValueError, "feature_map must be"),
    (lambda vm, x, m, c: vm.get_selection_probs(x, torch.zeros(2, 192, 4, 4), torch.zeros(2, 3, 5, 5)),
     ValueError, "highres_feature_map must be"),
    (lambda vm, x, m, c: vm.get_selection_probs(x, torch.zeros(2, 192, 4, 4), prompt=torch.zeros(2, 63)),
     ValueError, "prompt must be"),
    (lambda vm, x, m, c: vm.get_selection_probs(x, torch.zeros(2, 192, 4, 4, dtype=torch.long)), TypeError,
     "feature_map must be floating"),
    (lambda vm, x, m, c: vm.get_selection_probs(x[0], torch.zeros(2, 192, 4, 4)), ValueError, r"input must be the \(B"),
    (lambda vm, x, m, c: vm.get_selection_maps(m, num_select_token=1, only_select_first_n_scale=1), ValueError,
     "num_select_token leaves no quota"),
])
def test_step_methods_reject_bad_arguments(model, call, error, match):
    vm = model.vision_model
    x = torch.randn(2, 3, 224, 224)
    maps = [torch.zeros(2, 8, 8), torch.zeros(2, 16, 16)]
    maps[0][:, 0, :4] = 1
    maps[1][:, 3, :5] = 1
    with torch.no_grad():
        cache = vm.forward_low_res(x, return_kv_cache=True)["output_kv_cache"]
        with pytest.raises(error, match=match):
            call(vm, x, maps, cache)


def test_get_selection_probs_reads_only_the_sizes_of_input(model):
    """Upstream only takes sizes from ``input``: float64 pixels for an fp32 model are fine."""
    vm = model.vision_model
    x = torch.randn(2, 3, 224, 224)
    features = torch.randn(2, 192, 4, 4)
    with torch.no_grad(), use_backend("torch"):
        want = vm.get_selection_probs(x, features)
        got = vm.get_selection_probs(x.double(), features)
    assert all(torch.equal(a, b) for a, b in zip(got[0], want[0]))


def test_first_n_that_leaves_a_negative_quota_is_an_error():
    """Upstream's top-k fails on it; on CPU tensors the quotas are checked (after the carry-over)."""
    model = PS3VisionModel(tiny_vision_config(ps3_scales=[56, 112, 224, 448], max_select_num=60))
    vm = model.vision_model  # quotas [2, 11, 47]: first 1 scale -> [60, 1, -1]
    probs = [torch.rand(1, 4 * 2**i, 4 * 2**i) for i in range(1, 4)]
    with pytest.raises(ValueError, match="negative quotas"):
        vm.get_selection_maps(probs, only_select_first_n_scale=1)


@pytest.mark.parametrize("kept, layers", [(0, 4), (9, 4), (2, 2), (-1, 3)])
def test_hidden_layers_kept_as_upstream_slices_them(model, kept, layers):
    """Upstream keeps ``hidden_states[-num_hidden_layers_to_return:]``: 0 means all layers."""
    vm = model.vision_model
    x = torch.randn(1, 3, 224, 224)
    maps = [torch.zeros(1, 8, 8), torch.zeros(1, 16, 16)]
    maps[0][0, 0, 0] = 1
    vm.num_hidden_layers_to_return = kept
    try:
        with torch.no_grad(), use_backend("torch"):
            assert len(vm.forward_high_res(x, maps, output_hidden_states=True)["hidden_states"]) == layers
            assert len(model(x, num_look_close=1).hidden_states) == layers
    finally:
        vm.num_hidden_layers_to_return = vm.layers


def test_encoder_attributes_and_init_as_upstream(model):
    vm = model.vision_model
    assert vm.s3_image_size == vm.ps3_scales[-1] == 224
    assert vm.gradient_checkpointing is False
    vm.gradient_checkpointing = True
    try:
        assert vm.trunk.grad_checkpointing is True
    finally:
        vm.gradient_checkpointing = False
    with pytest.raises(ValueError, match="patch_dropout"):
        ps3.PS3VisionEncoder(tiny_vision_config(), patch_dropout=0.1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        ps3.PS3VisionEncoder(tiny_vision_config(), bogus=1)
    ps3.PS3VisionEncoder(tiny_vision_config(), patch_dropout=0)


# ----------------------------------------------------------------------------- drop-in details


@pytest.mark.parametrize("value", ["bogus", "", "Triton "])
def test_bad_backend_variable_names_the_variable(monkeypatch, value):
    monkeypatch.setenv("PS3_KERNELS_BACKEND", value)
    backend.set_backend(None)
    with pytest.raises(ValueError, match=re.escape(f"PS3_KERNELS_BACKEND={value!r}")):
        backend.get_backend()
    with pytest.raises(ValueError, match=re.escape(f"PS3_KERNELS_BACKEND={value!r}")):
        assign_looks(torch.rand(1, 4), torch.ones(1, 1, dtype=torch.long))  # what an op call then says


def test_backend_variable_values_are_case_insensitive(monkeypatch):
    monkeypatch.setenv("PS3_KERNELS_BACKEND", "TORCH")
    backend.set_backend(None)
    assert backend.get_backend() == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.set_backend("bogus")


# ----------------------------------------------------------------------------- the compatibility table

API = json.loads((FIXTURES / "api.json").read_text())
TABLE = Path(__file__).parent.parent / "docs" / "upstream_api.md"
STATUSES = ("same", "extended", "not supported")


def table_rows() -> dict[str, str]:
    """``{"Class.name": status}`` for every name in the first cell of the doc's table rows."""
    rows = {}
    for line in TABLE.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        status = next((s for s in STATUSES if cells[1].startswith(s)), None)
        assert status, f"row {cells[0]}: status must start with one of {STATUSES}, got {cells[1]!r}"
        for name in re.findall(r"`([^`]+)`", cells[0]):
            owner, _, members = name.partition(".")
            if "trunk." in name:
                owner, members = "PS3VisionEncoder.trunk", name.split("trunk.", 1)[1]
            for member in re.split(r"[,{} ]+", members):
                if member:
                    assert f"{owner}.{member}" not in rows, f"{owner}.{member} is in two rows"
                    rows[f"{owner}.{member}"] = status
    return rows


@functools.lru_cache(maxsize=None)
def our_objects() -> dict[str, tuple[type, object]]:
    """Our class and an instance of it for every class in api.json."""
    vision = load_model("vision3")
    text = ps3.PS3TextModel.from_pretrained(FIXTURES / "models" / "text")
    both = ps3.PS3Model.from_pretrained(FIXTURES / "models" / "ps3")
    tokenizer = ps3.PS3Tokenizer(str(FIXTURES / "tokenizer"))
    objects = {"PS3VisionModel": vision, "PS3VisionEncoder": vision.vision_model, "PS3TextModel": text,
               "PS3Model": both, "PS3VisionConfig": ps3.PS3VisionConfig(), "PS3TextConfig": ps3.PS3TextConfig(),
               "PS3Config": ps3.PS3Config(), "PS3ImageProcessor": ps3.PS3ImageProcessor(image_size=378),
               "PS3Tokenizer": tokenizer, "PS3VisionEncoder.trunk": vision.vision_model.trunk}
    return {name: (type(obj), obj) for name, obj in objects.items()}


def _params(cls: type, name: str) -> list[list]:
    """Parameters of ``cls.name`` without ``self``/``cls``, as api.json records them."""
    fn = inspect.getattr_static(cls, name)
    fn = fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn
    params = list(inspect.signature(fn).parameters.values())[1:]
    return [[p.name, p.kind.name, None if p.default is inspect.Parameter.empty else repr(p.default)] for p in params]


def check_name(owner: str, name: str, info: dict, status: str) -> str | None:
    """Why our ``owner.name`` breaks its table status (None when it holds)."""
    cls, obj = our_objects()[owner]
    kind = info["kind"]
    if kind == "field":
        present = name in inspect.signature(cls.__init__).parameters
    elif kind == "attribute":
        present = hasattr(obj, name)
    else:
        present = hasattr(cls, name)
    if status == "not supported":
        return "exists but the table says 'not supported'" if present else None
    if not present:
        return "missing"
    if kind in ("method", "classmethod"):
        ours, theirs = _params(cls, name), info["params"]
        if status == "same" and ours != theirs:
            return f"signature {ours} != upstream's {theirs}"
        variadic = [p for p in theirs if p[1].startswith("VAR_")]
        named = [p for p in theirs if not p[1].startswith("VAR_")]
        if ours[: len(named)] != named or any(p not in ours for p in variadic):
            return f"signature {ours} does not extend upstream's {theirs}"
        if any(p[2] is None and p[1] not in ("VAR_POSITIONAL", "VAR_KEYWORD") for p in ours[len(named):]):
            return f"added parameters without defaults in {ours}"
    if status == "same" and kind in ("field", "class_attribute"):
        theirs = info.get("default", info.get("value"))  # {"repr": ...}: not json, not compared
        ours = getattr(obj, name)
        recorded = not (isinstance(theirs, dict) and set(theirs) == {"repr"})
        if recorded and json.loads(json.dumps(ours, default=repr)) != theirs:
            return f"value {ours!r} != upstream's {theirs!r}"
    return None


def test_compatibility_table_covers_upstream_public_names():
    rows = table_rows()
    names = {f"{c}.{n}" for c, members in API["classes"].items() for n in members}
    assert not names - rows.keys(), f"upstream names missing from {TABLE.name}: {sorted(names - rows.keys())}"
    assert not rows.keys() - names, f"{TABLE.name} rows that are not upstream names: {sorted(rows.keys() - names)}"


def test_compatibility_table_is_true():
    rows = table_rows()
    wrong = {}
    for owner, members in API["classes"].items():
        for name, info in members.items():
            why = check_name(owner, name, info, rows.get(f"{owner}.{name}", "same"))
            if why:
                wrong[f"{owner}.{name} ({rows.get(f'{owner}.{name}')})"] = why
    assert not wrong, wrong


def test_encoder_methods_have_upstream_signatures():
    """Every public method of upstream's encoder exists with its exact parameters (extras after them)."""
    methods = {n: i for n, i in API["classes"]["PS3VisionEncoder"].items() if i["kind"] == "method"}
    assert {"forward_low_res", "forward_high_res", "tokenize_high_res", "get_selection_probs", "get_selection_maps",
            "update_selection_maps", "aggregate_features", "resize_to_scale_i"} <= methods.keys()
    for name, info in methods.items():
        assert check_name("PS3VisionEncoder", name, info, "extended") is None, name


def test_resize_to_scale_i_is_upstreams_resize(model):
    vm = model.vision_model
    x = torch.randn(2, 3, 150, 224)
    for i in range(3):
        want = F.interpolate(x, size=vm.image_size_scale_i(x, i), mode="bicubic")
        assert torch.equal(vm.resize_to_scale_i(x, i), want)
