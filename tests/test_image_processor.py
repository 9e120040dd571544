"""PS3ImageProcessor: upstream parity, exact arithmetic, input kinds, save/load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ps3.image_processing_ps3 import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD, PS3ImageProcessor

UPSTREAM = Path(__file__).parent / "fixtures" / "upstream"
MEAN = torch.tensor(OPENAI_DATASET_MEAN).view(3, 1, 1)
STD = torch.tensor(OPENAI_DATASET_STD).view(3, 1, 1)


def random_image(width: int = 37, height: int = 23, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    array = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(array[..., 0] if channels == 1 else array, mode)


def reference(image: Image.Image, size: tuple[int, int], resample=Image.Resampling.BICUBIC) -> torch.Tensor:
    """torchvision's Resize -> RGB -> ToTensor -> Normalize on a PIL image, spelled out."""
    resized = image.resize((size[1], size[0]), resample).convert("RGB")
    x = torch.from_numpy(np.array(resized)).permute(2, 0, 1).float().div(255)
    return (x - MEAN) / STD


# ---------------------------------------------------------------- upstream parity


def test_upstream_image_processor_parity():
    cases = sorted((UPSTREAM / "cases").glob("image_processor*.json"))
    if not cases:
        pytest.fail(f"no upstream image_processor cases under {UPSTREAM / 'cases'}; regenerate the fixtures")
    for case in cases:
        meta = json.loads(case.read_text())
        image_path = UPSTREAM / meta["image"]
        if not image_path.exists():
            pytest.fail(f"missing upstream fixture {image_path}")
        image = Image.open(image_path)  # lazily loaded PNG, exactly as upstream's fixture maker used it
        expected = load_file(case.with_suffix(".safetensors"))["out.pixel_values"]
        out = PS3ImageProcessor(**meta["processor_kwargs"]).preprocess(image)["pixel_values"]
        assert isinstance(out, list) and len(out) == 1, case.name
        got = out[0]
        expected = expected[0] if expected.dim() == 4 else expected
        assert got.dtype == torch.float32 and got.shape == expected.shape, case.name
        err = (got - expected).abs().max().item()
        assert err <= 1e-6, f"{case.name}: max abs error {err:.3g}"


# ---------------------------------------------------------------- attributes


def test_attributes_for_vila():
    proc = PS3ImageProcessor(image_size=378)
    assert proc.image_size == (378, 378)
    assert proc.size == {"shortest_edge": 378}
    assert proc.crop_size == {"height": 378, "width": 378}
    assert tuple(proc.image_mean) == OPENAI_DATASET_MEAN and tuple(proc.image_std) == OPENAI_DATASET_STD
    assert proc.resize_mode == "squash" and proc.interpolation == "bicubic"


def test_scalar_mean_std_broadcast():
    proc = PS3ImageProcessor(image_size=4, mean=0.5, std=0.25)
    assert proc.mean == (0.5, 0.5, 0.5) and proc.std == (0.25, 0.25, 0.25)
    white = Image.new("RGB", (3, 3), (255, 255, 255))
    torch.testing.assert_close(proc(white)["pixel_values"][0], torch.full((3, 4, 4), 2.0))


# ---------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("interpolation, resample", [("bicubic", Image.Resampling.BICUBIC),
                                                     ("bilinear", Image.Resampling.BILINEAR),
                                                     ("random", Image.Resampling.BICUBIC)])
@pytest.mark.parametrize("size", [16, (12, 20)])
def test_matches_spelled_out_pipeline(interpolation, resample, size):
    proc = PS3ImageProcessor(image_size=size, interpolation=interpolation)
    image = random_image()
    hw = (size, size) if isinstance(size, int) else size
    out = proc.preprocess(image)["pixel_values"][0]
    assert out.shape == (3, *hw) and out.dtype == torch.float32
    assert torch.equal(out, reference(image, hw, resample))


def test_same_size_image_is_only_normalised():
    image = random_image(8, 6)
    out = PS3ImageProcessor(image_size=(6, 8))(image)["pixel_values"][0]
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - MEAN) / STD
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_resized_then_converted(mode):
    image = random_image(mode="RGB").convert(mode) if mode == "P" else random_image(mode=mode)
    out = PS3ImageProcessor(image_size=10)(image)["pixel_values"][0]
    assert out.shape == (3, 10, 10)
    assert torch.equal(out, reference(image, (10, 10)))  # PIL handles each mode (P: nearest)


# ---------------------------------------------------------------- input kinds


def test_list_of_images():
    images = [random_image(seed=1), random_image(20, 30, seed=2)]
    out = PS3ImageProcessor(image_size=9)(images)["pixel_values"]
    assert len(out) == 2
    for got, image in zip(out, images):
        assert torch.equal(got, reference(image, (9, 9)))


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1), ("RGBA", 4)])
def test_uint8_tensor_equals_pil(mode, channels):
    image = random_image(mode=mode)
    array = np.array(image)
    tensor = torch.from_numpy(array if channels > 1 else array[..., None]).permute(2, 0, 1)
    proc = PS3ImageProcessor(image_size=11)
    assert torch.equal(proc(tensor)["pixel_values"][0], proc(image)["pixel_values"][0])


def test_float_tensor_close_to_pil():
    image = Image.fromarray(np.kron(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16, np.ones((8, 8), np.uint8)))
    image = image.convert("RGB")  # smooth-ish blocks: resampling kernels agree closely
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255
    proc = PS3ImageProcessor(image_size=16)
    got = proc(tensor)["pixel_values"][0]
    want = proc(image)["pixel_values"][0]
    assert got.shape == want.shape == (3, 16, 16)
    assert (got - want).abs().mean() < 0.05


def test_float_tensor_same_size_and_grayscale():
    tensor = torch.rand(1, 5, 7)
    out = PS3ImageProcessor(image_size=(5, 7))(tensor)["pixel_values"][0]
    torch.testing.assert_close(out, (tensor.expand(3, -1, -1) - MEAN) / STD)


def test_return_tensors_pt_keeps_upstream_list():
    out = PS3ImageProcessor(image_size=8).preprocess(random_image(), return_tensors="pt")
    assert set(out) == {"pixel_values"} and isinstance(out["pixel_values"], list)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "bad, error, word",
    [
        (np.zeros((8, 8, 3), np.uint8), TypeError, "image"),
        ("image.png", TypeError, "image"),
        (torch.zeros(8, 8, dtype=torch.uint8), ValueError, "image"),
        (torch.zeros(2, 8, 8), ValueError, "image"),
        (torch.zeros(3, 8, 8, dtype=torch.int32), TypeError, "image"),
        ([], ValueError, "image"),
        (Image.new("RGB", (0, 0)), ValueError, "0x0 pixels"),
        (Image.new("RGB", (5, 0)), ValueError, "5x0 pixels"),
        (torch.zeros(3, 0, 0), ValueError, "0x0 pixels"),
        (torch.zeros(3, 4, 0, dtype=torch.uint8), ValueError, "0x4 pixels"),
    ],
)
def test_bad_image_raises(bad, error, word):
    with pytest.raises(error, match=word):
        PS3ImageProcessor(image_size=8)(bad)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({}, "image_size"),
        ({"image_size": (8,)}, "image_size"),
        ({"image_size": -1}, "image_size"),
        ({"image_size": 8, "interpolation": "nearest"}, "interpolation"),
        ({"image_size": 8, "resize_mode": "shortest"}, "resize_mode"),
        ({"image_size": 8, "mean": (0.1, 0.2)}, "mean"),
        ({"image_size": 8, "mean": "0.5"}, "mean"),
        ({"image_size": 8, "mean": float("nan")}, "mean"),
        ({"image_size": 8, "std": 0}, "std must be positive"),
        ({"image_size": 8, "std": (0.2, 0.0, 0.3)}, "std must be positive"),
        ({"image_size": 8, "std": -0.2}, "std must be positive"),
        ({"image_size": 8, "std": float("inf")}, "std must be positive"),
        ({"image_size": 8, "std": True}, "std"),
    ],
)
def test_bad_config_raises(kwargs, word):
    with pytest.raises(ValueError, match=word):
        PS3ImageProcessor(**kwargs)


def test_bad_return_tensors_raises():
    with pytest.raises(ValueError, match="return_tensors"):
        PS3ImageProcessor(image_size=8).preprocess(random_image(), return_tensors="np")


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    proc = PS3ImageProcessor(image_size=(12, 20), mean=(0.5, 0.4, 0.3), std=0.2, interpolation="bilinear")
    proc.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert stored["image_processor_type"] == "PS3ImageProcessor"
    assert stored["image_size"] == [12, 20] and stored["interpolation"] == "bilinear"
    again = PS3ImageProcessor.from_pretrained(tmp_path)
    for attr in ("image_size", "mean", "std", "resize_mode", "interpolation", "size", "crop_size"):
        assert getattr(again, attr) == getattr(proc, attr), attr
    image = random_image()
    assert torch.equal(again(image)["pixel_values"][0], proc(image)["pixel_values"][0])
