"""Stage ``parity``: the upstream-parity fixtures (``tests/test_model_parity.py``) on CUDA with
TF32 off, on the Triton backend (the subset that covers every kernel path first) and then on the
PyTorch backend; relative error <= 1e-5 on every output, selection maps identical."""

from __future__ import annotations

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


def cases(sh: Shapes) -> list[str]:
    """Every model-call fixture, the Triton subset first (the dry run: the first one)."""
    from test_model_parity import CASES, TRITON_CASES

    return list(dict.fromkeys(TRITON_CASES + CASES))[: sh.parity_cases]


def items(sh: Shapes) -> list[WorkItem]:
    from test_model_parity import load_case

    out = []
    backends = ("triton", "torch") if sh.gpu else ("triton",)  # the PyTorch backend on the CPU is CI's own test
    for backend in backends:
        for case in cases(sh):
            uses_kernels = backend == "triton" and load_case(case)[0]["call"] not in ("text", "ps3_encode_text")
            out.append(check_item(f"upstream parity {case} ({backend})", 0.3,
                                  lambda ctx, c=case, b=backend: check_parity(ctx, c, b),
                                  (parity_case(case),) if uses_kernels else ()))
    return out


STAGE = Stage("parity", 0.08, __doc__.split("\n\n")[0], items)
