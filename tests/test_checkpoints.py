"""Loading and saving checkpoints: clear errors for broken folders, and trunk position grids
that differ from the low-res grid (upstream-made ones are in the parity fixtures)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from ps3 import PS3Config, PS3Model, PS3TextConfig, PS3TextModel, PS3VisionModel
from ps3.demo import randomize_parameters_

from helpers import FIXTURES, rel_err, tiny_vision_config

MODELS = FIXTURES / "models"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny vision checkpoint folder (do not modify: copy it)."""
    folder = tmp_path_factory.mktemp("vision")
    randomize_parameters_(PS3VisionModel(tiny_vision_config()), seed=5).save_pretrained(folder)
    return folder


def copy_of(folder, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(folder, target)
    return target


def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def test_folder_without_config_names_it(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(OSError, match=r"config\.json not found"):
        PS3VisionModel.from_pretrained(folder)


def test_a_file_is_not_a_checkpoint_folder(saved):
    with pytest.raises(OSError, match="is a file"):
        PS3VisionModel.from_pretrained(saved / "model.safetensors")


@pytest.mark.parametrize("cls, folder, found", [
    (PS3VisionModel, "text", "ps3_text_model"),
    (PS3TextModel, "vision3", "ps3_vision_model"),
    (PS3Model, "vision3", "ps3_vision_model"),
])
def test_checkpoint_of_another_tower_is_rejected(cls, folder, found):
    with pytest.raises(ValueError, match=f"model_type='{found}'.*{cls.__name__} loads"):
        cls.from_pretrained(MODELS / folder)


def test_foreign_model_type_is_rejected(saved, tmp_path):
    folder = copy_of(saved, tmp_path)
    edit_config(folder, model_type="llama")
    with pytest.raises(ValueError, match="model_type='llama'"):
        PS3VisionModel.from_pretrained(folder)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_unreadable_weights_file_is_named(saved, tmp_path, damage):
    folder = copy_of(saved, tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) - 100], "garbage": b"not safetensors" * 50}[damage])
    with pytest.raises(OSError, match=r"model\.safetensors is not a readable safetensors file"):
        PS3VisionModel.from_pretrained(folder)


def test_mis_shaped_weights_are_listed(saved, tmp_path):
    folder = tmp_path / "wide"
    randomize_parameters_(PS3VisionModel(tiny_vision_config(hidden_size=32)), seed=6).save_pretrained(folder)
    shutil.copy(saved / "config.json", folder / "config.json")  # says width 64
    with pytest.raises(ValueError, match=r"mismatched_keys.*vision_model\.prior_prompt: checkpoint \(32,\) vs model \(64,\)"):
        PS3VisionModel.from_pretrained(folder)


def test_save_onto_a_file_is_an_error(tmp_path):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    model = PS3VisionModel(tiny_vision_config())
    with pytest.raises(NotADirectoryError, match="exists and is not a folder"):
        model.save_pretrained(target)
    assert target.read_text() == "not a folder"


# ---------------------------------------------------------------- trunk position grid


def trunk_grid_model(img_size, seed=7, **overrides):
    return randomize_parameters_(PS3VisionModel(tiny_vision_config(img_size=img_size, **overrides)), seed=seed).eval()


def outputs(model, x, **kwargs):
    with torch.no_grad():
        return model(x, num_look_close=2, **kwargs).last_hidden_state


def test_silent_config_takes_the_grid_from_the_checkpoint(tmp_path):
    model = trunk_grid_model(224)  # 16x16 table, like timm's 224-px default; low-res grid is 4x4
    assert model.vision_model.trunk.pos_embed.shape == (1, 256, 64)
    model.save_pretrained(tmp_path)
    edit_config(tmp_path, img_size=None)  # as upstream writes it when timm's default was used
    loaded = PS3VisionModel.from_pretrained(tmp_path).eval()
    assert loaded.vision_model.trunk.grid_size == 16 and loaded.config.img_size == 224
    x = torch.randn(2, 3, 200, 224)
    assert torch.equal(outputs(loaded, x), outputs(model, x))


def test_low_res_pass_resamples_the_trunk_grid():
    """A 16x16-grid trunk's low-res pass equals a 4x4-grid trunk (otherwise the same weights)
    whose table is the 16x16 one resampled (bicubic, antialias, as timm) to 4x4."""
    wide = trunk_grid_model(224)
    native = trunk_grid_model(56)
    state = dict(wide.state_dict())
    table = state["vision_model.trunk.pos_embed"].reshape(1, 16, 16, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(4, 4), mode="bicubic", antialias=True)
    state["vision_model.trunk.pos_embed"] = table.flatten(2).transpose(1, 2)
    native.load_state_dict(state)
    x = torch.randn(2, 3, 56, 70)
    with torch.no_grad():
        got = wide(x, num_look_close=0).last_hidden_state
        expected = native(x, num_look_close=0).last_hidden_state
    assert rel_err(got, expected) < 1e-6


def test_combined_checkpoint_takes_the_grid_too(tmp_path):
    text = PS3TextConfig(width=32, heads=2, layers=1, context_length=8, vocab_size=50, output_dim=64, prompt_proj_dim=64)
    vision = tiny_vision_config(img_size=98)  # 7x7
    full = randomize_parameters_(PS3Model(PS3Config(text_config=text.to_dict(), vision_config=vision.to_dict())))
    full.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["vision_config"]["img_size"] = None
    (tmp_path / "config.json").write_text(json.dumps(config))
    for cls in (PS3Model, PS3VisionModel):
        assert cls.from_pretrained(tmp_path).vision_model.trunk.grid_size == 7


def test_explicit_img_size_wins_over_the_checkpoint(tmp_path):
    trunk_grid_model(224).save_pretrained(tmp_path)
    edit_config(tmp_path, img_size=112)  # says 8x8; the checkpoint holds 16x16
    with pytest.raises(ValueError, match=r"vision_model\.trunk\.pos_embed: checkpoint \(1, 256, 64\) vs model \(1, 64, 64\)"):
        PS3VisionModel.from_pretrained(tmp_path)


def test_fixed_size_trunk_runs_only_its_native_grid():
    """dynamic_img_size=False (upstream: timm's strict patch embed, no resampling)."""
    fixed = trunk_grid_model(56, dynamic_img_size=False)
    dynamic = trunk_grid_model(56)
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(fixed(x, num_look_close=0).last_hidden_state, dynamic(x, num_look_close=0).last_hidden_state)
    with pytest.raises(ValueError, match="dynamic_img_size is off.*needs 8x8"):
        fixed(x, num_look_close=1)
    with pytest.raises(ValueError, match="dynamic_img_size is off.*needs 4x4"):
        trunk_grid_model(224, dynamic_img_size=False)(x, num_look_close=0)
