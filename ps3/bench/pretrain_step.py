"""One PS3 pre-training step as upstream's trainer (``train/`` of NVlabs/PS3, an OpenCLIP fork)
runs it, written once and run on both sides of ``benchmarks/bench_train.py``.

The step: the text tower encodes the caption (its pooled embedding, normalised, and the prompt it
projects); the vision tower runs ``visual(images, prompt, gt_selection_maps, is_global_text,
pool_gt_token_only=True)``; the loss is SigLIP's on the normalised pooled embeddings plus binary
cross-entropy of the prior (bottom-up) and posterior (top-down) selection probabilities against the
ground-truth boxes, area-resized to each scale's grid, on the captions that are local (box)
captions; backward; AdamW step; the logit scale clamped to ``[0, ln 100]``. Gradient checkpointing
is on in both towers (the reference script's ``--grad-checkpointing``); ``autocast`` is the
trainer's ``--precision amp`` (bf16 here).

Imports nothing from this project (the standard library and torch only): upstream's worker loads
this file by its path in upstream's environment, where ``ps3`` is upstream's package, and builds
the same :class:`PretrainModel` from upstream's classes.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSS_TERMS = ("contrastive_loss", "prior_box_supervision_loss", "posterior_box_supervision_loss")


class PretrainModel(nn.Module):
    """The trainer's CLIP model with a PS3 vision tower: ``visual`` (the vision encoder), ``text``
    (a text tower returning ``pooled_output`` and ``prompt``), SigLIP's logit scale and bias."""

    def __init__(self, visual: nn.Module, text: nn.Module, logit_scale: float = math.log(10.0), logit_bias: float = -10.0):
        super().__init__()
        self.visual, self.text = visual, text
        self.logit_scale = nn.Parameter(torch.tensor(float(logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias)))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.visual.trunk.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)


def make_batch(batch: int, resolution: int, vocab_size: int, context_length: int, seed: int = 0,
               global_every: int = 4) -> dict[str, torch.Tensor]:
    """Synthetic inputs as the trainer's loader gives them (CPU, fp32): images in [-1, 1], token
    ids, one ground-truth box per image as a 0/1 map of the image's size, and ``is_global_text``
    ``(B, 1)`` for every ``global_every``-th sample counted from the last (global captions come
    with a whole-image box); batch 1 is one local caption."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, resolution, resolution, generator=gen) * 2 - 1
    text = torch.randint(1, vocab_size, (batch, context_length), generator=gen)
    gt = torch.zeros(batch, resolution, resolution)
    is_global = torch.zeros(batch, 1, dtype=torch.bool)
    for b in range(batch):
        if (batch - 1 - b) % global_every == global_every - 1:
            is_global[b] = True
            gt[b] = 1
            continue
        side = torch.randint(resolution // 8, resolution // 3, (2,), generator=gen).tolist()
        top = int(torch.randint(0, resolution - side[0], (1,), generator=gen))
        left = int(torch.randint(0, resolution - side[1], (1,), generator=gen))
        gt[b, top : top + side[0], left : left + side[1]] = 1
    return {"images": images, "text": text, "gt_selection_maps": gt, "is_global_text": is_global}


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP's sigmoid loss on one process: +1 labels on the diagonal, -1 elsewhere, summed / B."""
    logits = logit_scale * image_features @ text_features.T + logit_bias
    labels = 2 * torch.eye(len(logits), device=logits.device, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)


def box_supervision_loss(probs: list[torch.Tensor], gt_selection_maps: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """Mean over scales of the binary cross-entropy (fp32) of ``(B, h, w)`` selection
    probabilities against the box maps area-resized to ``(h, w)`` (> 0 is inside), local rows only."""
    terms = []
    with torch.autocast(gt_selection_maps.device.type, enabled=False):
        for p in probs:
            gt = F.interpolate(gt_selection_maps[:, None].float(), size=p.shape[1:], mode="area")[:, 0] > 0
            terms.append(F.binary_cross_entropy(p[local].float(), gt[local].float()))
    return sum(terms) / len(terms)


def pretrain_losses(model: PretrainModel, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward of one step and its loss terms (weights 1, as the reference script sets them)."""
    text = model.text(batch["text"])
    text_features = F.normalize(text.pooled_output, dim=-1)
    gt, is_global = batch["gt_selection_maps"], batch["is_global_text"]
    out = model.visual(batch["images"], text.prompt, gt, is_global, pool_gt_token_only=True)
    image_features = F.normalize(out.pooled_output, dim=-1)
    losses = {"contrastive_loss": siglip_loss(image_features, text_features, model.logit_scale.exp(), model.logit_bias)}
    local = is_global.logical_not().squeeze(-1)
    priors, posteriors = out.bottomup_selection_probs, out.topdown_selection_probs
    if local.any():
        losses["prior_box_supervision_loss"] = box_supervision_loss(priors, gt, local)
        losses["posterior_box_supervision_loss"] = box_supervision_loss(posteriors, gt, local)
    else:  # zero, but keeps the selection heads in the graph (as the trainer does)
        losses["prior_box_supervision_loss"] = priors[0].mean() * 0
        losses["posterior_box_supervision_loss"] = posteriors[0].mean() * 0
    return losses


def train_step(model: PretrainModel, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor],
               autocast: torch.dtype | None = None, mark: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    """zero_grad, forward under autocast, backward, optimizer step, logit scale clamp; the loss
    terms. ``mark(phase)`` is called after each of ``zero_grad``, ``forward``, ``backward``, ``optimizer``."""
    mark = mark or (lambda phase: None)
    optimizer.zero_grad(set_to_none=True)
    mark("zero_grad")
    device = batch["images"].device.type
    with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
        losses = pretrain_losses(model, batch)
        total = sum(losses.values())
    mark("forward")
    total.backward()
    mark("backward")
    optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    mark("optimizer")
    return {k: v.detach() for k, v in losses.items()}


def make_optimizer(model: nn.Module) -> torch.optim.AdamW:
    """AdamW with the reference script's settings (lr 5e-6, betas 0.9/0.95, weight decay 3e-4 on
    weights of 2+ dims, none on gains, biases, embeddings' 1-D params and the logit scale/bias)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "logit_" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "logit_" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 3e-4}, {"params": rest, "weight_decay": 0.0}],
                             lr=5e-6, betas=(0.9, 0.95), eps=1e-8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(model: PretrainModel, batch: dict[str, torch.Tensor], live_bytes: Callable[..., Any],
              steps: int = 2, autocast: torch.dtype | None = None, where: bool = False) -> dict[str, Any]:
    """``steps`` timed training steps (the first also creates the optimizer state), then one more with
    its live tensor bytes tracked by ``live_bytes`` (the harness's :class:`LiveBytes`; tracked apart
    because a dispatch mode adds Python work per op, and makes some backward formulas take their
    out-of-place form, so the tracked step's bytes can only overstate). Returns step times (ms), loss
    terms per step (the tracked one last), the process's CPU time per timed step (ms, all threads), the tracked step's peak, its phases' peaks (``zero_grad``,
    ``forward``, ``backward``, ``optimizer``) and the bytes alive at its start (parameters,
    gradients, optimizer state, inputs); on CUDA the allocator's peak of each timed step. ``where``:
    the tracked step's bytes at each phase's peak by the op and lines that made them."""
    device = batch["images"].device
    model.train().set_grad_checkpointing(True)
    optimizer = make_optimizer(model)
    record: dict[str, Any] = {"step_ms": [], "cpu_ms": [], "losses": [], "cuda_max_allocated_bytes": []}
    for _ in range(steps):
        gc.collect()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        losses = train_step(model, optimizer, batch, autocast)
        _sync(device)
        record["step_ms"].append((time.perf_counter() - start) * 1e3)
        record["cpu_ms"].append((time.process_time() - cpu_start) * 1e3)  # all threads: steadier on a shared CPU
        record["losses"].append({k: float(v) for k, v in losses.items()})
        if device.type == "cuda":
            record["cuda_max_allocated_bytes"].append(torch.cuda.max_memory_allocated(device))

    gc.collect()
    tracker = live_bytes(where=where)
    tracker.track(list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None])
    tracker.track([list(s.values()) for s in optimizer.state.values()]).track(list(batch.values()))
    record["start_live_bytes"] = tracker.current
    phases: dict[str, int] = {}
    labels: dict[str, list] = {}

    def mark(phase: str) -> None:
        phases[phase] = tracker.peak
        if where:
            labels[phase] = tracker.at_peak(40)
        tracker.reset_peak()

    with tracker:
        losses = train_step(model, optimizer, batch, autocast, mark)
    record["losses"].append({k: float(v) for k, v in losses.items()})
    record.update(peak_live_bytes=max(phases.values()), phase_peak_bytes=phases, peak_by_label=labels or None)
    del optimizer, tracker
    gc.collect()
    return record
