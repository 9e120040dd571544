"""ps3-bench from an installed copy of the package, away from the repository: the upstream worker
and the shared harness ship inside ``ps3.bench``, the worker runs from there under upstream's
interpreter (here a stand-in for upstream's ``ps3``) and refuses this project's ``ps3``; and the
op scripts' shared helpers. CI time: about 15 s on 2 idle cores (the wheel build is skipped where
setuptools cannot build a wheel offline)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from ps3 import bench
from ps3.bench import harness

REPO = Path(__file__).resolve().parent.parent

STAND_IN_UPSTREAM = '''"""Upstream PS3's API as the worker calls it: one linear layer, 5 + 1 token per look."""
import sys
from pathlib import Path

import torch

Path(__file__).with_name("worker_path.txt").write_text(sys.argv[0])


class PS3VisionConfig:
    def __init__(self, **fields):
        self.hidden_size = fields["hidden_size"]


class PS3VisionModel(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.vision_model = torch.nn.Module()
        self.proj = torch.nn.Linear(3, config.hidden_size)

    def forward(self, x, num_look_close):
        out = self.proj(x.mean((2, 3)))[:, None].expand(-1, 5 + num_look_close, -1)
        return type("Output", (), {"last_hidden_state": out})()
'''


def shipped_files() -> list[str]:
    """What ``setup.py`` puts in a wheel: the ``.py`` files of every package ``find_packages``
    finds under ``ps3`` and ``ps3_kernels`` (folders with an ``__init__.py``, reached through
    packages only)."""
    files: list[str] = []

    def walk(folder: Path) -> None:
        if (folder / "__init__.py").exists():
            files.extend(p.relative_to(REPO).as_posix() for p in sorted(folder.glob("*.py")))
            for sub in sorted(p for p in folder.iterdir() if p.is_dir() and "." not in p.name):
                walk(sub)

    walk(REPO / "ps3")
    walk(REPO / "ps3_kernels")
    return files


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The shipped files copied into a fresh folder, as a non-editable install lays them out."""
    site = tmp_path_factory.mktemp("site")
    for name in shipped_files():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, site / name)
    return site


def test_the_worker_and_harness_ship_in_the_package():
    files = shipped_files()
    assert {"ps3/bench/__init__.py", "ps3/bench/__main__.py", "ps3/bench/harness.py", "ps3/bench/upstream_worker.py"} <= set(files)
    assert bench.UPSTREAM_WORKER == Path(importlib.util.find_spec("ps3.bench.upstream_worker").origin)


def can_build_wheels() -> bool:
    """setuptools with ``bdist_wheel``: its own from 70.1 on, else from the ``wheel`` package."""
    try:
        import setuptools
    except ImportError:
        return False
    version = tuple(int(v) for v in setuptools.__version__.split(".")[:2] if v.isdigit())
    return version >= (70, 1) or importlib.util.find_spec("wheel") is not None


@pytest.mark.skipif(not can_build_wheels(), reason="building a wheel offline needs setuptools >= 70.1 or the wheel package")
def test_the_wheel_holds_the_shipped_files(tmp_path):
    src = tmp_path / "src"
    for name in shipped_files() + ["setup.py", "README.md"]:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
                   check=True, capture_output=True, timeout=300)
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        assert sorted(n for n in z.namelist() if n.endswith(".py")) == sorted(shipped_files())


def test_installed_ps3_bench_runs_the_worker_from_the_package(installed, tmp_path):
    upstream = tmp_path / "upstream"
    (upstream / "ps3").mkdir(parents=True)
    (upstream / "ps3" / "__init__.py").write_text(STAND_IN_UPSTREAM)
    (upstream / "timm").mkdir()
    (upstream / "timm" / "__init__.py").write_text("def is_model(name):\n    return True\n")
    python = tmp_path / "upstream-python"  # upstream's interpreter: this one, with the stand-in first on its path
    python.write_text(f'#!/bin/sh\nPYTHONPATH="{upstream}" exec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PS3_UPSTREAM_PYTHON")}
    done = subprocess.run(
        [sys.executable, "-m", "ps3.bench", "--preset", "cpu-smoke", "--resolutions", "756", "--methods",
         "upstream-ps3-1,upstream-ps3-2", "--warmup", "0", "--reps", "1", "--upstream-python", str(python), "--out", "out"],
        cwd=tmp_path, env=dict(env, PYTHONPATH=str(installed)), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (upstream / "ps3" / "worker_path.txt").read_text() == str(installed / "ps3" / "bench" / "upstream_worker.py")
    records = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(r["method"], r["status"], r["tokens"]) for r in records] == [("upstream-ps3-1", "ok", 6), ("upstream-ps3-2", "ok", 7)]
    assert all(r["flops"] > 0 and r["latency_ms"] > 0 and r["timer"] == "perf_counter" for r in records)
    assert all(r["peak_mem_kind"] and r["git_commit"] is None for r in records)  # an installed copy has no commit


def test_the_worker_refuses_this_projects_ps3(installed):
    """Under an interpreter whose ``ps3`` is a copy of this project, the entries fail with the reason."""
    preset = bench.PRESETS["cpu-smoke"]
    opts = bench.Options(preset="cpu-smoke", methods=["upstream-ps3-1"], resolutions=[756], batches=[1], count_only=False,
                         warmup=0, reps=1, upstream_python=sys.executable, upstream_timeout=120, seed=0,
                         upstream_pythonpath=str(installed))
    records = [bench.empty_record(opts, {}, "upstream-ps3-1", 756, 1, preset.dtype)]
    bench.run_upstream(opts, preset, bench.model_config(preset, 756), 756, ["upstream-ps3-1"], records)
    assert records[0]["status"] == "failed" and "found this project" in records[0]["error"], records[0]["error"]


def test_op_script_helpers(tmp_path):
    """The op benchmarks' shared arguments, and their results file written before a correctness miss exits."""
    args = harness.op_parser("Doc.\n\nMore.", batches=[1, 4], resolutions=[1512], dtype="float32").parse_args(["--out", "r.json"])
    assert (args.out, args.batches, args.resolutions, args.dtype) == ("r.json", [1, 4], [1512], "float32")
    assert not hasattr(harness.op_parser("Doc.", batches=[1]).parse_args(["--out", "r.json"]), "dtype")
    path = tmp_path / "r.json"
    with pytest.raises(SystemExit, match="off by 2 in: a, b"):
        harness.write_results(path, {"dtype": "float32"}, [{"x": 1}], ["a", "b"], "off by 2")
    written = json.loads(path.read_text())
    assert written["results"] == [{"x": 1}] and written["meta"]["dtype"] == "float32" and written["meta"]["torch"]

def test_the_shared_timer_on_the_cpu():
    """Counts, not milliseconds: ``warmup`` untimed calls then ``reps`` timed ones; bad counts are refused."""
    calls = []
    timing = harness.bench(lambda: calls.append(1), warmup=2, reps=5, cuda=False)
    assert len(calls) == 7 and timing.timer == "perf_counter" and timing.reps == 5
    assert 0 <= timing.min_ms <= timing.ms <= timing.max_ms
    timing, peak, kind = harness.measure_call(lambda x: x + 1, torch.zeros(2), warmup=1, reps=3)
    assert timing.timer == "perf_counter" and peak is not None and kind
    for bad in (dict(warmup=-1), dict(reps=0), dict(warmup=0, peak_memory=True)):
        with pytest.raises(ValueError):
            harness.bench(lambda: None, **{"warmup": 1, "reps": 1, **bad}, cuda=False)
