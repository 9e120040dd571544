"""``ps3-extract INPUT --out DIR``: encode a dataset with PS3 into safetensors shards, on one
process or on torchrun (``torchrun --nproc-per-node N -m ps3.extract ...``), exactly once and
resumable: rerun the same command after a kill and only the missing shards are redone."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from transformers.utils import logging as transformers_logging

from ..cli_common import ArgumentParser, UsageError, check_output_folder, fail, look_count, parse_device
from ..demo import image_processor
from .pipeline import FEATURES, Batch, BatchStream, FeatureEncoder, ImagePrep, ShardEnd, default_workers, load_models
from .shards import SHARDS, ShardWriter, build_index, finished_shards, remove_stale_temporaries, shard_name, write_atomic
from .sources import open_input

PROG = "ps3-extract"
RUN_FILE = "run.json"
SUMMARY = "summary.json"
# Ranks meet only at the end; the slowest may finish hours after the fastest.
SYNC_TIMEOUT = timedelta(days=7)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("input", nargs="+", metavar="INPUT",
                        help="a folder of images (recursive), a text file listing image paths, or webdataset .tar files")
    parser.add_argument("--out", required=True, help="output folder (shards, index.jsonl, errors.jsonl)")
    parser.add_argument("--model", help="PS3 checkpoint folder (default: the small built-in random model)")
    looks = parser.add_mutually_exclusive_group()
    looks.add_argument("--num-look-close", type=look_count, help="high-res looks per image: int or 'all' (default 1)")
    looks.add_argument("--num-token-look-close", type=look_count, help="high-res tokens per image: int or 'all'")
    parser.add_argument("--prompt", help="text that steers the selection (top-down; needs a checkpoint with a text model)")
    parser.add_argument("--features", choices=sorted(FEATURES), default="pooled",
                        help="pooled: pooled + pooled_highres vectors; tokens: token features + selection maps; both (default pooled)")
    parser.add_argument("--layer", type=int, default=-1, help="layer whose tokens are stored (default -1, the last)")
    parser.add_argument("--resize", choices=["aspect", "squash"], default="aspect",
                        help="aspect: keep each image's aspect ratio (default); squash: the processor's square size, as upstream")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                        help="model and feature dtype (default bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (under torchrun each rank takes cuda:LOCAL_RANK)")
    parser.add_argument("--tokens-per-batch", type=int, default=16384, help="encoder tokens per packed forward (default 16384)")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader decode workers per rank")
    parser.add_argument("--shard-size", type=int, default=256, help="images per shard (default 256)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("tokens_per_batch", "shard_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_workers is not None and args.num_workers < 0:
        parser.error("--num-workers must be >= 0")
    return args


def _device(name: str) -> torch.device:
    """``--device``, with the rank's own GPU under torchrun."""
    device = parse_device(name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def _init_distributed(device: torch.device):
    """``(rank, world size, gloo group for the final gather)``; one process without torchrun."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, timeout=SYNC_TIMEOUT)
    # The ranks' only meeting, at the end, waits on the CPU rather than in an NCCL kernel.
    group = dist.new_group(backend="gloo", timeout=SYNC_TIMEOUT) if backend != "gloo" else None
    return dist.get_rank(), dist.get_world_size(), group


def _check_run_file(out: Path, settings: dict) -> None:
    """A resumed run must match the settings its shards were made with."""
    path = out / RUN_FILE
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
        if changed:
            diffs = "; ".join(f"{k}: {old.get(k)!r} before, {settings.get(k)!r} now" for k in changed)
            raise ValueError(f"--out {str(out)!r} holds a run with other settings ({diffs}); use another --out or the same settings")
    else:
        write_atomic(path, json.dumps(settings, indent=1))


def _setup(args, device: torch.device, dtype: torch.dtype, look: dict):
    """Input, model, processor and feature encoder; checks the output folder's settings."""
    out = check_output_folder(args.out, "--out")
    source = open_input(args.input)
    model, text_model, tokenizer = load_models(args.model, dtype, device, with_text=args.prompt is not None)
    prompt = None
    if args.prompt is not None:
        where = "the built-in model" if args.model is None else f"checkpoint {args.model!r}"
        if text_model is None:
            raise ValueError(f"--prompt needs a text model and {where} has none (a 'ps3' checkpoint holds both towers)")
        if tokenizer is None:
            raise ValueError(f"--prompt needs a tokenizer and {where} has no tokenizer_config.json")
        with torch.inference_mode():
            prompt = text_model(tokenizer([args.prompt]).to(device)).prompt.to(dtype)
    processor = image_processor(args.model, model.config.ps3_scales)
    encoder = FeatureEncoder(model, processor, args.features, args.layer, look, prompt)
    settings = {
        "format": 1,
        "input": {"kind": source.kind, "location": source.location, "count": len(source.files or source.urls),
                  "fingerprint": source.fingerprint()},
        "shard_size": args.shard_size,
        "model": str(Path(args.model).resolve()) if args.model else "built-in",
        "features": args.features, "layer": args.layer, "look": look, "prompt": args.prompt, "resize": args.resize,
        "dtype": str(dtype),
    }
    (out / SHARDS).mkdir(parents=True, exist_ok=True)
    _check_run_file(out, settings)
    return source, model, processor, encoder


def main(argv=None) -> None:
    args = parse_args(argv)
    transformers_logging.disable_progress_bar()  # weight-loading bars, once per rank
    look = {"num_token_look_close": args.num_token_look_close} if args.num_token_look_close is not None else {
        "num_look_close": 1 if args.num_look_close is None else args.num_look_close}
    try:
        device = _device(args.device)
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        source, model, processor, encoder = _setup(args, device, dtype, look)
    except (UsageError, ValueError, TypeError, OSError) as err:
        fail(PROG, err)

    out = Path(args.out)
    rank, world, sync_group = _init_distributed(device)
    num_parts = source.num_parts(args.shard_size)
    mine = list(range(rank, num_parts, world))
    done_parts, finished = finished_shards(out, mine, source.kind)
    pending = [p for p in mine if p not in done_parts]
    prep = ImagePrep(model.vision_model, processor, look, squash=args.resize == "squash")
    stream = BatchStream(source, pending, args.shard_size, finished, prep, args.tokens_per_batch)
    workers = default_workers() if args.num_workers is None else args.num_workers
    loader = DataLoader(stream, batch_size=None, num_workers=workers, collate_fn=_identity, pin_memory=device.type == "cuda")
    stats = _encode(loader, encoder, out, pending, source, args, rank)
    stats["parts_already_done"] = len(done_parts)

    gathered = [stats]
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, stats, group=sync_group)
    try:
        if rank == 0:
            _finish(out, num_parts, gathered, world)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _identity(message):
    return message


def _encode(loader, encoder: FeatureEncoder, out: Path, pending: list[int], source, args, rank: int) -> dict:
    """Run this rank's parts: encode each batch, stream it into its shard, close finished shards."""
    from tqdm import tqdm

    sizes = [source.part_size(p, args.shard_size) for p in pending]
    total = None if None in sizes else sum(sizes)
    bar = tqdm(total=total, unit="img", disable=args.no_progress or rank != 0, dynamic_ncols=True, desc="ps3-extract")
    writers: dict[tuple[int, int], ShardWriter] = {}
    images = failures = tokens = shards = 0
    start = time.perf_counter()
    for message in loader:
        key = (message.part, message.chunk)
        writer = writers.get(key) or writers.setdefault(key, ShardWriter(out / SHARDS, shard_name(*key)))
        writer.failures += [(f.image_id, f.reason) for f in message.failures]
        done = len(message.failures)
        if isinstance(message, Batch):
            for image, features in zip(message.images, encoder(message.images)):
                writer.add_image(image.image_id, features)
            images += len(message.images)
            tokens += sum(im.tokens for im in message.images)
            done += len(message.images)
        elif isinstance(message, ShardEnd):
            writers.pop(key).close({"part": message.part, "chunk": message.chunk, "last": message.last, "rank": rank})
            shards += 1
        failures += len(message.failures)
        seconds = max(time.perf_counter() - start, 1e-9)
        bar.update(done)
        bar.set_postfix_str(f"{images / seconds:.2f} img/s, {tokens / seconds:,.0f} tok/s", refresh=False)
    bar.close()
    if writers:
        raise RuntimeError(f"shards {sorted(writers)} got images but no end; the data loader stopped early")
    return {"images": images, "failures": failures, "tokens": tokens, "shards": shards, "seconds": time.perf_counter() - start}


def _finish(out: Path, num_parts: int, per_rank: list[dict], world: int) -> None:
    """Rank 0, after every rank is done: index, errors, summary."""
    try:
        totals = build_index(out, num_parts)
    except RuntimeError as err:  # a rank lost shards: not a usage error
        print(f"{PROG}: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    remove_stale_temporaries(out)
    seconds = max(s["seconds"] for s in per_rank)
    run = {k: sum(s[k] for s in per_rank) for k in ("images", "failures", "tokens", "shards", "parts_already_done")}
    summary = {
        "ranks": world, "seconds": seconds, **{f"run_{k}": v for k, v in run.items()},
        "images_per_second": run["images"] / seconds if seconds else 0.0,
        "tokens_per_second": run["tokens"] / seconds if seconds else 0.0,
        "output_images": totals.images, "output_errors": totals.failures, "output_shards": totals.shards,
        "duplicate_ids": totals.duplicate_ids,
    }
    write_atomic(out / SUMMARY, json.dumps(summary, indent=1))
    print(f"ps3-extract: {run['images']} images encoded, {run['failures']} unreadable, {run['parts_already_done']} parts "
          f"already done; {world} rank(s), {seconds:.1f} s, {summary['images_per_second']:.2f} images/s, "
          f"{summary['tokens_per_second']:,.0f} tokens/s")
    print(f"ps3-extract: {out} holds {totals.images} images in {totals.shards} shards and {totals.failures} errors "
          f"({out / 'index.jsonl'}, {out / 'errors.jsonl'})")
    if totals.duplicate_ids:
        print(f"ps3-extract: warning: {totals.duplicate_ids} image ids occur more than once in the input", file=sys.stderr)


if __name__ == "__main__":
    main()
