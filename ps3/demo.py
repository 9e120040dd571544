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
    """Random values for every parameter, drawn on the parameter's device.

    Upstream zero-inits several parameters, which would hide whole paths in tests; here
    1-D weights (norms, layer scales) are ``N(1, 0.1)`` and everything else ``N(0, fan_in^-1/2)``.
    """
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = generators.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            if name.endswith(".weight") and p.dim() == 1:
                p.normal_(1.0, 0.1, generator=gen)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.normal_(0.0, fan_in**-0.5, generator=gen)
    return model


def demo_model(seed: int = 0, **overrides) -> PS3VisionModel:
    """The demo config with deterministic random weights."""
    return randomize_parameters_(PS3VisionModel(demo_config(**overrides)), seed).eval()
