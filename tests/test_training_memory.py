"""Regression guards for what training keeps and rebuilds: PS3's resizes copy no batch, and the
Triton path under gradient checkpointing recomputes its blocks on the forward's tables (no host
table is built during backward)."""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ps3_kernels.layout
from ps3 import PS3VisionModel
from ps3.bench.harness import LiveBytes
from ps3.demo import randomize_parameters_
from ps3.geometry import resize_all
from ps3_kernels import use_backend

from helpers import DEVICE, tiny_vision_config


class OpLog(TorchDispatchMode):
    """Every op's name and the bytes of its tensor outputs."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, (tuple, list)) else [out]
        size = sum(t.untyped_storage().nbytes() for t in outs if isinstance(t, torch.Tensor))
        self.ops.append((func.overloadpacket.__name__, size))
        return out


def test_resize_all_makes_nothing_but_the_resized_batch():
    batch = torch.randn(2, 3, 60, 50)
    out_bytes = 2 * 3 * 112 * 112 * 4
    in_bytes = batch.numel() * 4
    with LiveBytes() as live:
        out = resize_all(batch, (112, 112))
    assert live.peak == in_bytes + out_bytes  # a batch is resized as it is: no stack, no cat
    images = list(batch.unbind(0))
    with LiveBytes() as live:
        out = resize_all(images, (112, 112))
    assert live.peak == 2 * in_bytes + out_bytes  # one size: the stack of the inputs, then the resize
    mixed = [batch[0], torch.randn(3, 50, 60), batch[1]]
    out = resize_all(mixed, (112, 112))
    for i, image in enumerate(mixed):  # several sizes: one resize per size, back in input order
        assert torch.equal(out[i], resize_all(image[None], (112, 112))[0])


def test_forward_copies_no_resized_batch_and_no_position_table():
    """The 1512 px view of the selection ConvNet (27 MB an image at fp32) and the low-res view come
    straight from the resize: no cat or stack of that size runs in a training forward; nor is a
    position table concatenated (PS3-4K's position tables and residuals are ~400 MB each)."""
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config()), seed=1).train()
    encoder = model.vision_model
    images = torch.randn(2, 3, 224, 224)
    view_bytes = 2 * 3 * 1512 * 1512 * 4
    tables = {sum(r.numel() * 4 for r in encoder.pos_emb_residual)}  # residuals of all scales
    tables.add(sum(s * s * encoder.width * 4 for s in (8, 16)))  # position tables of both grid sides
    for pixels in (images, list(images.unbind(0))):
        with OpLog() as log:
            encoder(pixels)  # the pre-training call: one look, pooled
        copies = [(op, size) for op, size in log.ops if op in ("cat", "stack") and (size >= view_bytes // 2 or size in tables)]
        assert not copies, copies
        assert any(op == "upsample_bicubic2d" and size == view_bytes for op, size in log.ops)


def test_checkpointed_triton_backward_builds_no_host_tables(monkeypatch):
    """With gradient checkpointing the blocks run again in backward; on the Triton path they reuse the
    forward's layout tables and attention schedules: no ``torch.tensor`` from host values (``lift_fresh``),
    no new :func:`~ps3_kernels.layout.device_table` entry, each attention schedule (block map per
    block size, prefix-row CSR) built once for all layers, and every gradient equals the run without
    checkpointing."""
    import ps3_kernels.triton.varlen_attention as attention

    builds: list[tuple] = []
    kept = attention._kept

    def counting(table, key, build):
        return kept(table, key, lambda: builds.append((id(table), key)) or build())

    monkeypatch.setattr(attention, "_kept", counting)
    monkeypatch.setattr(attention, "_SCHEDULES", {})  # nothing kept from other tests: backward builds its own
    monkeypatch.setattr(ps3_kernels.layout, "_TABLES", collections.OrderedDict())
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config(depth=2, select_based_on_layer=[0, 1])),
                                  seed=2).to(DEVICE).train()
    images = torch.randn(2, 3, 224, 196, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    trunk = model.vision_model.trunk

    def grads(checkpointing: bool):
        trunk.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        with use_backend("triton"):
            out = model(images, num_look_close=2)
            loss = out.last_hidden_state.square().sum() + sum(p.sum() for p in out.selection_probs)
            tables = set(map(id, ps3_kernels.layout._TABLES.values()))
            builds.clear()
            with OpLog() as log:
                loss.backward()
        new_tables = set(map(id, ps3_kernels.layout._TABLES.values())) - tables
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return grads, log.ops, new_tables, list(builds)

    checked, ops, new_tables, built = grads(True)
    plain, _, _, _ = grads(False)
    names = [op for op, _ in ops]
    assert "varlen_prefix_attention" in names  # the blocks did run again in backward
    assert "lift_fresh" not in names and not new_tables
    assert built and len(built) == len(set(built)), built  # backward's schedules: each built once, for both layers
    assert plain.keys() == checked.keys()
    for name, g in plain.items():
        torch.testing.assert_close(checked[name], g, rtol=1e-5, atol=1e-6, msg=name)
