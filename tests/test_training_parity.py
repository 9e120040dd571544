"""A training step on the Triton backend (interpreted on the CPU) equals the PyTorch backend for every
parameter, with a loss on the features *and* the selection probabilities (what VILA-HD's top-down
selection tuning uses): the selection heads must get their gradients through the Triton ops too."""

from __future__ import annotations

import pytest
import torch

from ps3 import PS3VisionModel
from ps3.demo import randomize_parameters_
from ps3_kernels import use_backend

from helpers import DEVICE, rel_err, tiny_vision_config

SELECTION_HEADS = ("selection_feature_proj", "prior_prompt", "highres_selection_feature_module",
                   "prompt_proj_for_highres")


def training_grads(model, backend_name, images, prompt, weights):
    """Gradients of every parameter (and of the prompt) for one loss on features and probabilities."""
    model.zero_grad(set_to_none=True)
    prompt = None if prompt is None else prompt.clone().requires_grad_()
    with use_backend(backend_name):
        out = model(images, prompt=prompt, num_look_close=2)
    probs = out.selection_probs + (out.bottomup_selection_probs if prompt is not None else [])
    loss = (out.last_hidden_state * weights["features"]).sum()
    loss = loss + sum((p * w).sum() for p, w in zip(probs, weights["probs"] * 2))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    if prompt is not None:
        grads["prompt"] = prompt.grad
    return grads, out


@pytest.mark.parametrize("top_down", [False, True], ids=["bottom_up", "top_down"])
def test_training_step_matches_torch_backend(top_down):
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config(depth=2, select_based_on_layer=[0, 1])),
                                  seed=5).to(DEVICE).train()
    gen = torch.Generator().manual_seed(6)
    images = torch.randn(2, 3, 224, 196, generator=gen).to(DEVICE)
    prompt = torch.randn(2, 64, generator=gen).to(DEVICE) if top_down else None
    with torch.no_grad(), use_backend("torch"):
        shapes = model(images, prompt=prompt, num_look_close=2)
    weights = {"features": torch.randn(shapes.last_hidden_state.shape, generator=gen).to(DEVICE),
               "probs": [torch.randn(p.shape, generator=gen).to(DEVICE) for p in shapes.selection_probs]}

    ref, ref_out = training_grads(model, "torch", images, prompt, weights)
    got, out = training_grads(model, "triton", images, prompt, weights)
    for a, b in zip(out.selection_maps, ref_out.selection_maps):
        assert torch.equal(a, b)  # same selections, so the same tokens
    errors = {}
    for name, r in ref.items():
        g = got[name]
        assert (g is None) == (r is None), name
        if r is not None:
            errors[name] = rel_err(g, r)
    assert max(errors.values()) <= 1e-4, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
    for head in SELECTION_HEADS:  # the selection heads do receive gradient from the probabilities
        head_grads = [g for n, g in got.items() if n.startswith(f"vision_model.{head}") and g is not None]
        assert head_grads and all(torch.isfinite(g).all() for g in head_grads), head
        assert sum(g.abs().sum() for g in head_grads) > 0, head
    if top_down:
        assert got["prompt"] is not None and errors["prompt"] <= 1e-4
