"""The shallow ConvNeXt that scores saliency on a 1512x1512 view (``highres_selection_feature``).

Parameter names follow upstream's checkpoints (timm ConvNeXt blocks whose layer-scale
``gamma`` is stored as ``weight``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .vit import Mlp


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, kernel_size: int = 7):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)
        self.weight = nn.Parameter(torch.full((dim,), 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y)).permute(0, 3, 1, 2)
        return x + y * self.weight.reshape(1, -1, 1, 1)


class ShallowConvNet(nn.Module):
    def __init__(self, hidden_dim: int, out_dim: int, depth: int, kernel_size: int):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, hidden_dim, kernel_size=kernel_size, stride=kernel_size),
            LayerNorm2d(hidden_dim, eps=1e-6),
        )
        self.blocks = nn.Sequential(*[ConvNeXtBlock(hidden_dim) for _ in range(depth)])
        self.out_proj = nn.Conv2d(hidden_dim, out_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.blocks(self.stem(x)))
