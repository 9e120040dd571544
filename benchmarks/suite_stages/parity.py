"""Stage ``parity``: the upstream-parity fixtures (``tests/test_model_parity.py``) on CUDA with
TF32 off, on the Triton backend (the subset that covers every kernel path first) and then on the
PyTorch backend; relative error <= 1e-5 on every output, selection maps identical."""

from __future__ import annotations

import dataclasses

import torch

from .base import Shapes, Stage, StageContext, WorkItem
from .checks import check_item
from .workloads import parity_case


def check_parity(ctx: StageContext, case: str, backend: str) -> dict:
    from test_model_parity import PARITY_TOL, case_errors

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 must be fp32 (cuDNN convolutions default to TF32)
    torch.backends.cudnn.allow_tf32 = False
    errors = case_errors(case, backend, device=ctx.shapes.device)
    return dict(errors=errors, tol=PARITY_TOL, dtype="fp32", shape=f"upstream fixture {case}, {backend} backend")


def cases(sh: Shapes) -> tuple[list[str], list[str]]:
    """The model-call fixtures as (planned on the Triton backend, the rest): ``TRITON_CASES`` and one
    case per C-RADIO model (head dim 64, patch 16, cropped position table) first; the dry run
    takes the first one only."""
    from test_model_parity import CASES, TRITON_CASES, load_case
    from test_radio import RADIO_MODELS

    radio = {}
    for case in CASES:
        radio.setdefault(load_case(case)[0].get("model"), case)
    first = list(dict.fromkeys(TRITON_CASES + [radio[m] for m in RADIO_MODELS if m in radio]))
    everything = list(dict.fromkeys(first + CASES))
    if sh.parity_cases is not None:
        return everything[: sh.parity_cases], []
    return first, [c for c in everything if c not in first]


def _item(case: str, backend: str, optional: bool = False) -> WorkItem:
    from test_model_parity import load_case

    uses_kernels = backend == "triton" and load_case(case)[0]["call"] not in ("text", "ps3_encode_text")
    item = check_item(f"upstream parity {case} ({backend})", 0.3, lambda ctx: check_parity(ctx, case, backend),
                      (parity_case(case),) if uses_kernels else ())
    return dataclasses.replace(item, optional=True) if optional else item


def items(sh: Shapes) -> list[WorkItem]:
    """The planned Triton cases, then every case on the PyTorch backend (GPU only: on the CPU that
    is CI's own test), then the other Triton cases when time is left."""
    planned, rest = cases(sh)
    out = [_item(c, "triton") for c in planned]
    if sh.gpu:
        out += [_item(c, "torch") for c in planned + rest]
    return out + [_item(c, "triton", optional=True) for c in rest]


STAGE = Stage("parity", 0.07, __doc__.split("\n\n")[0], items)
