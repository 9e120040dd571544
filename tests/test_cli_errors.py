"""Every user error of ps3-encode and ps3-bench: one line on stderr, exit code 2, no traceback,
and a bad output path caught before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from ps3 import PS3VisionModel, bench, cli
from ps3.demo import randomize_parameters_

from helpers import FIXTURES, tiny_vision_config

MODELS = FIXTURES / "models"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def unwritable(tmp_path) -> Path:
    """A folder nobody may create files in: a read-only folder, or /proc where that does not
    stop the user (root)."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        yield folder
    else:
        yield Path("/proc")
    folder.chmod(0o700)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    tmp_path = tmp_path_factory.mktemp("inputs")
    (tmp_path / "note.txt").write_text("not an image")
    (tmp_path / "truncated.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    randomize_parameters_(PS3VisionModel(tiny_vision_config())).save_pretrained(tmp_path / "vision")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    for name in ("garbage", "misshaped", "missing-blocks"):
        randomize_parameters_(PS3VisionModel(tiny_vision_config())).save_pretrained(tmp_path / name)
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"garbage")
    for name, key, value in (("misshaped", "mlp_ratio", 3.0), ("missing-blocks", "depth", 5)):
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, key: value}))
    (tmp_path / "processor").mkdir()
    randomize_parameters_(PS3VisionModel(tiny_vision_config())).save_pretrained(tmp_path / "processor")
    (tmp_path / "processor" / "preprocessor_config.json").write_text('{"image_size": -3}')
    names = {"note": "note.txt", "truncated": "truncated.png", "garbage": "garbage", "misshaped": "misshaped",
             "missing_blocks": "missing-blocks", "vision": "vision", "broken": "broken", "processor": "processor"}
    return {key: str(tmp_path / name) for key, name in names.items()} | {"tmp": str(tmp_path)}


def one_line_error(capsys, call, prog: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and "Traceback" not in err, err
    return err


ENCODE_CASES = {
    "missing image": (["{tmp}/nope.jpg"], "no such file"),
    "not an image": (["{note}"], "cannot be read as an image"),
    "truncated image": (["{truncated}"], "cannot be read as an image"),
    "model folder missing": (["--model", "{tmp}/nope"], "is not a folder"),
    "model folder without config": (["--model", "{tmp}"], "has no config.json"),
    "model config not json": (["--model", "{broken}"], "is not a JSON object"),
    "text tower as model": (["--model", str(MODELS / "text")], "not a PS3 vision or combined"),
    "garbage weights": (["--model", "{garbage}"], "{garbage}"),
    "mis-shaped weights": (["--model", "{misshaped}"], "{misshaped}"),
    "missing weights": (["--model", "{missing_blocks}"], "{missing_blocks}"),
    "bad image processor": (["--model", "{processor}"], "preprocessor_config.json"),
    "prompt without text tower": (["--model", "{vision}", "--prompt", "a dog"], "needs a text tower"),
    "prompt without tokenizer": (["--model", str(MODELS / "ps3"), "--prompt", "a dog"], "needs a tokenizer"),
    "text model not a text tower": (["--model", "{vision}", "--text-model", "{vision}"], "holds no PS3 text tower"),
    "text model without model": (["--text-model", str(MODELS / "text")], "needs --model"),
    "empty prompt": (["--prompt", " "], "must not be empty"),
    "negative looks": (["--num-look-close", "-1"], "int >= 0 or 'all'"),
    "word looks": (["--num-look-close", "many"], "int >= 0 or 'all'"),
    "fractional tokens": (["--num-token-look-close", "2.5"], "int >= 0 or 'all'"),
    "both look options": (["--num-look-close", "1", "--num-token-look-close", "9"], "not allowed with"),
    "out is a folder": (["--out", "{tmp}"], "is a folder"),
    "out under a file": (["--out", "{note}/fig.png"], "is a file, not a folder"),
    "out unwritable": (["--out", "{unwritable}/fig.png"], "cannot write in"),
    "out unknown format": (["--out", "{tmp}/fig.xyz"], "unknown figure format"),
    "features under a file": (["--save-features", "{note}/f.safetensors"], "is a file, not a folder"),
    "features unwritable": (["--save-features", "{unwritable}/f.safetensors"], "cannot write in"),
    "features onto the figure": (["--out", "{tmp}/x.png", "--save-features", "{tmp}/x.png"], "the same file"),
    "bad device": (["--device", "tpu:x"], "not a torch device"),
    "bad dtype": (["--dtype", "int8"], "invalid choice"),
    "unknown option": (["--looks", "2"], "unrecognized arguments"),
}
if not torch.cuda.is_available():
    ENCODE_CASES["cuda without a GPU"] = (["--device", "cuda"], "no CUDA GPU")


@pytest.mark.parametrize("case", sorted(ENCODE_CASES))
def test_encode_user_errors(case, files, unwritable, capsys):
    argv, message = ENCODE_CASES[case]
    argv = [a.format(unwritable=unwritable, **files) for a in argv]
    assert message.format(**files) in one_line_error(capsys, lambda: cli.main(argv), "ps3-encode")


def test_encode_checks_outputs_before_any_work(files, unwritable, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before --out was checked")

    monkeypatch.setattr(cli, "load_towers", no_work)
    monkeypatch.setattr(cli, "_open_image", no_work)
    for argv in (["--out", f"{files['note']}/fig.png"], ["--out", f"{unwritable}/fig.png"],
                 ["--save-features", f"{unwritable}/f.safetensors"]):
        assert "--" in one_line_error(capsys, lambda: cli.main([f"{files['tmp']}/missing.jpg", *argv]), "ps3-encode")


BENCH_CASES = {
    "unknown preset": (["--preset", "cpu-huge"], "invalid choice"),
    "unknown method": (["--methods", "ps3-3"], "unknown methods"),
    "resolution off the grid": (["--resolutions", "1000"], "not a multiple of 378"),
    "bad batch": (["--batches", "0"], "positive integers"),
    "no resolution left": (["--max-resolution", "100"], "no resolution left"),
    "negative reps": (["--reps", "-1"], "must be >= 0"),
    "zero timeout": (["--upstream-timeout", "0"], "must be > 0"),
    "missing upstream python": (["--upstream-python", "{tmp}/nope/python"], "not an executable"),
    "out is a file": (["--out", "{note}"], "is a file, not a folder"),
    "out under a file": (["--out", "{note}/results"], "is a file, not a folder"),
    "out unwritable": (["--out", "{unwritable}/results"], "cannot write in"),
}
if not torch.cuda.is_available():
    BENCH_CASES["gpu preset without a GPU"] = (["--preset", "gpu-4k"], "needs a CUDA GPU")


@pytest.mark.parametrize("case", sorted(BENCH_CASES))
def test_bench_user_errors(case, files, unwritable, monkeypatch, capsys):
    def no_work(*args, **kwargs):
        raise AssertionError("ps3-bench started work on bad arguments")

    monkeypatch.setattr(bench, "run", no_work)
    argv, message = BENCH_CASES[case]
    argv = [a.format(unwritable=unwritable, **files) for a in argv]
    assert message in one_line_error(capsys, lambda: bench.main(argv), "ps3-bench")


@pytest.mark.parametrize("argv, prog", [(["ps3.cli", "/no/such/image.jpg"], "ps3-encode"), (["ps3.bench", "--preset", "x"], "ps3-bench")])
def test_as_a_process(argv, prog):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"{prog}: error: "), proc.stderr
