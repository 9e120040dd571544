"""The models the command-line tools run: a small random built-in PS3 (vision tower, text
tower and an in-memory tokenizer, so everything works offline), or a checkpoint folder.

The built-in vision tower has real PS3-1.5K geometry (scales 378/756/1512, patch 14 and
upstream's default budget of 1280 high-res tokens per look); only the trunk is tiny, so token
counts and selection geometry are the real ones. Its weights are random: what it selects
shows the mechanics, not meaning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from .configuration_ps3 import PS3TextConfig, PS3VisionConfig
from .image_processing_ps3 import PS3ImageProcessor
from .modeling_ps3 import PS3TextModel, PS3VisionModel
from .tokenization_ps3 import TOKENIZER_CONFIG_NAME, PS3Tokenizer

DEMO_CONTEXT_LENGTH = 64


def demo_config(**overrides) -> PS3VisionConfig:
    kwargs = dict(
        model_name="ps3_demo_tiny", hidden_size=64, depth=4, num_heads=2, mlp_ratio=2.0, patch_size=14,
        ps3_scales=[378, 756, 1512], select_based_on_layer=[0, 1, 2, 3], max_select_num=1280,
        highres_selection_module_hidden_dim=16, highres_selection_module_out_dim=16, highres_selection_module_depth=1,
    )
    kwargs.update(overrides)
    return PS3VisionConfig(**kwargs)


def randomize_parameters_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for every parameter, drawn on the parameter's device.

    Upstream zero-inits several parameters, which would hide whole paths in tests; here
    1-D weights (norms, layer scales) are ``N(1, 0.1)`` and everything else ``N(0, fan_in^-1/2)``.
    """
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = generators.setdefault(p.device, torch.Generator(device=p.device).manual_seed(seed))
            if name.endswith(".weight") and p.dim() == 1:
                p.normal_(1.0, 0.1, generator=gen)
            else:
                fan_in = p[0].numel() if p.dim() > 1 else p.numel()
                p.normal_(0.0, fan_in**-0.5, generator=gen)
    return model


def demo_model(seed: int = 0, **overrides) -> PS3VisionModel:
    """The demo config with deterministic random weights."""
    return randomize_parameters_(PS3VisionModel(demo_config(**overrides)), seed).eval()


def demo_tokenizer(context_length: int = DEMO_CONTEXT_LENGTH) -> PS3Tokenizer:
    """A byte-level tokenizer built in memory (no file, no download): one id per UTF-8 byte,
    0 = padding, and an end-of-text id that is the largest, as the text tower's argmax
    pooling expects."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(alphabet)}}
    eot = vocab.setdefault("<eot>", len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.post_processor = processors.TemplateProcessing(single="$A <eot>", special_tokens=[("<eot>", eot)])
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eot>")
    return PS3Tokenizer(hf, context_length=context_length)


def demo_text_config(**overrides) -> PS3TextConfig:
    """A tiny text tower whose prompt fits :func:`demo_config`'s width, over :func:`demo_tokenizer`'s ids."""
    kwargs = dict(
        output_dim=64, prompt_proj_dim=demo_config().hidden_size, context_length=DEMO_CONTEXT_LENGTH,
        vocab_size=258, width=64, heads=2, layers=2,
    )
    kwargs.update(overrides)
    return PS3TextConfig(**kwargs)


def demo_text_model(seed: int = 1, **overrides) -> PS3TextModel:
    """The demo text config with deterministic random weights."""
    return randomize_parameters_(PS3TextModel(demo_text_config(**overrides)), seed).eval()


def image_processor(folder: str | os.PathLike | None, scales: Sequence[int]) -> PS3ImageProcessor:
    """The checkpoint's processor (mean, std, filter) when its folder has one (a hub id is asked
    for one), else PS3's defaults at the largest of the model's ``scales``."""
    if folder is not None and ((Path(folder) / "preprocessor_config.json").is_file() or not Path(folder).exists()):
        return PS3ImageProcessor.from_pretrained(folder)
    return PS3ImageProcessor(image_size=scales[-1])


class PS3Towers(NamedTuple):
    """What :func:`load_towers` returns; unpacks as ``vision, text, tokenizer``."""

    vision: PS3VisionModel
    text: PS3TextModel | None
    tokenizer: PS3Tokenizer | None


def _model_type(folder: Path) -> str:
    config = folder / "config.json"
    if not folder.is_dir():
        raise OSError(f"{folder} is not a folder")
    if not config.is_file():
        raise OSError(f"{folder} has no config.json, so it is not a PS3 checkpoint folder")
    try:
        return json.loads(config.read_text()).get("model_type", "")
    except (ValueError, AttributeError) as err:
        raise OSError(f"{config} is not a JSON object ({err})") from None


def load_towers(
    folder: str | os.PathLike | None = None,
    text_folder: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float32,
    with_text: bool = True,
) -> PS3Towers:
    """The vision tower, text tower and tokenizer of the built-in model (``folder=None``) or
    of a checkpoint folder, in eval mode on the CPU.

    A combined checkpoint (``model_type`` ``ps3``, as released) holds both towers. A vision
    checkpoint (``ps3_vision_model``) has no text tower unless ``text_folder`` names one (a
    ``ps3_text_model`` or ``ps3`` folder). The tokenizer is read from the text tower's folder
    (a ``tokenizer_config.json`` written by :class:`PS3Tokenizer`); ``text`` and
    ``tokenizer`` are None where there is none. Raises ``OSError`` for a folder that is not
    a checkpoint and ``ValueError`` for one of the wrong kind. ``with_text=False`` loads the
    vision tower alone (``text`` and ``tokenizer`` None).
    """
    if folder is None and text_folder is not None:
        raise ValueError("text_folder needs a vision checkpoint folder too (the built-in model has its own text tower)")
    if folder is None:
        if not with_text:
            return PS3Towers(demo_model().to(dtype), None, None)
        return PS3Towers(demo_model().to(dtype), demo_text_model().to(dtype), demo_tokenizer())
    folder = Path(folder)
    kind = _model_type(folder)
    if kind not in ("ps3", "ps3_vision_model"):
        raise ValueError(f"{folder} holds a {kind or 'non-PS3'} model, not a PS3 vision or combined (ps3) checkpoint")
    vision = PS3VisionModel.from_pretrained(folder, dtype=dtype).eval()
    text_source = Path(text_folder) if text_folder is not None else folder if kind == "ps3" else None
    if text_source is None or not with_text:
        return PS3Towers(vision, None, None)
    if text_folder is not None and _model_type(text_source) not in ("ps3", "ps3_text_model"):
        raise ValueError(f"{text_source} holds no PS3 text tower (model_type ps3_text_model or ps3)")
    text = PS3TextModel.from_pretrained(text_source, dtype=dtype).eval()
    if text.config.prompt_proj_dim != vision.config.hidden_size:
        raise ValueError(
            f"the text tower of {text_source} makes {text.config.prompt_proj_dim}-wide prompts but the vision tower of "
            f"{folder} is {vision.config.hidden_size} wide"
        )
    tokenizer_config = text_source / TOKENIZER_CONFIG_NAME
    has_tokenizer = tokenizer_config.is_file() and "tokenizer_name" in json.loads(tokenizer_config.read_text())
    return PS3Towers(vision, text, PS3Tokenizer.from_pretrained(text_source) if has_tokenizer else None)
