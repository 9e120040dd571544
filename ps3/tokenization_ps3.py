"""PS3's text tokenizer: open_clip-style cleaning around a Hugging Face tokenizer.

Upstream subclasses ``PreTrainedTokenizer`` without initialising it, which transformers 5
does not tolerate well (attribute look-ups on the half-built base class misbehave). This is
a plain class with the same constructor, ``__call__``, ``save_pretrained`` and
``from_pretrained`` entry points, so it works on transformers 4.45 and 5.x alike.
"""

from __future__ import annotations

import html
import json
import operator
import os
import string
import warnings

import torch
from transformers import PreTrainedTokenizerBase

TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
DEFAULT_CONTEXT_LENGTH = 77  # OpenAI CLIP's
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _fix_text(text: str) -> str:
    """Repair mojibake with ftfy and undo (double) HTML escaping."""
    try:
        import ftfy
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("PS3Tokenizer needs the 'ftfy' package: pip install ftfy") from err
    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def _squash_whitespace(text: str) -> str:
    return " ".join(text.split())


def canonicalize_text(text: str, keep_punctuation_exact_string: str | None = None) -> str:
    """Lower-case, drop punctuation (optionally keeping one exact substring) and squash spaces."""
    text = text.replace("_", " ")
    if keep_punctuation_exact_string:
        parts = text.split(keep_punctuation_exact_string)
        text = keep_punctuation_exact_string.join(p.translate(_PUNCTUATION) for p in parts)
    else:
        text = text.translate(_PUNCTUATION)
    return _squash_whitespace(text.lower())


CLEAN_FUNCTIONS = {
    "canonicalize": lambda text: canonicalize_text(_fix_text(text)),
    "lower": lambda text: _squash_whitespace(_fix_text(text)).lower(),
    "whitespace": lambda text: _squash_whitespace(_fix_text(text)),
}


def _check_context_length(value) -> int:
    if isinstance(value, bool):
        raise TypeError(f"context_length must be an int, got {value!r}")
    try:
        value = operator.index(value)  # ints and numpy ints; not floats or strings
    except TypeError:
        raise TypeError(f"context_length must be an int, got {value!r}") from None
    if value < 1:
        raise ValueError(f"context_length must be >= 1, got {value}")
    return value


class PS3Tokenizer:
    """Texts -> ``LongTensor (N, context_length)`` of token ids, padded/truncated to length.

    ``tokenizer_name`` is anything ``AutoTokenizer.from_pretrained`` accepts (a hub id or a
    local folder), or a ready Hugging Face tokenizer object (one built in memory, so nothing
    is read or downloaded; such a tokenizer has no name to ``save_pretrained``). Extra
    keyword arguments are kept only so ``save_pretrained`` writes them back, as upstream does.
    """

    def __init__(
        self,
        tokenizer_name: str | os.PathLike | PreTrainedTokenizerBase,
        context_length: int | None = DEFAULT_CONTEXT_LENGTH,
        clean: str = "whitespace",
        strip_sep_token: bool = False,
        language: str | None = None,
        **kwargs,
    ):
        from transformers import AutoTokenizer

        if clean not in CLEAN_FUNCTIONS:
            raise ValueError(f"clean must be one of {sorted(CLEAN_FUNCTIONS)}, got {clean!r}")
        named = isinstance(tokenizer_name, (str, os.PathLike))
        if not named and not isinstance(tokenizer_name, PreTrainedTokenizerBase):
            raise TypeError(f"tokenizer_name must be a name, a folder or a Hugging Face tokenizer, got {type(tokenizer_name).__name__}")
        if context_length is not None:
            _check_context_length(context_length)
        self.init_kwargs = dict(
            tokenizer_name=os.fspath(tokenizer_name) if named else tokenizer_name,
            context_length=context_length,
            clean=clean,
            strip_sep_token=strip_sep_token,
            language=language,
            **kwargs,
        )
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_name) if named else tokenizer_name
        self.context_length = context_length
        self.clean = clean
        self.clean_fn = CLEAN_FUNCTIONS[clean]
        self.strip_sep_token = strip_sep_token
        if language is not None:
            self.set_language(language)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "PS3Tokenizer":
        """Rebuild from a folder (or hub repo) holding the ``tokenizer_config.json`` we write.

        ``kwargs`` override the stored values. Hub repos need ``huggingface_hub`` and network
        access; local folders work offline.
        """
        path = os.fspath(pretrained_model_name_or_path)
        config_file = os.path.join(path, TOKENIZER_CONFIG_NAME)
        if not os.path.isdir(path):
            from huggingface_hub import hf_hub_download

            config_file = hf_hub_download(path, TOKENIZER_CONFIG_NAME)
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        if "tokenizer_name" not in config and "tokenizer_name" not in kwargs:
            raise ValueError(f"{config_file} has no 'tokenizer_name'; it was not written by PS3Tokenizer")
        config.update(kwargs)
        return cls(**config)

    def save_pretrained(self, save_directory: str | os.PathLike) -> list[str]:
        """Write the constructor arguments to ``tokenizer_config.json`` (upstream's format)."""
        if not isinstance(self.init_kwargs["tokenizer_name"], str):
            raise ValueError("this PS3Tokenizer wraps a tokenizer object, not a named one; it has no tokenizer_name to save")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, TOKENIZER_CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.init_kwargs, f)
        return [path]

    def set_language(self, src_lang: str) -> None:
        """Select the source language on multilingual tokenizers (e.g. XLM-R style); warn elsewhere."""
        setter = getattr(self.tokenizer, "set_src_lang_special_tokens", None)
        if callable(setter):
            setter(src_lang)
        else:
            warnings.warn("Cannot set language for the tokenizer.")

    def __call__(self, texts: str | list[str], context_length: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a string or a list of strings")
        if not texts:
            raise ValueError("texts is an empty list; give at least one string")
        if context_length is None or (type(context_length) is int and context_length == 0):  # upstream's `or`
            context_length = self.context_length
        if context_length is None:
            raise ValueError("context_length must be a positive int, set at construction or per call")
        context_length = _check_context_length(context_length)
        input_ids = self.tokenizer(
            [self.clean_fn(t) for t in texts],
            return_tensors="pt",
            max_length=context_length,
            padding="max_length",
            truncation=True,
        ).input_ids
        if self.strip_sep_token:
            sep = self.tokenizer.sep_token_id
            input_ids = input_ids.masked_fill(input_ids == sep, 0) if sep is not None else input_ids
        return input_ids

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.init_kwargs.items())
        return f"{type(self).__name__}({args})"
