"""Run Triton kernels under the interpreter when there is no GPU.

This must happen before anything imports triton, so it sits in the root conftest, which
pytest loads before collecting ``tests/`` and ``benchmarks/``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
