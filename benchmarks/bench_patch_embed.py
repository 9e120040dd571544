"""Benchmark the sparse patch embed kernel against upstream PS3's dense tokenisation (CUDA only).

Upstream tokenises each high-res scale by resizing the whole image to it (bicubic, fp32),
unfolding every patch, keeping the selected ones with a boolean mask, projecting them and adding
the position embeddings. The Triton kernel samples only the selected patches straight from the
source image and fuses the projection and both table adds. Both sides get the same precomputed
position tables (upstream also resamples its table on every call; that cost is left out).

For every resolution / selected-token count / batch it records the median times (the shared
timer, ``ps3.bench.harness.bench``; the op's arguments, concatenated tables included, are built
before the timed calls), the speedup, and the kernel's achieved bandwidth against the
bytes it cannot avoid: the source pixels under the selected patches' bicubic footprint (taps with
non-zero weight, each pixel once), weight, bias, the table rows used, token indices and output.

    python benchmarks/bench_patch_embed.py --out patch_embed.json
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ps3.bench import scale_set
from ps3.bench.harness import bench, op_parser, require_cuda, write_results
from ps3.selection_plan import default_quotas
from ps3_kernels import use_backend
from ps3_kernels.patch_embed import PatchTokens, sparse_patch_embed

PEAK_BYTES_PER_S = {"H100": 3.0e12, "H200": 4.3e12}  # measured-ish HBM peaks (see PS3_NOTES.md section 5)


def make_case(scales: list[int], batch: int, num_tokens: int, dtype: torch.dtype, device: str,
              patch: int = 14, width: int = 1152, seed: int = 0) -> dict[str, Any]:
    """Square images of side ``scales[-1]`` and ``num_tokens`` random selected patches per image,
    split over the high-res scales like PS3's default quotas. Tokens are ordered scale, image,
    raster: the order upstream's per-scale boolean indexing produces."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    side = scales[-1]
    high = scales[1:]
    # Pixels, weights and tables are drawn where they live (16 images of 3780 px, 200 MB of tables);
    # the token choice on the CPU.
    drawn = torch.Generator(device=device).manual_seed(seed)
    images = torch.rand(batch, 3, side, side, generator=drawn, device=device).to(dtype)
    masks, parts = [], []
    for s, (size, quota) in enumerate(zip(high, default_quotas(num_tokens, scales))):
        n = (size // patch) ** 2
        chosen = torch.rand(batch, n, generator=gen).argsort(dim=1)[:, :quota]
        mask = torch.zeros(batch, n, dtype=torch.bool).scatter_(1, chosen, True)
        masks.append(mask.to(device))
        image, cell = mask.nonzero(as_tuple=True)
        g = size // patch
        parts.append(torch.stack([image, torch.full_like(image, s), cell // g, cell % g]))
    t = torch.cat(parts, dim=1).to(device)
    tokens = PatchTokens(image=t[0].contiguous(), scale=t[1].contiguous(), row=t[2].contiguous(), col=t[3].contiguous())

    def table(rows: int) -> torch.Tensor:
        return (torch.randn(rows, width, generator=drawn, device=device) * 0.02).to(dtype)

    grids = [size // patch for size in high]
    offsets = torch.tensor([0] + [g * g for g in grids], device=device).cumsum(0)[:-1]
    grid_t = torch.tensor(grids, device=device)
    index = offsets[tokens.scale] + tokens.row * grid_t[tokens.scale] + tokens.col
    return dict(
        scales=scales, patch=patch, images=images, masks=masks, tokens=tokens,
        weight=(torch.randn(width, 3, patch, patch, generator=drawn, device=device) * 0.02).to(dtype),
        bias=table(1)[0], pos_tables=[table(g * g) for g in grids], res_tables=[table(g * g) for g in grids],
        index=index,
    )


def upstream_embed(case: dict[str, Any]) -> torch.Tensor:
    """Upstream's way: full resize per scale, unfold every patch, boolean-select, project, add tables."""
    images, patch = case["images"], case["patch"]
    weight = case["weight"].reshape(case["weight"].shape[0], -1)
    out = []
    for size, mask, pos, res in zip(case["scales"][1:], case["masks"], case["pos_tables"], case["res_tables"]):
        resized = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False).to(images.dtype)
        patches = F.unfold(resized, kernel_size=patch, stride=patch).transpose(1, 2)  # (B, n, 3 p p)
        table = (pos + res)[None].expand(images.shape[0], -1, -1)
        out.append(F.linear(patches[mask], weight, case["bias"]) + table[mask])
    return torch.cat(out)


def prepare_embed(case: dict[str, Any]) -> Callable[[], torch.Tensor]:
    """The library op on prebuilt arguments (the model keeps its tables concatenated): what a timer
    should call. The active backend at call time decides Triton or the PyTorch reference."""
    high = case["scales"][1:]
    images = list(case["images"])
    sizes = [[(s, s) for s in high] for _ in images]
    pos, res = torch.cat(case["pos_tables"]), torch.cat(case["res_tables"])
    return functools.partial(sparse_patch_embed, images, sizes, case["tokens"], case["weight"], case["bias"], pos,
                             case["index"], res, case["index"])


def sparse_embed(case: dict[str, Any]) -> torch.Tensor:
    """The library op on ``case`` (its arguments built on the way: for checks, not for timing)."""
    return prepare_embed(case)()


def _footprint(src: int, dst: int, patch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per patch index along one axis: first and one-past-last source index with non-zero bicubic weight."""
    scale = np.float32(src) / np.float32(dst)
    real = scale * (np.arange(dst, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    lower = np.floor(real)
    exact = real == lower  # fraction 0: only the tap at floor has weight
    first = np.clip(np.where(exact, lower, lower - 1), 0, src - 1).astype(np.int64)
    last = np.clip(np.where(exact, lower, lower + 2), 0, src - 1).astype(np.int64)
    return first.reshape(-1, patch).min(1), last.reshape(-1, patch).max(1) + 1


def floor_bytes(case: dict[str, Any]) -> int:
    """Bytes any implementation must move: see the module docstring."""
    images, patch, tokens = case["images"], case["patch"], case["tokens"]
    side = images.shape[-1]
    covered = np.zeros((images.shape[0], side, side), dtype=bool)
    spans = [_footprint(side, size, patch) for size in case["scales"][1:]]
    for b, s, r, c in zip(*(t.tolist() for t in (tokens.image, tokens.scale, tokens.row, tokens.col))):
        lo, hi = spans[s]
        covered[b, lo[r]:hi[r], lo[c]:hi[c]] = True
    item = images.element_size()
    width = case["weight"].shape[0]
    rows_used = 2 * case["index"].unique().numel()  # pos and res rows (same index here)
    return int(
        covered.sum() * 3 * item
        + case["weight"].numel() * case["weight"].element_size() + width * item
        + rows_used * width * item
        + len(tokens) * (4 + 2) * 8  # image/scale/row/col + two table indices, int64
        + len(tokens) * width * item
    )


def _peak(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BYTES_PER_S.items() if k in device_name), None)


def main() -> None:
    parser = op_parser(__doc__, batches=[1, 4, 16], resolutions=[1512, 3780], dtype="bfloat16")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1280, 2560], help="selected tokens per image")
    args = parser.parse_args()
    require_cuda("bench_patch_embed.py")
    dtype = getattr(torch, args.dtype)
    tol = 1e-2 if dtype != torch.float32 else 1e-5  # relative error against upstream's way
    device_name = torch.cuda.get_device_name()
    peak = _peak(device_name)
    rows = []
    for resolution in args.resolutions:
        for num_tokens in args.tokens:
            for batch in args.batches:
                case = make_case(scale_set(resolution), batch, num_tokens, dtype, "cuda")
                ours = prepare_embed(case)
                with use_backend("triton"):
                    got = ours()
                    ref = upstream_embed(case)
                    err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                    t_up = bench(lambda: upstream_embed(case)).ms
                    t_ours = bench(ours).ms
                floor = floor_bytes(case)
                flops = 2 * len(case["tokens"]) * case["weight"][0].numel() * case["weight"].shape[0]
                row = dict(
                    resolution=resolution, scales=case["scales"], batch=batch, tokens_per_image=num_tokens,
                    rel_err_vs_upstream=err, ok=err < tol, upstream_ms=t_up, triton_ms=t_ours, speedup=t_up / t_ours,
                    floor_bytes=floor, achieved_bytes_per_s=floor / (t_ours * 1e-3),
                    fraction_of_peak_bandwidth=(floor / (t_ours * 1e-3) / peak) if peak else None,
                    matmul_tflops=flops / (t_ours * 1e-3) / 1e12,
                )
                rows.append(row)
                print(f"{resolution:5d}px {num_tokens:5d} tok  B={batch:<3d} upstream {t_up:8.3f} ms  "
                      f"triton {t_ours:7.3f} ms  x{t_up / t_ours:6.1f}  "
                      f"{row['achieved_bytes_per_s'] / 1e9:7.1f} GB/s of floor  err {err:.1e}")
                del case
                torch.cuda.empty_cache()
    wrong = [f"{r['resolution']}px/{r['tokens_per_image']} tokens/B={r['batch']}" for r in rows if not r["ok"]]
    write_results(args.out, dict(dtype=args.dtype, peak_bytes_per_s=peak), rows, wrong,
                  f"kernel off upstream's way by more than {tol}")


if __name__ == "__main__":
    main()
