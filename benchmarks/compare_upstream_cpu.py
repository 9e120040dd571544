"""Side-by-side CPU run of this package and upstream PS3 on one 4K input, SO400M shapes.

Builds random SO400M-shaped weights, saves them in upstream's format, then runs
``ps3_worker.py`` once under this environment and once under upstream's (``--upstream-python``,
see tests/fixtures/make_upstream_fixtures.py for building it). Reports wall time and peak RSS
of each process and the parity of their outputs; writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ps3 import PS3VisionConfig, PS3VisionModel
from ps3.demo import randomize_parameters_

HERE = Path(__file__).resolve().parent


def run_worker(python: str, model: Path, x: Path, out: Path, looks: str, repeats: int) -> dict:
    cmd = [python, str(HERE / "ps3_worker.py"), "--model", str(model), "--input", str(x), "--output", str(out),
           "--num-look-close", looks, "--repeats", str(repeats)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd="/")
    if done.returncode:
        raise RuntimeError(f"{python} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--upstream-python", required=True)
    parser.add_argument("--resolution", type=int, default=3780)
    parser.add_argument("--num-look-close", default="1")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results" / "cpu-vs-upstream-4k.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = PS3VisionConfig(model_name="vit_so400m_patch14_siglip_384", ps3_scales=[378, 756, 1512, 3780], max_select_num=2560)
        randomize_parameters_(PS3VisionModel(config), seed=0).save_pretrained(tmp / "model")
        torch.save(torch.randn(1, 3, args.resolution, args.resolution, generator=torch.Generator().manual_seed(0)), tmp / "x.pt")
        ours = run_worker(sys.executable, tmp / "model", tmp / "x.pt", tmp / "ours.pt", args.num_look_close, args.repeats)
        upstream = run_worker(args.upstream_python, tmp / "model", tmp / "x.pt", tmp / "up.pt", args.num_look_close, args.repeats)
        a, b = torch.load(tmp / "ours.pt"), torch.load(tmp / "up.pt")
    ref = b["last_hidden_state"].double()
    result = {
        "machine": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "resolution": args.resolution,
        "num_look_close": args.num_look_close,
        "ours": ours,
        "upstream": upstream,
        "speedup": upstream["seconds"] / ours["seconds"],
        "peak_rss_ratio": upstream["peak_rss_mb"] / ours["peak_rss_mb"],
        # Peak growth during the forward passes, without load-time and library differences.
        "forward_rss_growth_ratio": (upstream["peak_rss_mb"] - upstream["peak_rss_after_load_mb"])
        / max(ours["peak_rss_mb"] - ours["peak_rss_after_load_mb"], 1e-9),
        "rel_err_last_hidden_state": ((a["last_hidden_state"].double() - ref).norm() / ref.norm()).item(),
        "selection_maps_equal": all(torch.equal(x, y.to(x.dtype)) for x, y in zip(a["selection_maps"], b["selection_maps"])),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
