"""A small random PS3 model with real PS3-1.5K geometry, for offline demos and smoke runs.

Scales 378/756/1512, patch 14 and upstream's default budget of 1280 high-res tokens per look;
only the trunk is tiny, so token counts and selection geometry are the real ones.
"""

from __future__ import annotations

import torch

from .configuration_ps3 import PS3VisionConfig
from .modeling_ps3 import PS3VisionModel


def demo_config(**overrides) -> PS3VisionConfig:
    kwargs = dict(
        model_name="ps3_demo_tiny", hidden_size=64, depth=4, num_heads=2, mlp_ratio=2.0, patch_size=14,
        ps3_scales=[378, 756, 1512], select_based_on_layer=[0, 1, 2, 3], max_select_num=1280,
        highres_selection_module_hidden_dim=16, highres_selection_module_out_dim=16, highres_selection_module_depth=1,
    )
    kwargs.update(overrides)
    return PS3VisionConfig(**kwargs)


def randomize_parameters_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for every parameter (upstream zero-inits several, which would hide paths)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".weight") and p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.copy_(torch.randn(p.shape, generator=gen) * fan_in**-0.5)
    return model


def demo_model(seed: int = 0, **overrides) -> PS3VisionModel:
    """The demo config with deterministic random weights."""
    return randomize_parameters_(PS3VisionModel(demo_config(**overrides)), seed).eval()
