"""Run Triton kernels under the interpreter when there is no GPU (must precede any triton import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
