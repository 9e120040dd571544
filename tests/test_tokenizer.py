"""PS3Tokenizer: upstream parity, cleaning, padding/truncation, save/load; all offline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ps3.tokenization_ps3 import CLEAN_FUNCTIONS, PS3Tokenizer, canonicalize_text

UPSTREAM = Path(__file__).parent / "fixtures" / "upstream"
WORDS = "a photo of cat dog the red car & schön".split()
VOCAB = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
ID = {w: i for w, i in VOCAB.items()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    """A word-level HF tokenizer folder (bos/eos template, pad 0) built without network."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>", sep_token="</s>"
    )
    folder = tmp_path_factory.mktemp("hf_tokenizer")
    fast.save_pretrained(folder)
    return str(folder)


def ids(*words: str, length: int = 8) -> list[int]:
    row = [2, *(ID[w] for w in words), 3]
    return row + [0] * (length - len(row))


# ---------------------------------------------------------------- upstream parity


def require(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"missing upstream fixture {path}; regenerate tests/fixtures/upstream with upstream PS3")
    return path


def upstream_tokenizer_cases() -> list[Path]:
    return sorted((UPSTREAM / "cases").glob("tokenizer*.json"))


def test_upstream_tokenizer_parity():
    cases = upstream_tokenizer_cases()
    if not cases:
        pytest.fail(f"no upstream tokenizer cases under {UPSTREAM / 'cases'}; regenerate the fixtures")
    for case in cases:
        meta = json.loads(case.read_text())
        expected = load_file(case.with_suffix(".safetensors"))["out.input_ids"]
        folder = require(UPSTREAM / meta.get("tokenizer_dir", "tokenizer"))
        tok = PS3Tokenizer(str(folder), **meta["tokenizer_kwargs"])
        got = tok(meta["texts"], context_length=meta.get("call_context_length"))
        assert got.dtype == torch.long, case.name
        assert torch.equal(got, expected), f"{case.name}: {got.tolist()} != {expected.tolist()}"


# ---------------------------------------------------------------- cleaning


def test_clean_whitespace():
    assert CLEAN_FUNCTIONS["whitespace"]("  A\n\tPhoto   of  ") == "A Photo of"


def test_clean_double_html_unescape_and_ftfy():
    assert CLEAN_FUNCTIONS["whitespace"]("cat &amp;amp; dog") == "cat & dog"
    assert CLEAN_FUNCTIONS["whitespace"]("schÃ¶n") == "schön"  # mojibake repaired by ftfy


def test_clean_lower():
    assert CLEAN_FUNCTIONS["lower"]("  A  RED\nCar ") == "a red car"


def test_clean_canonicalize():
    assert CLEAN_FUNCTIONS["canonicalize"]("A_photo, of: the  CAT!") == "a photo of the cat"
    assert canonicalize_text("a {} b, c", keep_punctuation_exact_string="{}") == "a {} b c"


def test_bad_clean_raises(hf_dir):
    with pytest.raises(ValueError, match="clean"):
        PS3Tokenizer(hf_dir, clean="nope")


# ---------------------------------------------------------------- encoding


def test_pads_to_context_length(hf_dir):
    tok = PS3Tokenizer(hf_dir, context_length=8)
    out = tok(["a  photo of a cat", "the red car"])
    assert out.dtype == torch.long and out.shape == (2, 8)
    assert out.tolist() == [ids("a", "photo", "of", "a", "cat"), ids("the", "red", "car")]


def test_single_string_and_cleaning_applied(hf_dir):
    tok = PS3Tokenizer(hf_dir, context_length=8, clean="lower")
    assert tok("  THE\tRed car ").tolist() == [ids("the", "red", "car")]


def test_truncates_keeping_end_token(hf_dir):
    tok = PS3Tokenizer(hf_dir, context_length=5)
    assert tok("a photo of the red car").tolist() == [[2, ID["a"], ID["photo"], ID["of"], 3]]


def test_call_context_length_overrides(hf_dir):
    tok = PS3Tokenizer(hf_dir, context_length=8)
    assert tok("a cat", context_length=4).shape == (1, 4)


def test_strip_sep_token(hf_dir):
    tok = PS3Tokenizer(hf_dir, context_length=6, strip_sep_token=True)
    assert tok("a cat").tolist() == [[2, ID["a"], ID["cat"], 0, 0, 0]]


def test_unknown_language_warns(hf_dir):
    with pytest.warns(UserWarning, match="language"):
        PS3Tokenizer(hf_dir, language="de_DE")


@pytest.mark.parametrize("bad", [3, ["ok", None], None])
def test_bad_texts_raise(hf_dir, bad):
    with pytest.raises(TypeError, match="texts"):
        PS3Tokenizer(hf_dir)(bad)


def test_missing_context_length_raises(hf_dir):
    with pytest.raises(ValueError, match="context_length"):
        PS3Tokenizer(hf_dir, context_length=None)("a cat")


def test_empty_list_raises(hf_dir):
    with pytest.raises(ValueError, match="texts is an empty list"):
        PS3Tokenizer(hf_dir)([])


@pytest.mark.parametrize("bad, error", [(8.5, TypeError), (8.0, TypeError), ("8", TypeError), (True, TypeError), (-3, ValueError)])
def test_bad_context_length_raises(hf_dir, bad, error):
    with pytest.raises(error, match="context_length"):
        PS3Tokenizer(hf_dir, context_length=16)(["a cat"], context_length=bad)
    with pytest.raises(error, match="context_length"):
        PS3Tokenizer(hf_dir, context_length=bad)


def test_context_length_integer_kinds(hf_dir):
    tok = PS3Tokenizer(hf_dir, context_length=16)
    assert tok(["a cat"], context_length=np.int64(8)).shape == (1, 8)
    assert tok(["a cat"], context_length=0).shape == (1, 16)  # upstream's `or`: 0 means the default


# ---------------------------------------------------------------- save / load


def test_save_load_round_trip(hf_dir, tmp_path):
    tok = PS3Tokenizer(hf_dir, context_length=7, clean="canonicalize", strip_sep_token=True, extra_field="kept")
    tok.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert stored == {
        "tokenizer_name": hf_dir, "context_length": 7, "clean": "canonicalize",
        "strip_sep_token": True, "language": None, "extra_field": "kept",
    }
    again = PS3Tokenizer.from_pretrained(tmp_path)
    assert again.init_kwargs == tok.init_kwargs
    texts = ["A photo, of the CAT!", "red_car"]
    assert torch.equal(again(texts), tok(texts))
    assert PS3Tokenizer.from_pretrained(tmp_path, context_length=4)(texts).shape == (2, 4)


def test_from_pretrained_rejects_foreign_config(hf_dir):
    with pytest.raises(ValueError, match="tokenizer_name"):
        PS3Tokenizer.from_pretrained(hf_dir)  # an HF tokenizer folder, not a PS3Tokenizer one
