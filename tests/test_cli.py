"""ps3-encode end to end: built-in model and a checkpoint folder with its own processor."""

from __future__ import annotations

import numpy as np
from PIL import Image

from ps3 import PS3ImageProcessor, PS3VisionModel
from ps3.cli import main
from ps3.demo import randomize_parameters_

from helpers import tiny_vision_config


def test_builtin_model_on_synthetic_image(tmp_path, capsys):
    out = tmp_path / "sel.png"
    main(["--out", str(out)])
    text = capsys.readouterr().out
    assert "scale   378:    729 tokens" in text and "scale  1512:" in text
    assert Image.open(out).size == (2 * 1512, 1512)


def test_checkpoint_folder_and_image_file(tmp_path, capsys):
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config()))
    model.save_pretrained(tmp_path / "ckpt")
    PS3ImageProcessor(image_size=224, mean=0.5, std=0.5).save_pretrained(tmp_path / "ckpt")
    rgb = np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    main([str(tmp_path / "img.png"), "--model", str(tmp_path / "ckpt"), "--num-look-close", "all", "--out", str(tmp_path / "o.png")])
    text = capsys.readouterr().out
    assert "total: 336 tokens" in text  # 16 + 64 + 256: every patch of a 224 image
    assert Image.open(tmp_path / "o.png").size == (400, 150)
