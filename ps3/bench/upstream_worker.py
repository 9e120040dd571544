"""Time upstream PS3 (NVlabs/PS3, pip ``ps3-torch``) for ``ps3-bench``, in upstream's own venv.

    UPSTREAM_PYTHON path/to/ps3/bench/upstream_worker.py REQUEST.json RESULT.json

``ps3-bench --upstream-python PATH`` runs this file by its path (``ps3.bench.UPSTREAM_WORKER``;
it ships in the package): the request holds the model config (PS3VisionConfig fields upstream
understands), the trunk's shape, one resolution, the batch sizes and look counts, device, dtype
and timing settings. This script never imports this project (both are called ``ps3``): the
folder holding this project's package leaves ``sys.path``, the imported package is
checked, and the shared timers come from ``harness.py`` loaded by its path. It builds an
upstream model of the same shape with upstream's own random init (a trunk unknown to timm is
registered under the config's name), keeps one hidden layer as the bench does, and for each
(batch, looks) measures peak memory and median latency with the shared timer
(``harness.bench``: CUDA events, L2 flushed, warm-up and repetitions by count) and, unless the
request says ``count_flops: false``, FLOPs (``FlopCounterMode`` on one more call, attention on
SDPA's math backend as the counter needs). Failures and OOMs are
reported per entry, and RESULT.json is rewritten after every entry.

A request with ``"task": "pretrain"`` (``benchmarks/bench_train.py``) instead runs pre-training
steps: upstream's ``PS3VisionEncoder`` and text ``TextTransformer`` with the weights and inputs the
request names (saved by this project's side), through ``pretrain_step.py`` (loaded by its path,
the same step code this project's side runs), with the harness's live-bytes tracker.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
# This folder, and the one holding this project's ``ps3`` unless torch lives there too (a
# site-packages: upstream's ``ps3`` then comes from an earlier entry or cannot be there).
_OURS = {HERE} | (set() if (HERE.parent.parent / "torch").exists() else {HERE.parent.parent})
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in _OURS]

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402


def _load_by_path(filename: str):
    """A file of this folder as a module (never through ``ps3``, which is upstream's here); registered
    before it runs, as its dataclasses look their module up."""
    spec = importlib.util.spec_from_file_location(f"ps3_bench_{Path(filename).stem}", HERE / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


harness = _load_by_path("harness.py")


def import_upstream():
    """Upstream's ``ps3`` package; refuses this project's package of the same name."""
    import ps3

    if (Path(ps3.__file__).parent / "bench" / "upstream_worker.py").exists():
        raise ImportError(f"'import ps3' found this project ({ps3.__file__}), not upstream PS3; use upstream's venv")
    return ps3


def register_trunk(name: str, trunk: dict) -> str:
    """A timm model name for the trunk: ``name`` if timm knows it, else a registered ViT."""
    import timm

    if timm.is_model(name):
        return name
    from timm.models import register_model
    from timm.models.vision_transformer import VisionTransformer

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


def count_flops(fn) -> int:
    """FLOPs of one ``fn()`` call. Attention runs on SDPA's math backend here, because
    ``FlopCounterMode`` has no formula for some fused kernels (the CPU flash kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def measure(model, x: torch.Tensor, looks, warmup: int, reps: int, flops: bool = True) -> dict:
    """Peak memory and median latency (``harness.measure_call``: the one timer of this project's
    benchmarks, counts not milliseconds) and, with ``flops``, one more call to count FLOPs."""
    entry = {"batch": x.shape[0], "looks": looks, "status": None, "error": None, "tokens": None, "flops": None,
             "latency_ms": None, "peak_mem_mb": None, "peak_mem_kind": None, "timer": None}
    shapes = []

    def fn(x):
        out = model(x, num_look_close=looks).last_hidden_state
        shapes.append(out.shape)
        return out

    try:
        with torch.inference_mode():
            timing, entry["peak_mem_mb"], entry["peak_mem_kind"] = harness.measure_call(fn, x, warmup, reps)
            entry["tokens"] = int(shapes[0][1])
            entry["latency_ms"], entry["timer"] = timing.ms, timing.timer
            entry["timing"] = timing.record()
        entry["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - every failure is a result
        entry.update(status="OOM" if harness.is_oom(exc) else "failed", error=harness.error_text(exc),
                     latency_ms=None, peak_mem_mb=None)
        _release(x)
        return entry
    if not flops:
        return entry
    try:
        with torch.inference_mode():
            entry["flops"] = count_flops(lambda: fn(x))
    except Exception as exc:  # noqa: BLE001 - timing stands; only the count is missing
        entry["error"] = "FLOP count (math attention backend): " + harness.error_text(exc)
        _release(x)
    return entry


def _release(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.empty_cache()


def stable_topk(self, k, dim=-1, largest=True, sorted=True):
    """``Tensor.topk`` with ties to the lower index (a stable descending sort): this project's
    tie rule, so that both sides select the same patches where probabilities tie."""
    if not largest:
        raise NotImplementedError("stable_topk: only largest=True is used by upstream's selection")
    values, indices = torch.sort(self, dim=dim, descending=True, stable=True)
    return torch.return_types.topk((values.narrow(dim, 0, k), indices.narrow(dim, 0, k)))


def pretrain(request: dict, ps3) -> dict:
    """Pre-training steps of upstream's towers on the request's weights and batch."""
    from ps3.modeling_ps3_text import TextTransformer

    step = _load_by_path("pretrain_step.py")
    device = torch.device(request["device"])
    torch.manual_seed(request["seed"])
    config = dict(request["vision_config"])
    if request.get("trunk"):
        config["model_name"] = register_trunk(config["model_name"], request["trunk"])
    visual = ps3.PS3VisionEncoder(ps3.PS3VisionConfig(**config))
    model = step.PretrainModel(visual, TextTransformer(ps3.PS3TextConfig(**request["text_config"])))
    model.load_state_dict(torch.load(request["weights"], mmap=True, weights_only=True))
    model.to(device)
    batch = {k: v.to(device) for k, v in torch.load(request["batch"], weights_only=True).items()}
    autocast = getattr(torch, request["autocast"]) if request["autocast"] else None
    native_topk = torch.Tensor.topk
    if request["stable_topk"]:
        torch.Tensor.topk = stable_topk
    try:
        return step.run_steps(model, batch, harness.LiveBytes, request["steps"], autocast, request.get("where", False))
    finally:
        torch.Tensor.topk = native_topk


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    ps3 = import_upstream()
    if request.get("task") == "pretrain":
        try:
            reply = {"status": "ok", "record": pretrain(request, ps3)}
        except Exception as exc:  # noqa: BLE001 - a failure is a result
            reply = {"status": "OOM" if harness.is_oom(exc) else "failed", "error": harness.error_text(exc)}
        reply["torch"] = torch.__version__
        Path(argv[1]).write_text(json.dumps(reply))
        return 0
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
            reply["results"].append(measure(model, x, looks, request["warmup"], request["reps"],
                                            request.get("count_flops", True)))
            # Rewritten after every entry, so a caller that stops this process keeps what was measured.
            out.with_suffix(".tmp").write_text(json.dumps(reply))
            out.with_suffix(".tmp").replace(out)
        del x
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
