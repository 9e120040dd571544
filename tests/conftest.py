"""Shared fixtures (the Triton interpreter switch is in the root conftest).

On CUDA, float32 matmuls and convolutions run in full fp32: PyTorch lets cuDNN use TF32 for
convolutions by default, which breaks the 1e-5 parity bounds (TF32 keeps 10 mantissa bits).
"""

import pytest
import torch

from helpers import poisoned_empty

if torch.cuda.is_available():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def poisoned():
    """Make every ``torch.empty`` NaN (floats) or -7 (ints), so an unwritten output element shows."""
    with poisoned_empty():
        yield
