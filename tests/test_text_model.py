"""Text tower: parity with upstream fixtures, mask semantics, input validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ps3.configuration_ps3 import PS3TextConfig
from ps3.text_transformer import PS3TextModelOutput, TextTransformer

UPSTREAM = Path(__file__).parent / "fixtures" / "upstream"
MODEL_DIR = UPSTREAM / "models" / "text"
PREFIX = "text_model."


def require(path: Path) -> Path:
    """Fail (not skip) when a fixture is missing: parity is the point of these tests."""
    if not path.exists():
        pytest.fail(f"missing upstream fixture {path}; regenerate tests/fixtures/upstream with upstream PS3")
    return path


def load_upstream_text_model(folder: Path = MODEL_DIR) -> TextTransformer:
    """Build a TextTransformer from an upstream ``PS3TextModel.save_pretrained`` folder."""
    config = json.loads(require(folder / "config.json").read_text())
    model = TextTransformer(PS3TextConfig(**config))
    state = load_file(require(folder / "model.safetensors"))
    stripped = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    assert len(stripped) == len(state), f"keys without {PREFIX!r}: {sorted(set(state) - set(PREFIX + k for k in stripped))}"
    model.load_state_dict(stripped, strict=True)
    return model.eval()


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def tiny_config(**overrides) -> PS3TextConfig:
    kwargs = dict(output_dim=24, prompt_proj_dim=20, context_length=12, vocab_size=64, width=32, heads=4, layers=2)
    kwargs.update(overrides)
    return PS3TextConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> TextTransformer:
    torch.manual_seed(seed)
    return TextTransformer(tiny_config(**overrides)).eval()


def sample_text(batch: int = 3, length: int = 12, seed: int = 1) -> torch.Tensor:
    """CLIP-like ids: random tokens, an end-of-text id (the largest) then padding (0)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 62, (batch, length), generator=g)
    for row, eot in enumerate(torch.randint(2, length, (batch,), generator=g).tolist()):
        text[row, eot] = 63
        text[row, eot + 1 :] = 0
    return text


# ---------------------------------------------------------------- upstream parity


def test_upstream_text_parity():
    case = UPSTREAM / "cases" / "text"
    tensors = load_file(require(case.with_suffix(".safetensors")))
    model = load_upstream_text_model()
    with torch.no_grad():
        out = model(tensors["in.text"])
    for name in ("pooled_output", "prompt"):
        expected = tensors[f"out.{name}"]
        assert out[name].shape == expected.shape, name
        err = rel_err(out[name], expected)
        assert err <= 1e-5, f"{name}: relative error {err:.3g}"


def test_upstream_checkpoint_keys_match_exactly():
    state = load_file(require(MODEL_DIR / "model.safetensors"))
    model = load_upstream_text_model()
    ours = {PREFIX + k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in state.items()}


# ---------------------------------------------------------------- structure


@pytest.mark.parametrize(
    "overrides, extra_keys",
    [
        ({}, {"text_projection"}),
        ({"proj_bias": True}, {"text_projection.weight", "text_projection.bias"}),
        ({"embed_cls": True}, {"cls_emb", "text_projection"}),
        ({"ls_init_value": 0.1}, {"text_projection", "transformer.resblocks.0.ls_1.gamma", "transformer.resblocks.0.ls_2.gamma"}),
    ],
)
def test_parameter_names(overrides, extra_keys):
    keys = set(tiny_model(**overrides).state_dict())
    assert extra_keys <= keys
    block = {k for k in keys if k.startswith("transformer.resblocks.1.")}
    expected_block = {
        f"transformer.resblocks.1.{k}"
        for k in (
            "ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias",
            "attn.out_proj.weight", "attn.out_proj.bias", "ln_2.weight", "ln_2.bias",
            "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
        )
    }
    if "ls_init_value" in overrides:
        expected_block |= {"transformer.resblocks.1.ls_1.gamma", "transformer.resblocks.1.ls_2.gamma"}
    assert block == expected_block
    assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "prompt_proj.fc1.weight",
            "prompt_proj.norm.weight", "prompt_proj.fc2.weight"} <= keys
    assert not any("attn_mask" in k for k in keys)


def test_shapes_and_output_access():
    model = tiny_model(embed_cls=True)
    assert model.positional_embedding.shape == (13, 32)
    out = model(sample_text())
    assert isinstance(out, PS3TextModelOutput)
    assert out.pooled_output.shape == (3, 24) and out.prompt.shape == (3, 20)
    assert out[0] is out.pooled_output and out["prompt"] is out.prompt
    assert len(out.to_tuple()) == 2


def test_pool_none_keeps_tokens():
    out = tiny_model(pool_type="none")(sample_text())
    assert out.pooled_output.shape == (3, 12, 24) and out.prompt.shape == (3, 12, 20)


def test_prompt_is_projection_of_normalised_pooled():
    model = tiny_model()
    out = model(sample_text())
    expected = model.prompt_proj(torch.nn.functional.normalize(out.pooled_output, dim=-1))
    torch.testing.assert_close(out.prompt, expected)


# ---------------------------------------------------------------- mask semantics


def test_causal_first_pool_ignores_later_tokens():
    model = tiny_model(pool_type="first")
    text = sample_text()
    changed = text.clone()
    changed[:, 1:] = torch.randint(1, 64, changed[:, 1:].shape)
    torch.testing.assert_close(model(text).pooled_output, model(changed).pooled_output, rtol=0, atol=1e-6)


def test_no_causal_mask_lets_first_token_see_everything():
    model = tiny_model(pool_type="first", no_causal_mask=True)
    text = sample_text()
    changed = text.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 64
    assert not torch.allclose(model(text).pooled_output, model(changed).pooled_output)


def test_argmax_pool_ignores_tokens_after_end_of_text():
    model = tiny_model()
    text = sample_text()
    changed = text.clone()
    eot = text.argmax(dim=-1)
    for row in range(text.shape[0]):
        changed[row, eot[row] + 1 :] = 5  # still below the end-of-text id
    torch.testing.assert_close(model(text).pooled_output, model(changed).pooled_output, rtol=0, atol=1e-6)


def test_argmax_pool_follows_the_largest_id():
    model = tiny_model()
    text = torch.tensor([[10, 20, 63, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    other = text.clone()
    other[0, 1] = 63  # end-of-text moves earlier: pooled token changes
    assert not torch.allclose(model(text).pooled_output, model(other).pooled_output)


def test_shorter_text_equals_prefix_of_full_context():
    """Upstream needs exactly context_length columns; causality makes a prefix equivalent."""
    model = tiny_model()
    text = torch.tensor([[7, 8, 63, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(model(text[:, :4]).pooled_output, model(text).pooled_output, rtol=0, atol=1e-6)


def test_cls_token_sees_only_non_pad_keys():
    """The class token's padding mask hides keys j >= 1 whose token j-1 is padding (open_clip's
    shifted mask), so perturbing those positions leaves the pooled output unchanged."""
    model = tiny_model(embed_cls=True, pad_id=0)
    text = torch.tensor([[9, 10, 11, 63, 0, 0, 0, 0, 0, 0, 0, 0]])  # keys 5..12 hidden from the cls row
    base = model(text).pooled_output

    def perturbed(rows):
        with torch.no_grad():
            saved = model.positional_embedding.clone()
            model.positional_embedding[rows] += 1.0
            out = model(text).pooled_output
            model.positional_embedding.copy_(saved)
        return out

    torch.testing.assert_close(perturbed(slice(5, 12)), base, rtol=0, atol=1e-6)
    assert not torch.allclose(perturbed(slice(4, 5)), base)  # key 4 (a pad token) is visible
    full = torch.tensor([[9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 63]])  # no padding: all visible
    before = model(full).pooled_output
    with torch.no_grad():
        model.positional_embedding[5:12] += 1.0
    assert not torch.allclose(model(full).pooled_output, before)


def test_cls_mask_matches_explicit_construction():
    model = tiny_model(embed_cls=True)
    text = sample_text()
    mask = model._attention_mask(text, 13, torch.float32)
    assert mask.shape == (3, 1, 13, 13)
    causal = torch.full((13, 13), float("-inf")).triu(1)
    torch.testing.assert_close(mask[:, 0, :-1], causal[:-1].expand(3, -1, -1))
    visible = torch.cat([torch.ones(3, 1, dtype=torch.bool), text != 0], dim=1)
    assert torch.equal(torch.isinf(mask[:, 0, -1]), ~visible)


def test_no_causal_mask_with_cls_uses_no_mask_like_upstream():
    model = tiny_model(embed_cls=True, no_causal_mask=True)
    assert model._attention_mask(sample_text(), 13, torch.float32) is None


# ---------------------------------------------------------------- dtype, training helpers


def test_bfloat16_runs_and_stays_close():
    model = tiny_model()
    text = sample_text()
    ref = model(text).pooled_output
    out = model.to(torch.bfloat16)(text).pooled_output
    assert out.dtype == torch.bfloat16
    assert rel_err(out.float(), ref) < 5e-2


def test_grad_checkpointing_same_result():
    model = tiny_model().train()
    text = sample_text()
    ref = model(text).prompt.sum()
    ref.backward()
    grad = model.token_embedding.weight.grad.clone()
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out = model(text).prompt.sum()
    out.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(model.token_embedding.weight.grad, grad)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "bad, error",
    [
        ([[1, 2, 3]], TypeError),
        (torch.zeros(2, 5), TypeError),
        (torch.zeros(2, 5, dtype=torch.bool), TypeError),
        (torch.zeros(5, dtype=torch.long), ValueError),
        (torch.zeros(1, 2, 5, dtype=torch.long), ValueError),
        (torch.zeros(2, 13, dtype=torch.long), ValueError),
        (torch.zeros(2, 0, dtype=torch.long), ValueError),
        (torch.full((2, 5), 64), ValueError),
        (torch.full((2, 5), -1), ValueError),
    ],
)
def test_bad_text_raises(bad, error):
    with pytest.raises(error, match="text"):
        tiny_model()(bad)


def test_bad_pool_type_raises():
    with pytest.raises(ValueError, match="pool_type"):
        TextTransformer(tiny_config(pool_type="mean"))


def test_int32_ids_accepted():
    model = tiny_model()
    text = sample_text()
    torch.testing.assert_close(model(text.int()).pooled_output, model(text).pooled_output)
