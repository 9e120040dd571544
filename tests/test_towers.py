"""``ps3.demo.load_towers``: the built-in model (offline) and checkpoint folders of every kind."""

from __future__ import annotations

import json

import pytest
import torch

from ps3 import PS3TextModel, PS3Tokenizer, PS3VisionModel
from ps3.demo import demo_tokenizer, load_towers

from helpers import FIXTURES

MODELS = FIXTURES / "models"


def test_builtin_towers_work_offline(monkeypatch):
    import transformers

    def no_files(*args, **kwargs):
        raise AssertionError("the built-in tokenizer must not read or download anything")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_files)
    vision, text, tokenizer = load_towers()
    assert isinstance(vision, PS3VisionModel) and isinstance(text, PS3TextModel) and isinstance(tokenizer, PS3Tokenizer)
    assert vision.config.ps3_scales == [378, 756, 1512] and not vision.training and not text.training
    ids = tokenizer(["the sign on the dock", "schön", ""])
    assert ids.shape == (3, text.config.context_length) and ids.dtype == torch.long
    eot = text.config.vocab_size - 1  # the largest id, where argmax pooling reads
    assert ids[0, :21].tolist() == [*ids[0, :20].tolist(), eot] and (ids[0, :20] > 0).all() and (ids[0, 21:] == 0).all()
    assert ids[1, 6] == eot and ids[2, 0] == eot  # "schön" is 6 UTF-8 bytes; an empty text is just the end
    assert len({tuple(r) for r in ids.tolist()}) == 3
    with torch.no_grad():
        prompt = text(ids).prompt
    assert prompt.shape == (3, vision.config.hidden_size) and torch.isfinite(prompt).all()
    assert not torch.allclose(prompt[0], prompt[1])
    with pytest.raises(ValueError, match="no tokenizer_name to save"):
        demo_tokenizer().save_pretrained("unused")
    with pytest.raises(TypeError, match="tokenizer_name must be"):
        PS3Tokenizer(42)


def test_builtin_is_deterministic():
    a, b = load_towers(), load_towers()
    for m, n in ((a.vision, b.vision), (a.text, b.text)):
        assert all(torch.equal(p, q) for p, q in zip(m.state_dict().values(), n.state_dict().values()))


def test_combined_checkpoint_has_both_towers():
    vision, text, tokenizer = load_towers(MODELS / "ps3")
    assert isinstance(vision, PS3VisionModel) and isinstance(text, PS3TextModel)
    assert tokenizer is None  # the fixture folder holds no tokenizer_config.json


def test_vision_checkpoint_with_and_without_a_text_folder(tmp_path):
    vision, text, tokenizer = load_towers(MODELS / "vision3")
    assert isinstance(vision, PS3VisionModel) and text is None and tokenizer is None
    text_dir = tmp_path / "text"
    PS3TextModel.from_pretrained(MODELS / "text").save_pretrained(text_dir)
    (text_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_name": str(FIXTURES / "tokenizer"), "context_length": 16}))
    vision, text, tokenizer = load_towers(MODELS / "vision3", text_folder=text_dir, dtype=torch.float64)
    assert text.text_model.token_embedding.weight.dtype == torch.float64 and vision.dtype == torch.float64
    assert tokenizer(["a photo"]).shape == (1, 16)


@pytest.mark.parametrize(
    "folder, text_folder, error, match",
    [
        ("missing", None, OSError, "is not a folder"),
        ("", None, OSError, "has no config.json"),
        ("text", None, ValueError, "ps3_text_model model, not a PS3 vision"),
        ("vision3", "vision3", ValueError, "holds no PS3 text tower"),
        ("vision4", "text", ValueError, "32 wide"),  # 64-wide prompts for a 32-wide vision tower
        (None, "text", ValueError, "needs a vision checkpoint"),
    ],
)
def test_wrong_folders(folder, text_folder, error, match):
    with pytest.raises(error, match=match):
        load_towers(None if folder is None else MODELS / folder, None if text_folder is None else MODELS / text_folder)
