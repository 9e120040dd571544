"""Shared test utilities: error metrics, fixture loading, tiny random PS3 models."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures" / "upstream"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error in float64; NaN or shape mismatch never passes."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


@contextlib.contextmanager
def poisoned_empty() -> Iterator[None]:
    """Make every ``torch.empty`` and ``torch.empty_like`` NaN (floats) or -7 (ints), so an unwritten
    output element shows.

    Used by the ``poisoned`` fixture and by ``benchmarks/gpu_suite.py``'s correctness stage.
    """
    real = torch.empty, torch.empty_like

    def poisoning(allocate):
        def poisoned(*args, **kwargs):
            out = allocate(*args, **kwargs)
            return out.fill_(float("nan") if out.is_floating_point() else -7)
        return poisoned

    torch.empty, torch.empty_like = map(poisoning, real)
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real


def load_case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    meta = json.loads((FIXTURES / "cases" / f"{name}.json").read_text())
    return meta, load_file(str(FIXTURES / "cases" / f"{name}.safetensors"))


def case_names() -> list[str]:
    return sorted(p.stem for p in (FIXTURES / "cases").glob("*.json"))


def tiny_vision_config(**overrides):
    from ps3 import PS3VisionConfig

    kwargs = dict(
        model_name="tiny_test_vit", hidden_size=64, depth=4, num_heads=2, mlp_ratio=2.0, patch_size=14,
        ps3_scales=[56, 112, 224], select_based_on_layer=[0, 1, 3], max_select_num=20,
        highres_selection_module_hidden_dim=16, highres_selection_module_out_dim=16, highres_selection_module_depth=1,
    )
    kwargs.update(overrides)
    return PS3VisionConfig(**kwargs)


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def to_device(value, device=DEVICE):
    """Tensors (also inside lists, tuples and dataclasses such as PatchTokens) moved to ``device``."""
    import dataclasses

    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: to_device(getattr(value, f.name), device) for f in dataclasses.fields(value)})
    return value


def run_triton(fn, *args):
    """``fn(*args)`` on the Triton backend: compiled on a GPU, interpreted on the CPU; result on the CPU."""
    from ps3_kernels import use_backend

    with use_backend("triton"):
        return to_device(fn(*to_device(args)), "cpu")
