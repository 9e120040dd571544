"""Time upstream PS3 (NVlabs/PS3, pip ``ps3-torch``) for ``ps3-bench``, in upstream's own venv.

    UPSTREAM_PYTHON benchmarks/upstream_worker.py REQUEST.json RESULT.json

``ps3-bench --upstream-python PATH`` writes the request: the model config (PS3VisionConfig
fields upstream understands), the trunk's shape, one resolution, the batch sizes and look
counts, device, dtype and timing settings. This script never imports this project (both
are called ``ps3``; the project's folder is removed from ``sys.path`` and the imported
package is checked). It builds an upstream model of the same shape with upstream's own
random init (a trunk unknown to timm is registered under the config's name), keeps one
hidden layer as the bench does, and for each (batch, looks) measures peak memory, FLOPs
(``FlopCounterMode`` on the real run, attention as upstream executes it) and median
latency with the same timers as ``ps3.bench``. Failures and OOMs are reported per entry, and
RESULT.json is rewritten after every entry.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT]

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def import_upstream():
    """Upstream's ``ps3`` package; refuses this project's package of the same name."""
    import ps3

    if REPO_ROOT in Path(ps3.__file__).resolve().parents:
        raise ImportError(f"'import ps3' found this project ({ps3.__file__}), not upstream PS3; use upstream's venv")
    return ps3


def register_trunk(name: str, trunk: dict) -> str:
    """A timm model name for the trunk: ``name`` if timm knows it, else a registered ViT."""
    import timm
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

    if timm.is_model(name):
        return name
    name = re.sub(r"\W", "_", name)

    def factory(pretrained: bool = False, **kwargs):
        for key in [k for k in kwargs if k.startswith("pretrained") or k == "cache_dir"]:
            kwargs.pop(key)
        args = dict(img_size=trunk["img_size"], patch_size=trunk["patch_size"], embed_dim=trunk["width"],
                    depth=trunk["depth"], num_heads=trunk["num_heads"], mlp_ratio=trunk["mlp_ratio"],
                    class_token=False, global_pool="map")
        args.update(kwargs)
        return VisionTransformer(**args)

    factory.__name__ = name
    register_model(factory)
    return name


def peak_memory(fn, device: torch.device) -> tuple[float | None, str, torch.Tensor]:
    """Same measures as ``ps3.bench.measure_peak_memory``; also returns ``fn()``'s output."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20, "cuda_max_memory_allocated", out
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        status = Path("/proc/self/status").read_text
        before = int(re.search(r"^VmRSS:\s+(\d+)", status(), re.M).group(1))
        out = fn()
        return (int(re.search(r"^VmHWM:\s+(\d+)", status(), re.M).group(1)) - before) / 1024, "cpu_rss_high_water_delta", out
    except (OSError, AttributeError):
        return None, "unavailable", fn()


def count_flops(fn) -> int:
    """FLOPs of one ``fn()`` call. Attention runs on SDPA's math backend here, because
    ``FlopCounterMode`` has no formula for some fused kernels (the CPU flash kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def latency(fn, device: torch.device, warmup: int, reps: int) -> tuple[float, str]:
    """Same timers as ``ps3.bench.measure_latency``."""
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            do_bench = None
        if do_bench is not None:
            return float(do_bench(fn, warmup=warmup, rep=reps, return_mode="median")), "triton.do_bench"
        for _ in range(max(warmup, 1)):
            fn()
        times = []
        for _ in range(max(reps, 1)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times), "cuda_events"
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), "perf_counter"


def measure(model, x: torch.Tensor, looks, warmup: int, reps: int) -> dict:
    entry = {"batch": x.shape[0], "looks": looks, "status": None, "error": None, "tokens": None, "flops": None,
             "latency_ms": None, "peak_mem_mb": None, "peak_mem_kind": None, "timer": None}

    def fn():
        return model(x, num_look_close=looks).last_hidden_state

    try:
        with torch.inference_mode():
            entry["peak_mem_mb"], entry["peak_mem_kind"], out = peak_memory(fn, x.device)
            entry["tokens"] = int(out.shape[1])
            del out
            entry["latency_ms"], entry["timer"] = latency(fn, x.device, warmup, reps)
        entry["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - every failure is a result
        entry.update(status="OOM" if _is_oom(exc) else "failed", error=_error(exc), latency_ms=None, peak_mem_mb=None)
        _release(x)
        return entry
    try:
        with torch.inference_mode():
            entry["flops"] = count_flops(fn)
    except Exception as exc:  # noqa: BLE001 - timing stands; only the count is missing
        entry["error"] = "FLOP count (math attention backend): " + _error(exc)
        _release(x)
    return entry


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _error(exc: BaseException) -> str:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first_line}"[:500]


def _release(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.empty_cache()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    ps3 = import_upstream()
    from importlib.metadata import PackageNotFoundError, version

    try:
        upstream_version = version("ps3-torch")
    except PackageNotFoundError:
        upstream_version = "unknown"
    device = torch.device(request["device"])
    dtype = getattr(torch, request["dtype"])
    config = dict(request["config"])
    config["model_name"] = register_trunk(config["model_name"], request["trunk"])
    torch.manual_seed(request["seed"])
    with torch.device(device):
        model = ps3.PS3VisionModel(ps3.PS3VisionConfig(**config))
    model = model.to(dtype).eval().requires_grad_(False)
    model.vision_model.num_hidden_layers_to_return = 1
    R = request["resolution"]
    reply = {"upstream_version": upstream_version, "torch": torch.__version__, "results": []}
    out = Path(argv[1])
    for B in request["batches"]:
        gen = torch.Generator(device=device).manual_seed(request["seed"])
        x = torch.randn(B, 3, R, R, generator=gen, device=device).to(dtype)
        for looks in request["looks"]:
            reply["results"].append(measure(model, x, looks, request["warmup"], request["reps"]))
            # Rewritten after every entry, so a caller that stops this process keeps what was measured.
            out.with_suffix(".tmp").write_text(json.dumps(reply))
            out.with_suffix(".tmp").replace(out)
        del x
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
