"""``ps3-encode IMAGE``: encode one image, print token counts per scale, save a selection PNG."""

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


def selection_overlay(image: Image.Image, probs: torch.Tensor) -> Image.Image:
    """Image blended with the selection probability map (red = likely to be looked at)."""
    heat = (probs.float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    heat = Image.fromarray(heat).resize(image.size, Image.NEAREST)
    red = Image.merge("RGB", (heat, Image.new("L", image.size, 0), Image.new("L", image.size, 0)))
    return Image.blend(image.convert("RGB"), red, 0.5)


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    model = PS3VisionModel.from_pretrained(args.model, dtype=dtype) if args.model else demo_model().to(dtype)
    model = model.to(args.device).eval()
    encoder = model.vision_model
    image = Image.open(args.image) if args.image else synthetic_image(encoder.ps3_scales[-1])
    processor = PS3ImageProcessor(image_size=encoder.ps3_scales[-1])
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
    selection_overlay(image, out.selection_probs[0][0]).save(args.out)
    print(f"selection probabilities written to {Path(args.out).resolve()}")


if __name__ == "__main__":
    main()
