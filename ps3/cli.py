"""``ps3-encode IMAGE``: encode one image, print token counts per scale, save a selection PNG
(left: the image with the patches of the finest scale that no look selected dimmed; right:
the selection probabilities)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .demo import demo_model
from .image_processing_ps3 import PS3ImageProcessor
from .modeling_ps3 import PS3VisionModel


def _look_count(value: str):
    return value if value == "all" else int(value)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ps3-encode", description=__doc__)
    parser.add_argument("image", nargs="?", help="image file (default: a synthetic test image)")
    parser.add_argument("--model", help="PS3 checkpoint folder (default: a small random built-in model)")
    parser.add_argument("--num-look-close", type=_look_count, default=1, help="int or 'all' (default 1)")
    parser.add_argument("--out", default="ps3_selection.png", help="where to write the selection PNG")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    return parser.parse_args(argv)


def synthetic_image(size: int = 1512) -> Image.Image:
    """A deterministic image with structure (rings and a few bright squares)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([np.sin(20 * np.hypot(xx - 0.3, yy - 0.4)), xx, yy], axis=-1) * 0.5 + 0.5
    for cx, cy in ((0.7, 0.2), (0.2, 0.8), (0.8, 0.75)):
        rgb[int(cy * size) : int(cy * size) + size // 12, int(cx * size) : int(cx * size) + size // 12] = 1.0
    return Image.fromarray((rgb * 255).astype(np.uint8))


def _heat(values: np.ndarray) -> np.ndarray:
    """Blue (low) to red (high) colours for values in [0, 1]."""
    return np.stack([values, 1 - np.abs(2 * values - 1), 1 - values], axis=-1)


def selection_figure(image: Image.Image, probs: torch.Tensor, selected: torch.Tensor | None) -> Image.Image:
    """Two panels: the image with unselected patches dimmed, and the selection probabilities
    (min-max stretched, so a flat random model still shows its ranking)."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    h, w = rgb.shape[:2]

    def upsample(t: torch.Tensor) -> np.ndarray:
        return np.asarray(Image.fromarray(t.float().cpu().numpy()).resize((w, h), Image.NEAREST))

    p = upsample(probs)
    p = (p - p.min()) / max(p.max() - p.min(), 1e-12)
    left = rgb if selected is None else rgb * (0.25 + 0.75 * upsample(selected)[..., None])
    panel = np.concatenate([left, _heat(p)], axis=1)
    return Image.fromarray((panel * 255).round().astype(np.uint8))


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model = PS3VisionModel.from_pretrained(args.model, dtype=dtype) if args.model else demo_model().to(dtype)
    model = model.to(args.device).eval()
    encoder = model.vision_model
    image = Image.open(args.image) if args.image else synthetic_image(encoder.ps3_scales[-1])
    has_processor = args.model and (Path(args.model) / "preprocessor_config.json").exists()
    processor = PS3ImageProcessor.from_pretrained(args.model) if has_processor else PS3ImageProcessor(image_size=encoder.ps3_scales[-1])
    x = processor(image)["pixel_values"][0][None].to(args.device, dtype)
    start = time.perf_counter()
    with torch.no_grad():
        out = model(x, num_look_close=args.num_look_close)
    seconds = time.perf_counter() - start
    print(f"image {image.size[0]}x{image.size[1]} -> scales {encoder.ps3_scales}, {seconds:.2f}s on {args.device}")
    print(f"  scale {encoder.ps3_scales[0]:>5}: {encoder.low_res_token_num:>6} tokens (low-res, all)")
    for scale, m in zip(encoder.ps3_scales[1:], out.selection_maps or []):
        print(f"  scale {scale:>5}: {int(m[0].sum()):>6} of {m[0].numel()} tokens selected")
    print(f"  total: {out.last_hidden_state.shape[1]} tokens of width {out.last_hidden_state.shape[2]}")
    selected = out.selection_maps[-1][0] if out.selection_maps else None
    selection_figure(image, out.selection_probs[-1][0], selected).save(args.out)
    print(f"selection probabilities written to {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
