"""ps3-encode end to end: the built-in model, checkpoint folders, top-down prompts, the figure
and the saved features."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from ps3 import PS3Config, PS3ImageProcessor, PS3Model, PS3TextConfig, PS3TextModel, PS3Tokenizer, PS3VisionModel
from ps3.cli import main
from ps3.demo import randomize_parameters_

from helpers import FIXTURES, rel_err, tiny_vision_config

TAB_BLUE, TAB_ORANGE = (31, 119, 180), (255, 127, 14)  # the colours of looks 1 and 2


def colour_pixels(png: np.ndarray, rgb: tuple[int, int, int], tol: int = 12) -> int:
    return int((np.abs(png[..., :3].astype(int) - rgb).max(-1) <= tol).sum())


def check_figure(path, rows: int, looks: int) -> np.ndarray:
    """Readable size whatever the input, not blank, and each look's colour drawn."""
    png = np.asarray(Image.open(path).convert("RGB"))
    height, width = png.shape[:2]
    assert 800 <= width <= 2000 and height >= rows * 300, (width, height)
    assert png.std() > 20 and len(np.unique(png.reshape(-1, 3), axis=0)) > 1000
    for rgb in (TAB_BLUE, TAB_ORANGE)[:looks]:
        assert colour_pixels(png, rgb) > 100, rgb
    return png


def test_builtin_model_with_a_prompt(tmp_path, capsys):
    out = tmp_path / "sel.png"
    main(["--prompt", "the sign on the dock", "--num-look-close", "2", "--out", str(out)])
    text = capsys.readouterr().out
    assert "bottom-up" in text and 'top-down: "the sign on the dock"' in text
    assert text.count("scale   378:    729 tokens") == 2 and text.count("scale  1512:   2048 of 11664 tokens selected") == 2
    assert text.count("total: 3289 tokens") == 2  # 729 + 2 looks x 1280
    check_figure(out, rows=2, looks=2)


def test_checkpoint_folder_non_square_image_and_token_budget(tmp_path, capsys):
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config()))
    model.save_pretrained(tmp_path / "ckpt")
    PS3ImageProcessor(image_size=224, mean=0.5, std=0.5).save_pretrained(tmp_path / "ckpt")
    rgb = np.random.default_rng(0).integers(0, 256, (150, 4000, 3), dtype=np.uint8)  # very wide
    Image.fromarray(rgb).save(tmp_path / "img.png")
    main([str(tmp_path / "img.png"), "--model", str(tmp_path / "ckpt"), "--num-token-look-close", "30",
          "--out", str(tmp_path / "o.png")])
    assert "total: 46 tokens" in capsys.readouterr().out  # 16 low-res + 30
    png = np.asarray(Image.open(tmp_path / "o.png"))
    assert png.shape[1] <= 2000 and png.shape[0] < png.shape[1]
    main([str(tmp_path / "img.png"), "--model", str(tmp_path / "ckpt"), "--num-look-close", "all", "--out", str(tmp_path / "a.png")])
    assert "total: 336 tokens" in capsys.readouterr().out  # 16 + 64 + 256: every patch of a 224 image


PROMPTS = ["a red car", "the small dog"]


def designed_checkpoint(folder):
    """A tiny combined checkpoint whose text tower maps PROMPTS[0] to ``-prior_prompt`` and
    PROMPTS[1] to ``+prior_prompt``, by construction rather than by luck.

    Without the high-res saliency branch a patch's logit is ``5 cos(feature, prompt)``, so
    the first prompt ranks the patches in exactly the reverse order of bottom-up selection
    (disjoint selections while the looks take less than half of each scale) and the second
    selects exactly what bottom-up selects. Construction: ``prompt_proj.fc1`` maps the two
    normalised text embeddings to ``(c, -c, 0, ...)`` and ``(-c, c, 0, ...)``; GELU and
    LayerNorm (unit weight, zero bias) act the same on every position, so they give
    ``(a, b, e, ...)`` and ``(b, a, e, ...)``; ``fc2`` reads ``(a - b)`` and ``(b - a)``.
    """
    text_config = PS3TextConfig(output_dim=24, prompt_proj_dim=64, context_length=16, vocab_size=64, width=32, heads=2, layers=1)
    config = PS3Config(text_config=text_config, vision_config=tiny_vision_config(highres_selection_feature=False))
    model = randomize_parameters_(PS3Model(config), seed=5).eval()
    tokenizer = PS3Tokenizer(str(FIXTURES / "tokenizer"), context_length=16)
    proj = model.text_model.prompt_proj
    with torch.no_grad():
        n = F.normalize(model.text_model(tokenizer(PROMPTS)).pooled_output, dim=-1)
        w = (n[0] - n[1]) / (1 - n[0] @ n[1])  # w.n0 = 1, w.n1 = -1
        for p in (proj.fc1.weight, proj.fc1.bias, proj.norm.bias, proj.fc2.weight, proj.fc2.bias):
            p.zero_()
        proj.fc1.weight[0], proj.fc1.weight[1] = 4 * w, -4 * w
        proj.norm.weight.fill_(1.0)
        h = proj.norm(proj.act(proj.fc1(n)))
        u = -model.vision_model.prior_prompt / (h[0, 0] - h[0, 1])
        proj.fc2.weight[:, 0], proj.fc2.weight[:, 1] = u, -u
        prompts = model.text_model(tokenizer(PROMPTS)).prompt
    prior = model.vision_model.prior_prompt.detach()
    assert rel_err(prompts[0], -prior) < 1e-5 and rel_err(prompts[1], prior) < 1e-5  # the construction holds
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_top_down_prompts_on_a_combined_checkpoint(tmp_path, capsys):
    ckpt = designed_checkpoint(tmp_path / "ckpt")
    rgb = np.random.default_rng(1).integers(0, 256, (200, 160, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "img.png")
    feats = tmp_path / "sub" / "features.safetensors"
    main([str(tmp_path / "img.png"), "--model", str(ckpt), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
          "--num-look-close", "2", "--out", str(tmp_path / "fig.png"), "--save-features", str(feats)])
    assert f'top-down: "{PROMPTS[1]}"' in capsys.readouterr().out
    check_figure(tmp_path / "fig.png", rows=3, looks=2)

    saved = load_file(str(feats))
    with safe_open(str(feats), "pt") as f:
        meta = f.metadata()
    names = ["bottom_up", "prompt_0", "prompt_1"]
    assert json.loads(meta["selections"]) == [{"name": n, "prompt": p} for n, p in zip(names, [None, *PROMPTS])]
    assert json.loads(meta["ps3_scales"]) == [56, 112, 224]
    fields = ["last_hidden_state"] + [f"{f}.{s}" for f in ("selection_maps", "look_maps", "selection_probs") for s in (112, 224)]
    assert set(saved) == {f"{n}.{f}" for n in names for f in fields} | {"prompt_0.prompt", "prompt_1.prompt"}

    # By design: prompt 0 selects none of bottom-up's patches, prompt 1 exactly bottom-up's.
    for s in (112, 224):
        bottom_up, first, second = (saved[f"{n}.look_maps.{s}"] for n in names)
        assert (bottom_up >= 0).sum() == (first >= 0).sum() > 0
        assert not ((bottom_up >= 0) & (first >= 0)).any()
        assert torch.equal(bottom_up, second)

    # The file holds what the library gives for the same inputs.
    vision = PS3VisionModel.from_pretrained(ckpt).eval()
    text = PS3TextModel.from_pretrained(ckpt).eval()
    x = PS3ImageProcessor(image_size=224)(Image.open(tmp_path / "img.png"))["pixel_values"][0][None]
    with torch.no_grad():
        prompts = text(PS3Tokenizer.from_pretrained(ckpt)(PROMPTS)).prompt
        for name, prompt in zip(names, [None, prompts[:1], prompts[1:]]):
            out = vision(x, prompt=prompt, num_look_close=2, output_look_maps=True)
            assert rel_err(saved[f"{name}.last_hidden_state"], out.last_hidden_state[0]) < 1e-6
            if prompt is not None:
                assert rel_err(saved[f"{name}.prompt"], prompt[0]) < 1e-6
            for i, s in enumerate((112, 224)):
                assert torch.equal(saved[f"{name}.selection_maps.{s}"], out.selection_maps[i][0])
                assert torch.equal(saved[f"{name}.look_maps.{s}"], out.look_maps[i][0])
                assert rel_err(saved[f"{name}.selection_probs.{s}"], out.selection_probs[i][0]) < 1e-6


def test_no_look_draws_the_image_only(tmp_path, capsys):
    out = tmp_path / "o.svg"
    model = randomize_parameters_(PS3VisionModel(tiny_vision_config()))
    model.save_pretrained(tmp_path / "ckpt")
    main(["--model", str(tmp_path / "ckpt"), "--num-look-close", "0", "--out", str(out)])
    assert "total: 16 tokens" in capsys.readouterr().out
    assert "no look: low-res tokens only" in out.read_text()


@pytest.mark.parametrize("size", [(300, 4000), (4000, 300), (40, 40)])
def test_figure_size_whatever_the_image(size):
    """Portrait, landscape, tiny: the figure stays under 2000 px wide and is drawn."""
    from ps3.selection_figure import DPI, SelectionView, selection_figure

    h, w = size
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    looks = [torch.randint(-1, 3, g) for g in ((8, 8), (16, 16))]
    view = SelectionView("bottom-up", looks, [torch.rand(8, 8), torch.rand(16, 16)])
    fig = selection_figure(image, [view, view], [56, 112, 224], 16, "heading")
    width, height = (fig.get_size_inches() * DPI).round()
    assert 800 <= width <= 2000 and height >= 2 * 150
    assert height <= 2 * (8 * DPI + 200) or w / h < 1 / 2  # tall panels are capped unless that would make them narrow
