"""ps3-extract: torchrun split, kill and resume, webdataset/list inputs, feature semantics, errors.

The model is a tiny upstream-format checkpoint (scales 56/112/224) so that a run over a few
dozen images takes well under a second; torchrun runs are subprocesses (a few seconds each).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ps3 import PS3ImageProcessor, PS3TextModel, PS3Tokenizer, PS3VisionModel
from ps3.extract import main, read_features
from ps3.extract.pipeline import ImagePrep
from ps3.extract.shards import ShardWriter
from ps3.extract.sources import Chunker, Pending, token_batches

from helpers import FIXTURES

REPO = Path(__file__).resolve().parents[1]
MODEL = FIXTURES / "models" / "vision3_nohr"  # vision-only, no 1512 px saliency view: fast
SHARD = 5
# (height, width): portrait, landscape and square, several aspect classes, sizes below and
# above the model's 224 px. No landscape image has the transposed grid of a portrait one:
# a list holding both hits a modeling bug being fixed separately.
SIZES = [(80, 60), (60, 80), (64, 64), (45, 90), (30, 120), (100, 75), (50, 100), (30, 50), (300, 225), (48, 48), (250, 500)]
CORRUPT = {"bad.jpg", "b/truncated.png"}
BASE_ARGS = ["--model", str(MODEL), "--shard-size", str(SHARD), "--tokens-per-batch", "150", "--num-workers", "1",
             "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """32 images in nested folders (png/jpg/webp; RGB, L, RGBA, P) plus two corrupt files and a non-image."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(32):
        h, w = SIZES[i % len(SIZES)]
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        image = image.convert(["RGB", "L", "RGBA", "P"][i % 4]) if i % 5 == 0 else image
        folder = root / ["", "a", "b/c"][i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        ext = "png" if image.mode != "RGB" else ["png", "jpg", "webp"][i % 3]
        image.save(folder / f"img{i:02d}.{ext}")
    (root / "bad.jpg").write_bytes(b"not an image")
    good = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, format="PNG")
    (root / "b" / "truncated.png").write_bytes(good.getvalue()[:200])
    (root / "notes.txt").write_text("not listed")
    return root


def _run_in_process(inputs: list[str], out: Path, *extra: str) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as under torchrun, so fp32 results compare bitwise
    try:
        main([*inputs, "--out", str(out), *BASE_ARGS, *extra])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> Path:
    """A single-process run with every feature: what the other runs must reproduce."""
    out = tmp_path_factory.mktemp("single")
    _run_in_process([str(images)], out, "--features", "both")
    return out


def _features(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    result = {}
    for image_id, feats in read_features(out):
        assert image_id not in result, f"{image_id} read twice"
        result[image_id] = feats
    return result


def _assert_same(got: dict, ref: dict, rename=lambda i: i) -> None:
    assert sorted(map(rename, ref)) == sorted(got)
    for image_id, feats in ref.items():
        other = got[rename(image_id)]
        assert feats.keys() == other.keys()
        for name, tensor in feats.items():
            assert torch.equal(tensor, other[name]), f"{image_id} {name} differs"


def _errors(out: Path) -> dict[str, str]:
    lines = (out / "errors.jsonl").read_text().splitlines()
    return {e["id"]: e["error"] for e in map(json.loads, lines)}


def _torchrun(script: list[str], images: Path, out: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *script,
           str(images), "--out", str(out), *BASE_ARGS, "--features", "both"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_single_process_run(reference, images):
    feats = _features(reference)
    assert len(feats) == 32 and set(_errors(reference)) == CORRUPT
    assert "cannot identify image file" in _errors(reference)["bad.jpg"]
    for feat in feats.values():
        assert feat["pooled"].shape == feat["pooled_highres"].shape == (48,)
        n_high = int(feat["selection_112"].sum() + feat["selection_224"].sum())
        assert feat["tokens"].shape == (16 + n_high, 48) and feat["tokens"].dtype == torch.float32
        assert 0 < n_high <= 20  # one look of max_select_num=20
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["run_images"] == 32 and summary["output_shards"] == 7  # 34 inputs / 5 per shard


def test_torchrun_two_ranks_killed_and_resumed_equals_single_process(reference, images, tmp_path):
    """Rank 1 is SIGKILLed after its first shard; rerunning the same command completes the
    output, and the union of both runs' shards equals the single-process run bit for bit."""
    out = tmp_path / "out"
    killed = _torchrun([str(REPO / "tests" / "extract_kill_rank1.py")], images, out)
    assert killed.returncode != 0, killed.stdout + killed.stderr
    kept = {p.name: _identity(p) for p in (out / "shards").glob("*.safetensors")}
    assert 1 <= len(kept) < 7 and not (out / "index.jsonl").exists()

    resumed = _torchrun(["-m", "ps3.extract"], images, out)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    shards = sorted((out / "shards").iterdir())
    assert [p.name for p in shards] == [f"{part:06d}-00000.safetensors" for part in range(7)]  # no temporaries left
    assert {name: _identity(out / "shards" / name) for name in kept} == kept  # complete shards kept, not redone
    summary = json.loads((out / "summary.json").read_text())
    assert summary["run_parts_already_done"] == len(kept) and summary["ranks"] == 2
    ranks = {json.loads(load_meta(p))["rank"] for p in shards}
    assert ranks == {0, 1}  # each rank wrote its own shards
    ids = [json.loads(line)["id"] for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 32
    assert set(_errors(out)) == CORRUPT
    _assert_same(_features(out), _features(reference))


def _identity(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_ino, stat.st_mtime_ns


def load_meta(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["ps3_extract"]


def test_webdataset_and_list_inputs_equal_folder_input(reference, images, tmp_path):
    ordered = [line["id"] for line in map(json.loads, (reference / "index.jsonl").read_text().splitlines())]
    ordered = sorted(ordered + list(CORRUPT))  # the folder run's input order
    # Two tars cut at a shard boundary, so their shards hold the same images as the folder's.
    tars = [tmp_path / "data-0.tar", tmp_path / "data-1.tar"]
    for tar_path, ids in zip(tars, (ordered[: 2 * SHARD], ordered[2 * SHARD :])):
        with tarfile.open(tar_path, "w") as tar:
            for image_id in ids:
                tar.add(images / image_id, arcname=image_id)
            if tar_path == tars[-1]:  # a sample without an image
                data = b"caption only"
                info = tarfile.TarInfo("zz/caption.txt")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    _run_in_process([str(tmp_path / "data-{0..1}.tar")], tmp_path / "wds", "--features", "both")
    key = lambda image_id: image_id.rsplit(".", 1)[0]  # noqa: E731  webdataset keys drop the extension
    _assert_same(_features(tmp_path / "wds"), _features(reference), rename=key)
    errors = _errors(tmp_path / "wds")
    assert set(errors) == {key(i) for i in CORRUPT} | {"zz/caption"} and "no image in sample" in errors["zz/caption"]
    # A tar whose first shard is done and second is not: only the second is redone.
    first = tmp_path / "wds" / "shards" / "000000-00000.safetensors"
    before = _identity(first)
    (tmp_path / "wds" / "shards" / "000000-00001.safetensors").unlink()
    _run_in_process([str(tmp_path / "data-{0..1}.tar")], tmp_path / "wds", "--features", "both")
    assert _identity(first) == before
    assert json.loads((tmp_path / "wds" / "summary.json").read_text())["run_images"] == 5
    _assert_same(_features(tmp_path / "wds"), _features(reference), rename=key)

    listing = images / "list.txt"
    listing.write_text("\n".join(ordered) + "\n")
    try:
        _run_in_process([str(listing)], tmp_path / "list", "--features", "both")
    finally:
        listing.unlink()
    _assert_same(_features(tmp_path / "list"), _features(reference))


def test_features_mean_what_upstream_means(reference, images):
    """pooled = the MAP head over the low-res tokens (upstream's pooled_output for global text),
    pooled_highres = upstream's pre-training pooled_output, tokens = last_hidden_state."""
    model = PS3VisionModel.from_pretrained(MODEL).eval()
    processor = PS3ImageProcessor(image_size=224)
    prep = ImagePrep(model.vision_model, processor, {"num_look_close": 1}, squash=False)
    feats = _features(reference)
    for image_id in ("img00.png", "a/img07.jpg", "b/c/img05.png", "b/c/img08.webp", "img09.png"):
        image = Image.open(images / image_id)
        size = prep.target_size(image.height, image.width)
        x = processor.normalize_uint8(processor.resize_to_uint8(image, size))
        with torch.no_grad():
            out = model([x], num_look_close=1)
            pre = model([x], output_hidden_states=False)
            glob = model([x], output_hidden_states=False, is_global_text=torch.tensor([True]))
        got = feats[image_id]
        torch.testing.assert_close(got["tokens"], out.last_hidden_state[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["pooled_highres"], pre.pooled_output[0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got["pooled"], glob.pooled_output[0][0], rtol=1e-5, atol=1e-5)
        for scale, m in zip((112, 224), out.selection_maps[0]):
            assert torch.equal(got[f"selection_{scale}"], m[0].bool())
        assert got["tokens"].shape[0] == prep.tokens(size)


def test_squash_equals_the_image_processor_path(images, tmp_path):
    """--resize squash feeds exactly what PS3ImageProcessor (upstream's transform) gives."""
    folder = tmp_path / "few"
    folder.mkdir()
    for name in ("img00.png", "a/img01.jpg", "img03.png"):
        shutil.copy(images / name, folder / Path(name).name)
    _run_in_process([str(folder)], tmp_path / "out", "--resize", "squash", "--features", "tokens", "--num-look-close", "2")
    model = PS3VisionModel.from_pretrained(MODEL).eval()
    processor = PS3ImageProcessor(image_size=224)
    feats = _features(tmp_path / "out")
    for name in ("img00.png", "img01.jpg", "img03.png"):
        x = processor(Image.open(folder / name))["pixel_values"][0]
        with torch.no_grad():
            ref = model(x[None], num_look_close=2).last_hidden_state[0]
        torch.testing.assert_close(feats[name]["tokens"], ref, rtol=1e-5, atol=1e-5)
        assert ref.shape[0] == 16 + 40  # two looks of 20 tokens


def test_no_looks_layer_choice_and_dtype(images, tmp_path):
    folder = tmp_path / "few"
    folder.mkdir()
    shutil.copy(images / "img00.png", folder / "x.png")
    _run_in_process([str(folder)], tmp_path / "out", "--num-look-close", "0", "--features", "both", "--layer", "-2",
                    "--dtype", "bfloat16")
    (_, feats), = list(read_features(tmp_path / "out"))
    assert set(feats) == {"pooled", "tokens"} and feats["tokens"].shape == (16, 48)
    assert feats["tokens"].dtype == torch.bfloat16
    model = PS3VisionModel.from_pretrained(MODEL, dtype=torch.bfloat16).eval()
    image = Image.open(folder / "x.png")
    processor = PS3ImageProcessor(image_size=224)
    x = processor.normalize_uint8(processor.resize_to_uint8(image, ImagePrep(model.vision_model, processor, {}, False).target_size(80, 60)))
    with torch.no_grad():
        out = model([x.bfloat16()], num_look_close=0)
    assert torch.equal(feats["tokens"], out.hidden_states[0][-2][0])


def test_prompt_steers_through_the_text_model(images, tmp_path, capsys):
    ckpt = tmp_path / "ps3"
    shutil.copytree(FIXTURES / "models" / "ps3", ckpt)
    (ckpt / "tokenizer_config.json").write_text(json.dumps({"tokenizer_name": str(FIXTURES / "tokenizer"), "context_length": 16}))
    folder = tmp_path / "few"
    folder.mkdir()
    for name in ("img00.png", "b/c/img02.webp"):
        shutil.copy(images / name, folder / Path(name).name)
    args = [str(folder), "--out", str(tmp_path / "out"), "--model", str(ckpt), "--prompt", "a red square", "--device", "cpu",
            "--num-workers", "0", "--no-progress", "--features", "both"]
    main(args)
    vision = PS3VisionModel.from_pretrained(ckpt).eval()
    text = PS3TextModel.from_pretrained(ckpt).eval()
    tokenizer = PS3Tokenizer.from_pretrained(ckpt)
    processor = PS3ImageProcessor(image_size=224)
    prep = ImagePrep(vision.vision_model, processor, {"num_look_close": 1}, squash=False)
    feats = _features(tmp_path / "out")
    with torch.no_grad():
        prompt = text(tokenizer(["a red square"])).prompt
        for name in ("img00.png", "img02.webp"):
            image = Image.open(folder / name)
            x = processor.normalize_uint8(processor.resize_to_uint8(image, prep.target_size(image.height, image.width)))
            ref = vision([x], output_hidden_states=False, prompt=prompt)
            torch.testing.assert_close(feats[name]["pooled_highres"], ref.pooled_output[0][0], rtol=1e-5, atol=1e-5)
    assert json.loads((tmp_path / "out" / "run.json").read_text())["prompt"] == "a red square"

    # The built-in model has a small text tower and tokenizer of its own: --prompt runs offline.
    main([str(folder), "--out", str(tmp_path / "builtin"), "--prompt", "a red square", "--device", "cpu",
          "--num-workers", "0", "--no-progress"])
    assert len(_features(tmp_path / "builtin")) == 2

    # A vision-only checkpoint: one clear line, exit 2.
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main([str(folder), "--out", str(tmp_path / "o2"), "--model", str(MODEL), "--prompt", "x", "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--prompt needs a text model" in err and "checkpoint" in err
    assert len(err.strip().splitlines()) == 1


def test_bad_arguments_exit_2_with_one_line(images, tmp_path, capsys):
    cases = [
        ([str(tmp_path / "missing")], "neither a folder"),
        ([str(tmp_path)], "holds no image files"),
        ([str(images), str(images)], "several inputs"),
    ]
    for inputs, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main([*inputs, "--out", str(tmp_path / "o"), *BASE_ARGS])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    blocker = tmp_path / "afile"
    blocker.write_text("")
    for extra, message in (
        (["--out", str(blocker)], "is a file, not a folder"),
        (["--out", str(blocker / "sub")], "is a file, not a folder"),
        (["--out", str(tmp_path / "o"), "--device", "bogus"], "--device 'bogus' is not a torch device"),
        (["--out", str(tmp_path / "o"), "--num-look-close", "x"], "expected an int >= 0 or 'all'"),
        (["--out", str(tmp_path / "o"), "--num-token-look-close", "-3"], "expected an int >= 0 or 'all'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([str(images), *extra, "--no-progress"])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    dup = tmp_path / "dup.txt"
    dup.write_text("img00.png\nimg00.png\n")
    with pytest.raises(SystemExit):
        main([str(dup), "--out", str(tmp_path / "o"), *BASE_ARGS])
    assert "twice" in capsys.readouterr().err


def test_resume_with_other_settings_is_refused(images, tmp_path, capsys):
    folder = tmp_path / "few"
    folder.mkdir()
    shutil.copy(images / "img00.png", folder / "x.png")
    _run_in_process([str(folder)], tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        _run_in_process([str(folder)], tmp_path / "out", "--features", "tokens")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "features: 'pooled' before, 'tokens' now" in err
    with pytest.raises(OSError, match="not a finished"):
        next(read_features(tmp_path))


def test_token_batches_respect_budget_and_keep_every_image_once():
    rng = np.random.default_rng(0)
    shapes = [(3, 224, 168), (3, 112, 224), (3, 224, 224)]
    items = []
    for i in range(60):
        shape = shapes[rng.integers(3)]
        items.append(Pending(str(i), torch.empty(shape, dtype=torch.uint8), int(shape[1] * shape[2] // 1000)))
    items.append(Pending("huge", torch.empty(3, 8, 8, dtype=torch.uint8), 500))  # over budget: alone
    batches = list(token_batches(items, 120))
    assert batches == list(token_batches(items, 120))  # deterministic
    flat = [im.image_id for b in batches for im in b]
    assert sorted(flat) == sorted(im.image_id for im in items)
    for b in batches:
        assert sum(im.tokens for im in b) <= 120 or len(b) == 1
    assert any(len(b) == 1 and b[0].image_id == "huge" for b in batches)
    assert sum(len({im.shape for im in b}) == 1 for b in batches) >= len(batches) // 2  # bucketed by size


def test_chunker_knows_the_last_chunk():
    for n in (0, 1, 4, 5, 6, 10):
        chunker, chunks = Chunker(range(n)), []
        while True:
            chunks.append(list(chunker.take(5)))
            if chunker.exhausted():
                break
        assert sum(chunks, []) == list(range(n)) and all(len(c) == 5 for c in chunks[:-1])
        assert len(chunks) == max(1, -(-n // 5))


def test_shard_writer_is_valid_safetensors_and_atomic(tmp_path):
    writer = ShardWriter(tmp_path, "x.safetensors")
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).bfloat16(), "m": torch.rand(2, 3) > 0.5, "e": torch.empty(0, 4)}
    writer.add_image("first", tensors)
    writer.failures.append(("broken", "why"))
    assert not (tmp_path / "x.safetensors").exists()
    writer.close({"last": True})
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert loaded.keys() == {f"0/{k}" for k in tensors}
    for k, t in tensors.items():
        assert torch.equal(loaded[f"0/{k}"], t)
    meta = json.loads(load_meta(tmp_path / "x.safetensors"))
    assert meta == {"last": True, "images": ["first"], "failures": [["broken", "why"]]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]
