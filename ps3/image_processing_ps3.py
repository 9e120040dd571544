"""PS3's image processor: squash-resize, RGB, scale to [0, 1], normalise with CLIP statistics.

Upstream runs torchvision's ``Resize`` -> RGB -> ``ToTensor`` -> ``Normalize``. On a PIL image
those are PIL's own ``resize`` with the same filter, ``uint8 / 255`` in float32 and
``(x - mean) / std``, which is exactly what is done here with PIL and torch alone (no
torchvision), so the outputs are identical.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers.image_processing_utils import BaseImageProcessor

OPENAI_DATASET_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_DATASET_STD = (0.26862954, 0.26130258, 0.27577711)
INTERPOLATIONS = ("bicubic", "bilinear", "random")  # upstream treats "random" as bicubic
# Keys that to_dict() writes but that are derived from the constructor arguments.
_DERIVED_KEYS = ("size", "crop_size", "image_mean", "image_std")


def _per_channel(value, default, name: str) -> tuple[float, ...]:
    if value is None:
        return default
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if number(value):
        return (float(value),) * 3
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 3 and all(map(number, value)):
        return tuple(float(v) for v in value)
    raise ValueError(f"{name} must be a number or 3 numbers, got {value!r}")


class PS3ImageProcessor(BaseImageProcessor):
    """One image (or a list) -> ``{"pixel_values": [tensor (3, H, W), ...]}``.

    Accepted images: ``PIL.Image.Image`` (any mode; resized in its own mode, then converted
    to RGB, as upstream does), or a ``torch.Tensor`` ``(C, H, W)`` with C in {1, 3, 4}:
    ``uint8`` tensors go through PIL exactly like the equivalent PIL image; floating tensors
    (values in [0, 1]) are resized with ``F.interpolate(..., antialias=True)``, which is what
    torchvision does for tensors, so they are close to but not bit-identical with PIL.
    A fourth channel is treated as alpha and dropped; one channel is repeated to RGB.
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        image_size: int | tuple[int, int] | None = None,
        mean: float | tuple[float, ...] | None = None,
        std: float | tuple[float, ...] | None = None,
        resize_mode: str | None = None,
        interpolation: str | None = None,
        **kwargs,
    ):
        # Upstream ignores other kwargs (the derived attributes it saved come back here).
        for key in _DERIVED_KEYS:
            kwargs.pop(key, None)
        super().__init__()
        if isinstance(image_size, int) and not isinstance(image_size, bool):
            image_size = (image_size, image_size)
        if (
            not isinstance(image_size, Sequence)
            or len(image_size) != 2
            or not all(isinstance(s, int) and s > 0 for s in image_size)
        ):
            raise ValueError(f"image_size must be a positive int or an (height, width) pair, got {image_size!r}")
        self.image_size = tuple(image_size)
        self.mean = _per_channel(mean, OPENAI_DATASET_MEAN, "mean")
        self.std = _per_channel(std, OPENAI_DATASET_STD, "std")
        if not all(math.isfinite(m) for m in self.mean):
            raise ValueError(f"mean must be finite, got {self.mean}")
        if not all(math.isfinite(s) and s > 0 for s in self.std):
            raise ValueError(f"std must be positive and finite (it divides the pixels), got {self.std}")
        self.resize_mode = resize_mode or "squash"
        if self.resize_mode != "squash":
            raise ValueError(f"resize_mode must be 'squash', got {self.resize_mode!r}")
        self.interpolation = interpolation or "bicubic"
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")
        # Attributes VILA reads (upstream derives them from the height only).
        self.size = {"shortest_edge": self.image_size[0]}
        self.crop_size = {"height": self.image_size[0], "width": self.image_size[0]}
        self.image_mean = self.mean
        self.image_std = self.std

    @property
    def _pil_filter(self) -> Image.Resampling:
        return Image.Resampling.BILINEAR if self.interpolation == "bilinear" else Image.Resampling.BICUBIC

    def resize_to_uint8(self, image: Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
        """The processor's pixels before scaling: ``image`` resized (in its own mode, with the
        processor's filter) to ``size`` (height, width; default ``image_size``), then RGB, as a
        ``(3, H, W)`` uint8 tensor. Loaders that resize each image to its own size (aspect kept)
        decode with this and finish with :meth:`normalize_uint8`, a quarter of the bytes in transit."""
        height, width = size or self.image_size
        image = image.resize((width, height), self._pil_filter).convert("RGB")
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalize_uint8(self, pixels: torch.Tensor) -> torch.Tensor:
        """``(..., 3, H, W)`` uint8 RGB -> normalised float32 on ``pixels``' device, exactly what
        :meth:`preprocess` computes for a PIL image."""
        mean = torch.tensor(self.mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
        return (pixels.float().div(255) - mean) / std

    def _resize_pil(self, image: Image.Image) -> torch.Tensor:
        return self.resize_to_uint8(image).float().div(255)

    def _resize_float(self, image: torch.Tensor) -> torch.Tensor:
        mode = "bilinear" if self.interpolation == "bilinear" else "bicubic"
        image = image.float()
        if tuple(image.shape[-2:]) == self.image_size:
            return image
        return F.interpolate(image[None], size=self.image_size, mode=mode, align_corners=False, antialias=True)[0]

    def _to_tensor(self, image) -> torch.Tensor:
        if isinstance(image, Image.Image):
            if image.width < 1 or image.height < 1:
                raise ValueError(f"image is {image.width}x{image.height} pixels; it needs at least one pixel")
            return self._resize_pil(image)
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"image must be a PIL.Image, a torch.Tensor (C, H, W) or a list of them, got {type(image).__name__}")
        if image.dim() != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(f"image tensors must be (C, H, W) with C in (1, 3, 4), got shape {tuple(image.shape)}")
        if image.shape[1] < 1 or image.shape[2] < 1:
            raise ValueError(f"image is {image.shape[2]}x{image.shape[1]} pixels; it needs at least one pixel")
        image = image.detach().cpu()
        if image.dtype == torch.uint8:
            channels = image.permute(1, 2, 0).numpy()
            mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[0]]
            return self._resize_pil(Image.fromarray(channels[..., 0] if mode == "L" else channels, mode))
        if not image.dtype.is_floating_point:
            raise TypeError(f"image tensors must be uint8 or floating point, got {image.dtype}")
        image = image[:3] if image.shape[0] == 4 else image.expand(3, -1, -1) if image.shape[0] == 1 else image
        return self._resize_float(image)

    def preprocess(self, image, return_tensors=None, **kwargs) -> dict[str, list[torch.Tensor]]:
        """``return_tensors`` is accepted for API compatibility; like upstream, the result is
        always a list of ``(3, H, W)`` float32 tensors (index ``[0]`` for a single image)."""
        if return_tensors is not None and getattr(return_tensors, "value", return_tensors) != "pt":
            raise ValueError(f"return_tensors must be None or 'pt', got {return_tensors!r}")
        images = list(image) if isinstance(image, (list, tuple)) else [image]
        if not images:
            raise ValueError("image must not be an empty list")
        mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)
        return {"pixel_values": [(self._to_tensor(img) - mean) / std for img in images]}

    def __call__(self, images, *args, **kwargs) -> dict[str, list[torch.Tensor]]:
        return self.preprocess(images, *args, **kwargs)
