"""C-RADIO's SigLIP adapter: the MLP that maps the RADIO trunk's tokens into SigLIP's feature
space before PS3's MAP head, with the parameter names of upstream's checkpoints
(``vision_model.trunk.siglip_proj.*``).

Two versions exist (RADIO's ``adaptor_mlp``): ``v1`` is fc1 -> LayerNorm -> ReLU, then
``num_inner`` (Linear, LayerNorm, ReLU) layers, then fc2; ``v2`` (what PS3-C-RADIO uses) is
fc1, then ``num_inner`` residual blocks LayerNorm -> GELU -> Linear, then LayerNorm -> GELU ->
Linear. Their LayerNorms keep PyTorch's default eps (1e-5), unlike the trunk's 1e-6.

Upstream rebuilds the MAP head SigLIP-SO400M-shaped (16 heads, MLP ratio 3.7362) over the
adapter's output (``TrunkSpec.pool_shape``), so the pooled output is the adapter's width while
the hidden states keep the trunk's.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .configuration_ps3 import AdapterSpec


class AdapterV1(nn.Module):
    """fc1 -> LayerNorm -> ReLU, ``num_inner`` x (Linear, LayerNorm, ReLU) as ``inner``, fc2."""

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        hidden = spec.hidden_dim
        self.fc1 = nn.Linear(spec.input_dim, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.relu = nn.ReLU()
        layers = [m for _ in range(spec.num_inner) for m in (nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.ReLU())]
        self.inner = nn.Sequential(*layers) if layers else nn.Identity()
        self.fc2 = nn.Linear(hidden, spec.output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.inner(self.relu(self.norm(self.fc1(x)))))


def _norm_act_linear(width: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(width), nn.GELU(), nn.Linear(width, out))


class AdapterV2(nn.Module):
    """fc1, ``num_inner`` residual blocks (LayerNorm -> GELU -> Linear) as ``blocks``, and
    ``final`` (LayerNorm -> GELU -> Linear)."""

    def __init__(self, spec: AdapterSpec):
        super().__init__()
        hidden = spec.hidden_dim
        self.fc1 = nn.Linear(spec.input_dim, hidden)
        self.blocks = nn.ModuleList([_norm_act_linear(hidden, hidden) for _ in range(spec.num_inner)])
        self.final = _norm_act_linear(hidden, spec.output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        for block in self.blocks:
            x = x + block(x)
        return self.final(x)


def build_adapter(spec: AdapterSpec) -> nn.Module:
    return {"v1": AdapterV1, "v2": AdapterV2}[spec.version](spec)
