"""Parity with upstream PS3 on reference data made by tests/fixtures/make_upstream_fixtures.py.

fp32 on CPU: relative error <= 1e-5 on every returned tensor, selection maps identical.
"""

from __future__ import annotations

import functools

import pytest
import torch

from ps3 import PS3Model, PS3TextModel, PS3VisionModel
from ps3_kernels import use_backend

from helpers import DEVICE, FIXTURES, case_names, load_case, rel_err

PARITY_TOL = 1e-5  # relative error of every returned tensor
MODEL_CALLS = {"vision", "text", "ps3_encode_image", "ps3_encode_text"}
CASES = [c for c in case_names() if load_case(c)[0]["call"] in MODEL_CALLS]


@functools.lru_cache(maxsize=None)
def load_model(name: str, call: str):
    cls = PS3Model if call.startswith("ps3") else PS3TextModel if call == "text" else PS3VisionModel
    return cls.from_pretrained(FIXTURES / "models" / name).eval()


def run_case(name: str, device: str = "cpu"):
    meta, tensors = load_case(name)
    model = load_model(meta["model"], meta["call"]).to(device)
    inputs = {k[3:]: v.to(device) for k, v in tensors.items() if k.startswith("in.")}
    for key, dtype in meta.get("tensor_dtypes", {}).items():
        if key.startswith("in."):
            inputs[key[3:]] = inputs[key[3:]].to(getattr(torch, dtype))
    call = meta["call"]
    with torch.no_grad():
        if call in ("text", "ps3_encode_text"):
            fn = model if call == "text" else model.encode_text
            out = fn(inputs["text"])
        else:
            encoder = model.vision_model
            encoder.num_hidden_layers_to_return = meta.get("num_hidden_layers_to_return") or encoder.layers
            fn = model if call == "vision" else model.encode_image
            out = fn(**inputs, **meta["kwargs"])
            if out.last_hidden_state is not None and out.selection_maps is not None:
                out.feature_maps = encoder.format_features_into_feature_maps(out.last_hidden_state, out.selection_maps)
    expected = {k[4:]: v for k, v in tensors.items() if k.startswith("out.")}
    return out, expected


def flatten_output(out) -> dict[str, torch.Tensor]:
    flat = {}
    for key in ("last_hidden_state", "pooled_output", "prompt", "hidden_states", "selection_maps", "selection_probs",
                "bottomup_selection_probs", "topdown_selection_probs", "feature_maps"):
        value = getattr(out, key, None)
        if isinstance(value, torch.Tensor):
            flat[key] = value
        elif value is not None:
            flat.update({f"{key}.{i}": v for i, v in enumerate(value)})
    return flat


def test_fixtures_present():
    assert len(CASES) >= 20, f"expected the upstream fixtures under {FIXTURES}"


# The Triton kernels run interpreted on the CPU: a subset that still covers every path.
TRITON_CASES = ["bottomup_look2", "topdown_look1", "tokens_odd47", "nonsquare_wide", "first_n_list",
                "smooth_gt_topdown", "pooled_gt", "nohr_pooled", "v4_look2", "v4_nonsquare", "ps3_encode_image",
                "g16_topdown_tokens_tall", "g16_pooled", "v4g7_pooled"]


def case_errors(case: str, backend: str, device: str | None = None) -> dict[str, float]:
    """Relative error of every expected output (selection maps: 0 if identical, else inf; a missing
    output: inf). ``device`` defaults to the GPU for the Triton backend (interpreted on the CPU)."""
    with use_backend(backend):
        out, expected = run_case(case, device or (DEVICE if backend == "triton" else "cpu"))
    got = {k: v.cpu() for k, v in flatten_output(out).items()}
    errors = {}
    for key, ref in expected.items():
        if key not in got:
            errors[key] = float("inf")
        elif key.startswith("selection_maps"):
            errors[key] = 0.0 if torch.equal(got[key].to(ref.dtype), ref) else float("inf")
        else:
            errors[key] = rel_err(got[key], ref)
    return errors


def check_case(case: str, backend: str) -> None:
    bad = {k: e for k, e in case_errors(case, backend).items() if not e <= PARITY_TOL}
    assert not bad, f"outputs off upstream (inf: missing or different selection): {bad}"


@pytest.mark.parametrize("case", CASES)
def test_parity_torch_backend(case):
    check_case(case, "torch")


@pytest.mark.parametrize("case", TRITON_CASES)
def test_parity_triton_backend(case):
    pytest.importorskip("triton")
    check_case(case, "triton")
