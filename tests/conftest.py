"""Shared fixtures (the Triton interpreter switch is in the root conftest)."""

import pytest
import torch


@pytest.fixture
def poisoned(monkeypatch):
    """Make every ``torch.empty`` NaN (floats) or -7 (ints), so an unwritten output element shows."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan") if out.is_floating_point() else -7)

    monkeypatch.setattr(torch, "empty", empty)
