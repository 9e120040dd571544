"""``ps3-encode IMAGE``: encode one image bottom-up and, with ``--prompt``, top-down for each
prompt; print the tokens selected per scale and save a figure of what each look selected and
of the selection probability (one row per selection), optionally the features as safetensors.

    ps3-encode dock.jpg --model PS3-1.5K-SigLIP --prompt "the sign on the dock" --num-look-close 2
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError

from .cli_common import ArgumentParser, UsageError, check_output_file, fail, look_count, parse_device, quiet_transformers
from .demo import PS3Towers, image_processor, load_towers
from .image_processing_ps3 import PS3ImageProcessor
from .modeling_ps3 import PS3VisionModelOutput

PROG = "ps3-encode"


def parse_args(argv=None):
    parser = ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("image", nargs="?", help="image file (default: a synthetic test image)")
    parser.add_argument("--model", help="PS3 checkpoint folder (default: a small random built-in model with a text tower)")
    parser.add_argument("--text-model", help="text tower folder for a vision-only --model (a combined ps3 checkpoint has its own)")
    parser.add_argument("--prompt", action="append", default=[],
                        help="text that steers the selection (top-down); repeat for several prompts, one figure row each")
    looks = parser.add_mutually_exclusive_group()
    looks.add_argument("--num-look-close", type=look_count, help="high-res looks: int >= 0 or 'all' (default 1)")
    looks.add_argument("--num-token-look-close", type=look_count, help="high-res tokens in total instead: int >= 0 or 'all'")
    parser.add_argument("--out", default="ps3_selection.png", help="figure file (default ps3_selection.png; .png, .pdf, .svg, ...)")
    parser.add_argument("--save-features", metavar="FILE",
                        help="write features, selection maps, look maps and probabilities of every selection as safetensors")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    if args.num_look_close is None and args.num_token_look_close is None:
        args.num_look_close = 1
    if any(not p.strip() for p in args.prompt):
        parser.error("--prompt must not be empty")
    if args.text_model is not None and args.model is None:
        parser.error("--text-model needs --model (the built-in model has its own text tower)")
    return args


def synthetic_image(size: int = 1512) -> Image.Image:
    """A deterministic harbour scene (sky, sun, sea with waves, a dock with a sign, a boat):
    flat shapes with edges and small details, and it compresses well in a PNG."""
    from PIL import ImageDraw

    image = Image.new("RGB", (size, size), (150, 200, 235))
    draw = ImageDraw.Draw(image)

    def box(x0, y0, x1, y1):
        return [int(x0 * size), int(y0 * size), int(x1 * size), int(y1 * size)]

    draw.ellipse(box(0.78, 0.06, 0.9, 0.18), fill=(255, 220, 90))
    for x, y in ((0.12, 0.1), (0.45, 0.16)):
        draw.ellipse(box(x, y, x + 0.2, y + 0.06), fill=(245, 248, 252))
    draw.rectangle(box(0, 0.5, 1, 1), fill=(30, 80, 130))
    for i in range(14):
        y = 0.53 + 0.034 * i
        points = [(int(t * size), int((y + 0.006 * np.sin(40 * t + i)) * size)) for t in np.linspace(0, 1, 60)]
        draw.line(points, fill=(70, 130, 180), width=max(size // 400, 1))
    draw.rectangle(box(0, 0.6, 0.55, 0.66), fill=(130, 90, 50))  # the dock
    for i in range(12):
        draw.line(box(0.045 * i, 0.6, 0.045 * i, 0.66), fill=(90, 60, 30), width=max(size // 500, 1))
    for x in (0.05, 0.2, 0.35, 0.5):
        draw.rectangle(box(x, 0.66, x + 0.015, 0.76), fill=(90, 60, 30))
    draw.rectangle(box(0.3, 0.5, 0.31, 0.6), fill=(90, 60, 30))  # the sign's post and board
    draw.rectangle(box(0.22, 0.43, 0.39, 0.51), fill=(250, 250, 240), outline=(40, 40, 40), width=max(size // 300, 1))
    for i, length in enumerate((0.13, 0.09)):
        draw.rectangle(box(0.24, 0.45 + 0.03 * i, 0.24 + length, 0.465 + 0.03 * i), fill=(30, 30, 30))
    draw.polygon([(int(x * size), int(y * size)) for x, y in ((0.62, 0.7), (0.92, 0.7), (0.88, 0.78), (0.66, 0.78))],
                 fill=(200, 40, 40))  # the boat
    draw.rectangle(box(0.7, 0.64, 0.8, 0.7), fill=(240, 240, 240))
    draw.line(box(0.75, 0.45, 0.75, 0.64), fill=(60, 60, 60), width=max(size // 250, 1))
    return image


def _figure_suffixes() -> set[str]:
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise UsageError("ps3-encode draws its figure with matplotlib: pip install matplotlib") from None

    return {f".{ext}" for ext in FigureCanvasBase.get_supported_filetypes()}


def _open_image(path: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise UsageError(f"image {path}: no such file") from None
    except (OSError, Image.DecompressionBombError) as err:
        raise UsageError(f"image {path} cannot be read as an image ({err})") from None
    return image


def _load(args, dtype: torch.dtype) -> tuple[PS3Towers, PS3ImageProcessor]:
    try:
        towers = load_towers(args.model, args.text_model, dtype)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:  # transformers and safetensors raise the last two on bad files
        message = str(err)
        raise UsageError(message if args.model in message else f"cannot load --model {args.model}: {message}") from None
    if args.prompt and towers.text is None:
        raise UsageError(
            f"--prompt needs a text tower, and {args.model} is a vision-only checkpoint; "
            "use a combined (model_type ps3) checkpoint or name one with --text-model"
        )
    if args.prompt and towers.tokenizer is None:
        raise UsageError(f"--prompt needs a tokenizer, and {args.text_model or args.model} has no PS3 tokenizer_config.json")
    try:
        processor = image_processor(args.model, towers.vision.config.ps3_scales)
    except (OSError, ValueError) as err:
        raise UsageError(f"--model {args.model}: bad preprocessor_config.json ({err})") from None
    return towers, processor


@dataclass
class Selection:
    """One encoding of the image: bottom-up (no prompt) or steered by a text prompt."""

    name: str  # key prefix in --save-features: bottom_up, prompt_0, ...
    prompt: str | None
    vector: torch.Tensor | None  # (1, width) prompt embedding from the text tower
    output: PS3VisionModelOutput

    @property
    def title(self) -> str:
        return "bottom-up (the learned prior prompt)" if self.prompt is None else f'top-down: "{self.prompt}"'


def _save_features(path: Path, selections: list[Selection], scales: list[int], args) -> None:
    """One safetensors file: ``<selection>.<field>[.<scale>]`` tensors (batch dimension dropped)
    for every selection, with the prompts and scales in its metadata."""
    from safetensors.torch import save_file

    tensors = {}
    for sel in selections:
        tensors[f"{sel.name}.last_hidden_state"] = sel.output.last_hidden_state[0]
        for field in ("selection_maps", "look_maps", "selection_probs"):
            for scale, value in zip(scales[1:], getattr(sel.output, field) or []):
                tensors[f"{sel.name}.{field}.{scale}"] = value[0]
        if sel.vector is not None:
            tensors[f"{sel.name}.prompt"] = sel.vector[0]
    metadata = {
        "selections": json.dumps([{"name": sel.name, "prompt": sel.prompt} for sel in selections]),
        "ps3_scales": json.dumps(scales),
        "model": args.model or "built-in random demo model",
        "image": args.image or "synthetic",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=metadata)


def _save_figure(path: Path, image: Image.Image, selections: list[Selection], encoder, heading: str) -> None:
    import matplotlib.pyplot as plt

    from .selection_figure import DPI, SelectionView, selection_figure

    views = []
    for sel in selections:
        probs = [p[0] for p in sel.output.selection_probs]
        looks = sel.output.look_maps
        views.append(SelectionView(sel.title, [m[0] for m in looks] if looks is not None else [torch.full(p.shape, -1) for p in probs], probs))
    fig = selection_figure(image, views, encoder.ps3_scales, encoder.low_res_token_num, heading)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        out_path = check_output_file(args.out, "--out")
        if out_path.suffix.lower() not in _figure_suffixes():
            raise UsageError(f"--out {args.out}: unknown figure format; use one of {', '.join(sorted(_figure_suffixes()))}")
        save_path = check_output_file(args.save_features, "--save-features") if args.save_features else None
        if save_path is not None and save_path == out_path:
            raise UsageError("--save-features and --out name the same file")
        device = parse_device(args.device)
        dtype = getattr(torch, args.dtype)
        image = _open_image(args.image) if args.image else None
        with quiet_transformers():
            (vision, text, tokenizer), processor = _load(args, dtype)
    except UsageError as err:
        fail(PROG, err)

    encoder = vision.vision_model
    scales = encoder.ps3_scales
    image = image if image is not None else synthetic_image(scales[-1])
    x = processor(image)["pixel_values"][0][None].to(device, dtype)
    vision = vision.to(device)
    with torch.no_grad():
        vectors = [None] + (list(text.to(device)(tokenizer(args.prompt).to(device)).prompt.split(1)) if args.prompt else [])
        start = time.perf_counter()
        outputs = [
            vision(x, prompt=v, num_look_close=args.num_look_close, num_token_look_close=args.num_token_look_close,
                   output_look_maps=True)
            for v in vectors
        ]
        seconds = time.perf_counter() - start
    names = ["bottom_up"] + [f"prompt_{i}" for i in range(len(args.prompt))]
    selections = [Selection(*fields) for fields in zip(names, [None, *args.prompt], vectors, outputs)]

    budget = f"{args.num_look_close} look(s)" if args.num_look_close is not None else f"{args.num_token_look_close} high-res tokens"
    print(f"image {image.size[0]}x{image.size[1]} -> scales {scales}, {budget}, {len(selections)} selection(s) in {seconds:.2f}s on {device}")
    for sel in selections:
        out = sel.output
        print(sel.title)
        print(f"  scale {scales[0]:>5}: {encoder.low_res_token_num:>6} tokens (low-res, all)")
        for scale, m in zip(scales[1:], out.selection_maps or []):
            print(f"  scale {scale:>5}: {int(m[0].sum()):>6} of {m[0].numel()} tokens selected")
        print(f"  total: {out.last_hidden_state.shape[1]} tokens of width {out.last_hidden_state.shape[2]}")

    model_name = Path(args.model).name if args.model else "built-in model (random weights)"
    image_name = Path(args.image).name if args.image else "synthetic image"
    heading = f"PS3 selection, {model_name}, {image_name} ({image.size[0]}x{image.size[1]}), {budget}"
    _save_figure(out_path, image, selections, encoder, heading)
    print(f"figure written to {out_path}")
    if save_path is not None:
        _save_features(save_path, selections, scales, args)
        print(f"features written to {save_path}")


if __name__ == "__main__":
    main()
