"""``ps3-extract``'s data path: decoding in DataLoader workers, token-budget batches, encoding.

Workers decode and resize images (uint8, aspect ratio kept) and pack them into batches by
token budget; the main process normalises a batch on the device and encodes it as one list
input of :class:`~ps3.PS3VisionModel` (images of different sizes in one packed forward).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import count

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..demo import load_towers
from ..image_processing_ps3 import PS3ImageProcessor
from ..modeling_ps3 import PS3VisionEncoder, PS3VisionModel
from ..outputs import pool_each
from ..selection_plan import plan_looks
from .shards import shard_name
from .sources import Chunker, Failure, ImageInput, Pending, Sample, open_image, token_batches

FEATURES = {"pooled": ("pooled", "pooled_highres"), "tokens": ("tokens", "selection"), "both": ("pooled", "pooled_highres", "tokens", "selection")}


def load_models(folder: str | None, dtype: torch.dtype, device: torch.device | str, with_text: bool):
    """``(vision model, text model or None, tokenizer or None)`` on ``device``, from a
    checkpoint folder or the small built-in random model (``folder=None``), as
    :func:`ps3.demo.load_towers` finds them; the text side only when ``with_text``."""
    vision, text, tokenizer = load_towers(folder, dtype=dtype, with_text=with_text)
    return vision.to(device), None if text is None else text.to(device), tokenizer


class ImagePrep:
    """Decode, resize and count tokens in a DataLoader worker: the encoder's size rules
    without its weights (its own :class:`~ps3.geometry.ScaleGeometry`, so the counts are the model's).

    With ``squash`` every image is resized to the processor's square size, as upstream's
    processor does; otherwise to the size the model gives it at its largest scale (longer
    side = that scale, aspect ratio kept to whole patches), so the model's own resize at that
    scale is the identity.
    """

    def __init__(self, encoder: PS3VisionEncoder, processor: PS3ImageProcessor, look: dict, squash: bool):
        self.geometry = encoder.geometry
        self.max_select_num_each_scale = list(encoder.max_select_num_each_scale)
        self.low_res_token_num = encoder.low_res_token_num
        self.processor = processor
        self.look = look
        self.squash = squash

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if self.squash:
            return tuple(self.processor.image_size)
        return self.geometry.image_size((height, width), len(self.geometry.scales) - 1)

    def tokens(self, size: tuple[int, int]) -> int:
        """Encoder tokens of an image of ``size``: low-res plus every look's quota."""
        patches = [h * w for h, w in self.geometry.highres_grids(size)]
        plan = plan_looks(patches, self.max_select_num_each_scale, self.look.get("num_look_close"), self.look.get("num_token_look_close"))
        return self.low_res_token_num + sum(map(sum, plan))

    def __call__(self, sample: Sample) -> Pending:
        image = open_image(sample.data)
        size = self.target_size(image.height, image.width)
        return Pending(sample.image_id, self.processor.resize_to_uint8(image, size), self.tokens(size))


@dataclass
class Batch:
    """Decoded images of one shard, and the failures met since the previous message."""

    part: int
    chunk: int
    images: list[Pending]
    failures: list[Failure] = field(default_factory=list)

    def pin_memory(self) -> "Batch":
        """Called by a DataLoader with ``pin_memory=True``: page-locked pixels copy to the GPU asynchronously."""
        for image in self.images:
            image.pixels = image.pixels.pin_memory()
        return self


@dataclass
class ShardEnd:
    """All of a shard's images were sent; ``last`` when it is its part's last shard."""

    part: int
    chunk: int
    last: bool
    failures: list[Failure] = field(default_factory=list)


class BatchStream(IterableDataset):
    """One rank's unfinished parts as messages: batches, then a :class:`ShardEnd` per shard.

    DataLoader worker ``w`` of ``K`` takes parts ``w, w+K, ...`` and sends each part's shards
    in order. Shards in ``finished`` are skipped (a tar's samples are still read past).
    """

    def __init__(self, source: ImageInput, parts: list[int], shard_size: int, finished: set[str], prep: ImagePrep, budget: int):
        self.source, self.parts, self.shard_size = source, parts, shard_size
        self.finished, self.prep, self.budget = finished, prep, budget

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for part in self.parts[worker::workers]:
            yield from self._part(part)

    def _part(self, part: int):
        failures: list[Failure] = []
        chunks = Chunker(self.source.samples(part, self.shard_size, failures))
        for chunk in count():
            samples = chunks.take(self.shard_size)
            done = shard_name(part, chunk) in self.finished
            if done:
                for _ in samples:
                    pass
            else:
                for images in token_batches(self._decode(samples, failures), self.budget):
                    yield Batch(part, chunk, images, _drain(failures))
            last = chunks.exhausted()  # a stream error met here belongs to this shard
            if done:
                failures.clear()
            else:
                yield ShardEnd(part, chunk, last, _drain(failures))
            if last:
                return

    def _decode(self, samples, failures: list[Failure]):
        for sample in samples:
            try:
                yield self.prep(sample)
            except Exception as exn:  # any undecodable input is recorded, never fatal
                failures.append(Failure(sample.image_id, f"{type(exn).__name__}: {exn}"))


def _drain(items: list) -> list:
    out = items[:]
    items.clear()
    return out


class FeatureEncoder:
    """Encode one batch (list input, one packed forward) and cut out each image's features.

    ``pooled`` is the MAP attention-pool head over the final layer's low-res tokens: the
    whole-image embedding upstream returns as ``pooled_output`` for global captions
    (``is_global_text``). ``pooled_highres`` is the same head over the looks' high-res tokens:
    upstream's pre-training ``pooled_output`` for the selected region (prompt-conditioned with
    ``--prompt``). ``tokens`` is the chosen layer's tokens, low-res first, then the selected
    high-res tokens per scale in raster order; ``selection_<scale>`` says where they sit.
    """

    def __init__(self, model: PS3VisionModel, processor: PS3ImageProcessor, features: str, layer: int, look: dict,
                 prompt: torch.Tensor | None):
        self.model = model
        self.encoder = model.vision_model
        depth = self.encoder.layers
        if not -depth <= layer < depth:
            raise ValueError(f"--layer must be in [{-depth}, {depth - 1}] for this {depth}-layer model, got {layer}")
        # Kept layers end at the last one; without looks the model returns every layer.
        self.keep = -layer if layer < 0 else depth - layer
        self.encoder.num_hidden_layers_to_return = self.keep
        self.processor = processor
        self.names = FEATURES[features]
        self.look = look
        self.prompt = prompt
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @torch.inference_mode()
    def __call__(self, images: list[Pending]) -> list[dict[str, torch.Tensor]]:
        pixels = [self.processor.normalize_uint8(im.pixels.to(self.device, non_blocking=True)).to(self.dtype) for im in images]
        prompt = None if self.prompt is None else self.prompt.expand(len(images), -1)
        out = self.model(pixels, prompt=prompt, output_hidden_states=True, **self.look)
        low = self.encoder.low_res_token_num
        last = [layers[-1][0] for layers in out.hidden_states]
        feats: list[dict[str, torch.Tensor]] = [{} for _ in images]
        if "pooled" in self.names:
            for f, p in zip(feats, self.encoder.pool(torch.stack([x[:low] for x in last]))):
                f["pooled"] = p
        high = [x[low:] for x in last]
        if "pooled_highres" in self.names and any(len(h) for h in high):
            for f, p in zip(feats, pool_each(self.encoder.pool, high)):
                f["pooled_highres"] = p
        if "tokens" in self.names:
            for b, f in enumerate(feats):
                f["tokens"] = out.hidden_states[b][-self.keep][0]
                for scale, m in zip(self.encoder.ps3_scales[1:], out.selection_maps[b] if out.selection_maps else []):
                    f[f"selection_{scale}"] = m[0].bool()
        return [{k: v.to("cpu") for k, v in f.items()} for f in feats]


def default_workers() -> int:
    """DataLoader workers per rank: the CPUs this rank may use, shared with the other local ranks."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))
