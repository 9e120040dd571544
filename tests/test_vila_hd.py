"""VILA-HD pieces: VILA's projector names, the batched high-res path, knobs, the two-pass driver,
the PS3 vision tower and the checkpoint-folder loader (all offline, tiny random modules)."""

from __future__ import annotations

import json
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

from ps3 import PS3ImageProcessor, PS3VisionConfig, PS3VisionModel
from ps3.demo import randomize_parameters_
from ps3.vila_hd import (
    IMAGE_TOKEN_INDEX,
    LookCloseSettings,
    TokenDownsample,
    VilaHDPipeline,
    VilaHDProjector,
    downsample_tokens,
    first_n_scales_for_sizes,
    parse_look_close_env,
    resolve_look_close_settings,
    tokenize_with_images,
)
from ps3.vision_tower import PS3VisionTower, load_vila_hd
from ps3_kernels import use_backend

from helpers import rel_err, tiny_vision_config

C, D, L, SCALES = 64, 32, 16, 3  # tiny PS3 width, LLM width, low-res tokens (4x4), PS3 scales


# Parameter names and shapes as VILA's MultimodalProjector builds them
# (llava/model/multimodal_projector/base_projector.py), for mm_hidden_size=C, hidden_size=D.
VILA_2X2 = {
    "layers.1.weight": (4 * C,), "layers.1.bias": (4 * C,),
    "layers.2.weight": (D, 4 * C), "layers.2.bias": (D,),
    "layers.4.weight": (D, D), "layers.4.bias": (D,),
}
VILA_3X3 = {
    "layers.1.weight": (9 * C,), "layers.1.bias": (9 * C,),
    "layers.2.weight": (3 * C, 9 * C), "layers.2.bias": (3 * C,),
    "layers.4.weight": (3 * C,), "layers.4.bias": (3 * C,),
    "layers.5.weight": (D, 3 * C), "layers.5.bias": (D,),
    "layers.7.weight": (D, D), "layers.7.bias": (D,),
}
VILA_LINEAR_HEAD = {"top_down_prompt_head.weight": (C, D), "top_down_prompt_head.bias": (C,)}
VILA_MLP_HEAD = {  # timm Mlp(in=D, hidden=2C, out=C, norm_layer=LayerNorm)
    "top_down_prompt_head.fc1.weight": (2 * C, D), "top_down_prompt_head.fc1.bias": (2 * C,),
    "top_down_prompt_head.norm.weight": (2 * C,), "top_down_prompt_head.norm.bias": (2 * C,),
    "top_down_prompt_head.fc2.weight": (C, 2 * C), "top_down_prompt_head.fc2.bias": (C,),
}
VILA_EMBEDS = {"high_res_pos_embed": (1, L, D), **{f"high_res_scale_embed.{i}": (1, 1, D) for i in range(SCALES)}}


def shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def random_projector(kind="mlp_downsample_2x2_fix", head="mlp", seed=0, dtype=torch.float32) -> VilaHDProjector:
    proj = VilaHDProjector(kind, C, D, head, L, SCALES)
    return randomize_parameters_(proj, seed).to(dtype).eval()


@pytest.fixture(scope="module")
def ps3_model():
    return randomize_parameters_(PS3VisionModel(tiny_vision_config()), seed=3).eval()


@pytest.fixture(scope="module")
def tower(ps3_model):
    return PS3VisionTower(ps3_model)


def tiny_llm(seed=0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=D, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llm():
    return tiny_llm()


def pixels(n, size=224, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ----- projector -----


@pytest.mark.parametrize("kind, layers", [
    ("mlp_downsample", VILA_2X2), ("mlp_downsample_2x2_fix", VILA_2X2), ("mlp_downsample_3x3_fix", VILA_3X3),
])
@pytest.mark.parametrize("head, head_names", [("linear", VILA_LINEAR_HEAD), ("mlp", VILA_MLP_HEAD), (None, {})])
def test_projector_names_and_shapes_match_vila(kind, layers, head, head_names):
    proj = VilaHDProjector(kind, C, D, head, L, SCALES)
    assert shapes(proj) == {**layers, **head_names, **VILA_EMBEDS}
    assert shapes(VilaHDProjector(kind, C, D, head)) == {**layers, **head_names}


def test_from_vila_config_follows_vilas_conditions():
    base = dict(hidden_size=D, mm_hidden_size=C, ps3=True, look_close_mode="after_prompt", top_down_prompt_head_type="mlp",
                high_res_pos_embed=True, mm_low_res_token_num=L, mm_scale_num=SCALES)
    full = VilaHDProjector.from_vila_config("mlp_downsample_2x2_fix", base)
    assert shapes(full) == {**VILA_2X2, **VILA_MLP_HEAD, **VILA_EMBEDS}
    after_image = VilaHDProjector.from_vila_config("mlp_downsample_2x2_fix", dict(base, look_close_mode="after_image"))
    assert shapes(after_image) == {**VILA_2X2, **VILA_EMBEDS}
    no_embed = VilaHDProjector.from_vila_config("mlp_downsample_2x2_fix", dict(base, high_res_pos_embed=False, top_down_prompt_head_type=None))
    assert shapes(no_embed) == {**VILA_2X2, **VILA_LINEAR_HEAD}  # VILA's default head type is linear
    assert shapes(VilaHDProjector.from_vila_config("mlp_downsample", dict(base, ps3=False))) == VILA_2X2
    with pytest.raises(ValueError, match="mm_projector_type"):
        VilaHDProjector("mlp2x_gelu", C, D)
    with pytest.raises(ValueError, match="top_down_prompt_head_type"):
        VilaHDProjector("mlp_downsample", C, D, "conv")
    with pytest.raises(ValueError, match="hidden_size"):
        VilaHDProjector.from_vila_config("mlp_downsample", {"mm_hidden_size": C})
    with pytest.raises(ValueError, match="top_down_prompt_head"):
        after_image(torch.zeros(1, D), forward_top_down_prompt_head=True)


def naive_downsample(x: torch.Tensor, r: int) -> torch.Tensor:
    B, H, W, Cx = x.shape
    Ho, Wo = math.ceil(H / r), math.ceil(W / r)
    out = torch.zeros(B, Ho, Wo, r * r * Cx, dtype=x.dtype)
    for i in range(Ho):
        for j in range(Wo):
            parts = []
            for a in range(r):
                for b in range(r):
                    y, z = r * i + a, r * j + b
                    parts.append(x[:, y, z] if y < H and z < W else torch.zeros(B, Cx, dtype=x.dtype))
            out[:, i, j] = torch.cat(parts, dim=-1)
    return out


@pytest.mark.parametrize("r", [2, 3])
@pytest.mark.parametrize("hw", [(6, 6), (5, 7), (27, 27)])
def test_downsample_matches_naive(r, hw):
    x = torch.randn(2, *hw, 5)
    assert torch.equal(downsample_tokens(x, r), naive_downsample(x, r))
    tokens = x.flatten(1, 2)
    ref = naive_downsample(x, r).flatten(1, 2)
    assert torch.equal(TokenDownsample(r)(tokens, feature_size=hw), ref)
    if hw[0] == hw[1]:
        assert torch.equal(TokenDownsample(r)(tokens), ref)  # VILA's square-grid call
    else:
        with pytest.raises(ValueError, match="square"):
            TokenDownsample(r)(tokens)


def reference_embed(proj: VilaHDProjector, features: list[torch.Tensor], maps: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Per image and per scale, the way VILA writes it: dense zero map, full projector on every
    token, area-resized position embedding, keep where the area-resized mask equals 1."""
    r = proj.downsample_rate
    pe_grid = proj.high_res_pos_embed.reshape(1, 4, 4, D).permute(0, 3, 1, 2)
    out = []
    for f, img_maps in zip(features, maps):
        low = proj(f[None, :L])[0] + F.interpolate(pe_grid, size=(2, 2), mode="area")[0].flatten(1).t() + proj.high_res_scale_embed[0][0]
        rest, kept = f[L:], []
        for s, m in enumerate(img_maps):
            S = max(m.shape)
            mask = torch.zeros(S, S, dtype=torch.bool)
            mask[: m.shape[0], : m.shape[1]] = m.bool()
            n = int(mask.sum())
            dense = torch.zeros(S * S, C, dtype=f.dtype)
            dense[mask.flatten()] = rest[:n]
            rest = rest[n:]
            side = math.ceil(S / r)
            tokens = proj(dense[None])[0]
            tokens = tokens + F.interpolate(pe_grid, size=(side, side), mode="area")[0].flatten(1).t() + proj.high_res_scale_embed[s + 1][0]
            keep = F.interpolate(mask[None, None].float(), size=(side, side), mode="area").flatten() == 1
            kept.append(tokens[keep])
        assert rest.shape[0] == 0
        high = torch.cat(kept)
        out.append(torch.cat([low, high if high.shape[0] else low[:1]]))
    return out


def random_mask(h, w, gen, blocks=3, singles=5, r=2):
    m = torch.zeros(h, w)
    for _ in range(blocks):
        i = int(torch.randint(0, h // r, (1,), generator=gen)) * r
        j = int(torch.randint(0, w // r, (1,), generator=gen)) * r
        m[i : i + r, j : j + r] = 1
    idx = torch.randint(0, h * w, (singles,), generator=gen)
    m.view(-1)[idx] = 1
    return m


@pytest.mark.parametrize("kind", ["mlp_downsample_2x2_fix", "mlp_downsample_3x3_fix"])
def test_high_res_path_matches_per_image_loop(kind):
    gen = torch.Generator().manual_seed(0)
    proj = random_projector(kind, dtype=torch.float64)
    r = proj.downsample_rate
    sizes = [[(8, 8), (16, 16)], [(8, 6), (16, 12)], [(8, 8), (16, 16)], [(8, 8), (16, 16)]]
    maps = [[random_mask(h, w, gen, r=r) for h, w in img] for img in sizes]
    maps[2] = [torch.zeros(8, 8), random_mask(16, 16, gen, blocks=0, singles=1)]  # keeps nothing: fallback token
    maps[3] = [torch.ones(8, 8), torch.ones(16, 16)]
    feats = [torch.randn(L + int(sum(m.sum() for m in img)), C, generator=gen, dtype=torch.float64) for img in maps]
    ref = reference_embed(proj, feats, maps)

    # PS3's per-image-list layout: features (1, N_i, C), maps per image of (1, h, w).
    got = proj.embed_ps3_features([f[None] for f in feats], [[m[None] for m in img] for img in maps], L)
    assert [g.shape for g in got] == [x.shape for x in ref]
    for g, x in zip(got, ref):
        assert rel_err(g, x) < 1e-12
    assert got[2].shape[0] == 4 + 1  # 2x2 low-res tokens, then the fallback token
    assert got[3].shape[0] == 4 + math.ceil(8 / r) ** 2 + math.ceil(16 / r) ** 2  # everything selected: all kept

    # PS3's batched layout: features (B, N, C), maps per scale (B, h, w); equal counts needed.
    same = [maps[0], maps[0]]
    feats2 = torch.randn(2, feats[0].shape[0], C, generator=gen, dtype=torch.float64)
    got = proj.embed_ps3_features(feats2, [torch.stack([img[s] for img in same]) for s in range(2)], L)
    for g, x in zip(got, reference_embed(proj, list(feats2), same)):
        assert rel_err(g, x) < 1e-12


def test_high_res_path_rejects_mismatched_counts():
    proj = random_projector()
    maps = [torch.ones(1, 8, 8), torch.zeros(1, 16, 16)]
    with pytest.raises(ValueError, match="select"):
        proj.embed_ps3_features(torch.randn(1, L + 63, C), maps, L)
    with pytest.raises(TypeError):
        proj.embed_ps3_features("features", maps, L)


# ----- knobs -----


def test_env_parsing_mirrors_vila():
    env = {"NUM_LOOK_CLOSE": "3", "NUM_TOKEN_LOOK_CLOSE": "5000", "SELECT_NUM_EACH_SCALE": "512+2048",
           "LOOK_CLOSE_MODE": "after_image", "SMOOTH_SELECTION_PROB": "True"}
    assert parse_look_close_env(env) == dict(num_look_close=3, num_token_look_close=5000, select_num_each_scale=(512, 2048),
                                             look_close_mode="after_image", smooth_selection_prob=True)
    assert parse_look_close_env({}) == {}
    assert parse_look_close_env({"SMOOTH_SELECTION_PROB": "FALSE"}) == {"smooth_selection_prob": False}
    assert parse_look_close_env({"NUM_LOOK_CLOSE": "all"}) == {"num_look_close": "all"}
    for bad in ({"NUM_LOOK_CLOSE": "six"}, {"NUM_TOKEN_LOOK_CLOSE": ""}, {"SELECT_NUM_EACH_SCALE": "512,2048"},
                {"SMOOTH_SELECTION_PROB": "1"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            parse_look_close_env(bad)


def test_settings_precedence(monkeypatch):
    base = LookCloseSettings(num_look_close=6, look_close_mode="after_prompt")
    monkeypatch.setenv("NUM_LOOK_CLOSE", "2")
    monkeypatch.setenv("SMOOTH_SELECTION_PROB", "true")
    s = resolve_look_close_settings(base)
    assert (s.num_look_close, s.smooth_selection_prob, s.look_close_mode) == (2, True, "after_prompt")
    assert resolve_look_close_settings(base, num_look_close=4, smooth_selection_prob=False).num_look_close == 4
    assert resolve_look_close_settings(base, smooth_selection_prob=False).smooth_selection_prob is False
    # The token count wins over a look count, as in VILA, unless the look count is explicit.
    monkeypatch.setenv("NUM_TOKEN_LOOK_CLOSE", "100")
    assert resolve_look_close_settings(base).vision_kwargs() == {"num_look_close": None, "num_token_look_close": 100}
    assert resolve_look_close_settings(base, num_look_close=1).vision_kwargs() == {"num_look_close": 1, "num_token_look_close": None}
    assert resolve_look_close_settings(base, environ={}).num_look_close == 6  # explicit environment mapping
    monkeypatch.setenv("LOOK_CLOSE_MODE", "before_image")
    with pytest.raises(ValueError, match="look_close_mode"):
        resolve_look_close_settings(base)
    with pytest.raises(ValueError, match="not both"):
        resolve_look_close_settings(base, environ={}, num_look_close=1, num_token_look_close=5)
    with pytest.raises(TypeError, match="unknown"):
        resolve_look_close_settings(base, environ={}, num_looks=1)
    with pytest.raises(ValueError, match="num_look_close"):
        LookCloseSettings(num_look_close=-1)


def test_dynamic_aspect_ratio_rule():
    assert first_n_scales_for_sizes([378, 756, 1512, 3780], [(4000, 3000), (1000, 2000), (2646, 10)]) == [3, 2, 2]
    assert first_n_scales_for_sizes([378, 756, 1512], [(500, 500)]) == [2]


# ----- tower -----


def test_tower_attributes(ps3_model, tower):
    assert tower.is_loaded and tower.vision_tower is ps3_model
    assert tower.hidden_size == C and tower.config is ps3_model.config
    assert tower.dtype == torch.float32 and tower.device == torch.device("cpu")
    assert isinstance(tower.image_processor, PS3ImageProcessor)
    assert tower.num_hidden_layers_to_return == 2 and tower.select_layer == -2 and tower.select_feature == "cls_patch"
    assert tower.num_patches_per_side == 224 // 14 and tower.dummy_feature.shape == (1, C)
    tower.set_grad_checkpointing(True)
    assert tower.grad_checkpointing and ps3_model.vision_model.trunk.grad_checkpointing
    tower.set_grad_checkpointing(False)
    assert not ps3_model.vision_model.trunk.grad_checkpointing
    with pytest.raises(ValueError, match="num_hidden_layers_to_return"):
        tower.num_hidden_layers_to_return = 99
    with pytest.raises(ValueError, match="cls_patch"):
        PS3VisionTower(ps3_model, {"mm_vision_select_feature": "patch"})
    with pytest.raises(TypeError):
        PS3VisionTower(42)


def test_tower_forward_is_vilas(ps3_model, tower):
    x = pixels(2)
    prompt = torch.randn(2, C)
    with torch.no_grad(), use_backend("torch"):
        feats, maps, probs = tower(x, prompt, 2)
        ref = ps3_model(x, num_look_close=2, prompt=prompt)
        assert torch.equal(feats, ref.hidden_states[-2])
        assert all(torch.equal(a, b) for a, b in zip(maps, ref.selection_maps))
        feats, _, _ = tower(x, prompt, 1, 12)  # the token count replaces the look count
        assert feats.shape == (2, L + 12, C)
        low, maps, _ = tower(x.double(), None, 0)
        assert low.shape == (2, L, C) and low.dtype == torch.float64 and maps is None
        listed, maps, _ = tower([x[0], x[1, :, :, :180]], None, 1)
        assert isinstance(listed, list) and listed[1].shape[0] == 1 and maps[1][0].shape == (1, 8, 6)


# ----- two-pass driver -----


def make_pipeline(tower, llm, **kwargs) -> VilaHDPipeline:
    kwargs.setdefault("image_end_token_ids", [3])
    kwargs.setdefault("defaults", LookCloseSettings(num_look_close=2))
    return VilaHDPipeline(tower, random_projector(), llm, **kwargs)


@pytest.fixture(autouse=True)
def no_env(monkeypatch):
    for name in ("NUM_LOOK_CLOSE", "NUM_TOKEN_LOOK_CLOSE", "SELECT_NUM_EACH_SCALE", "LOOK_CLOSE_MODE", "SMOOTH_SELECTION_PROB"):
        monkeypatch.delenv(name, raising=False)


def manual_sequence(llm, ids: list[int], image_embeds: list[torch.Tensor]) -> torch.Tensor:
    """One row spliced by hand: text embeddings with each image's rows in place of its token."""
    emb, parts, k = llm.get_input_embeddings(), [], 0
    for t in ids:
        if t == IMAGE_TOKEN_INDEX:
            parts.append(image_embeds[k])
            k += 1
        else:
            parts.append(emb(torch.tensor([t])))
    return torch.cat(parts)


def test_two_passes_match_a_hand_built_reference(tower, llm):
    pipe = make_pipeline(tower, llm)
    ids = [5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9, 10]
    x = pixels(1, seed=1)
    end = llm.get_input_embeddings()(torch.tensor([3]))
    with torch.no_grad(), use_backend("torch"):
        # Pass 1 by hand: low-res tokens + "\n", LLM, last hidden state at the look-close token (9).
        low, _, _ = tower(x, None, 0)
        img = torch.cat([pipe.projector.embed_low_res(low)[0], end])
        seq = manual_sequence(llm, ids, [img])
        hidden = llm(inputs_embeds=seq[None], output_hidden_states=True).hidden_states[-1][0]
        at = 2 + img.shape[0] + 2
        ref_prompt = pipe.projector(hidden[at], forward_top_down_prompt_head=True)[None]
        prompt = pipe.top_down_prompts(x, torch.tensor([ids]), look_close_positions=torch.tensor([5]))
        assert rel_err(prompt, ref_prompt) < 1e-5

        # Pass 2 by hand: encode with that prompt, project, splice.
        inputs = pipe.prepare_inputs(x, torch.tensor([ids]), look_close_positions=torch.tensor([5]))
        assert rel_err(inputs.top_down_prompts, ref_prompt) < 1e-5
        feats, maps, _ = tower(x, inputs.top_down_prompts, 2)
        img = torch.cat([pipe.projector.embed_ps3_features(feats, maps, L)[0], end])
        ref = manual_sequence(llm, ids, [img])
        assert rel_err(inputs.inputs_embeds[0], ref) < 1e-5
        assert inputs.attention_mask.shape == (1, ref.shape[0]) and bool(inputs.attention_mask.all())
        assert [m.shape for m in inputs.selection_maps] == [(1, 8, 8), (1, 16, 16)]

        out = pipe.generate(x, torch.tensor([ids]), max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert out.shape == (1, 3)
        out, maps, probs = pipe.generate(x, torch.tensor([ids]), max_new_tokens=2, do_sample=False, return_selection_probs=True)
        assert maps is not None and len(probs) == 2


def test_batch_with_padding_and_several_images(tower, llm):
    pipe = make_pipeline(tower, llm)
    P = 0  # pad id
    rows = [[P, P, 5, IMAGE_TOKEN_INDEX, 7, 8], [IMAGE_TOKEN_INDEX, 6, IMAGE_TOKEN_INDEX, 9, 10, 11]]
    ids, mask = torch.tensor(rows), torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    x = pixels(3, seed=2)
    with torch.no_grad(), use_backend("torch"):
        prompts = pipe.top_down_prompts(x, ids, mask)
        assert prompts.shape == (3, C) and torch.equal(prompts[1], prompts[2])
        # Each row alone gives the same prompt (left padding is dropped and re-applied).
        alone = pipe.top_down_prompts(x[:1], ids[:1, 2:])
        assert rel_err(prompts[:1], alone) < 1e-5

        embeds = [torch.randn(n, D) for n in (4, 2, 3)]
        for side in ("left", "right"):
            pipe.padding_side = side
            out, new_mask, _ = pipe.splice(ids, mask, embeds)
            seqs = [manual_sequence(llm, [t for t, m in zip(r, mr) if m], e)
                    for r, mr, e in zip(rows, mask.tolist(), (embeds[:1], embeds[1:]))]
            for b, s in enumerate(seqs):
                got = out[b][new_mask[b].bool()]
                assert torch.equal(got, s)
                assert bool((out[b][~new_mask[b].bool()] == 0).all())
            assert bool(new_mask[0, -1] if side == "left" else new_mask[0, 0])
        pipe.padding_side = "left"
        with pytest.raises(ValueError, match="image tokens"):
            pipe.splice(ids, mask, embeds[:2])


def test_knobs_reach_the_encoder(tower, llm):
    pipe = make_pipeline(tower, llm)
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 7, 8]])
    x = pixels(1, seed=4)
    encoder = tower.vision_tower.vision_model
    saved = list(encoder.max_select_num_each_scale)
    calls = []
    hook = llm.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.no_grad(), use_backend("torch"):
            inputs = pipe.prepare_inputs(x, ids, look_close_mode="after_image", num_token_look_close=12)
            assert not calls and inputs.top_down_prompts is None
            assert sum(int(m.sum()) for m in inputs.selection_maps) == 12
            inputs = pipe.prepare_inputs(x, ids, num_look_close=1, select_num_each_scale=[8, 8])
            assert len(calls) == 1 and [int(m.sum()) for m in inputs.selection_maps] == [8, 8]
            assert encoder.max_select_num_each_scale == saved
            with pytest.raises(ValueError, match="select_num_each_scale"):
                pipe.prepare_inputs(x, ids, select_num_each_scale=[8])
            inputs = pipe.prepare_inputs(x, ids, num_look_close=0)  # low-res only, as VILA
            assert inputs.inputs_embeds.shape[1] == L // 4 + 1 + 2
    finally:
        hook.remove()


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<|im_start|>", "<|im_end|>", "\n", " ", "user", "assistant", "what", "is", "here?"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\s"), behavior="isolated")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[UNK]")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def test_chat_template_look_close_position(tower, llm):
    tok = tiny_tokenizer()
    ids = tokenize_with_images(tok, "what is here?")
    assert ids.tolist() == [[1, 5, 3, IMAGE_TOKEN_INDEX, 7, 4, 8, 4, 9, 2, 3, 1, 6, 3]]
    pipe = VilaHDPipeline(tower, random_projector(), llm, tok)
    assert pipe.image_end_token_ids == [3]  # VILA's "\n" after every image
    assert pipe.find_look_close_positions(ids).tolist() == [8]  # "here?", before "<|im_end|>\n<|im_start|>assistant"
    with pytest.raises(ValueError, match="image_end_token_ids"):
        VilaHDPipeline(tower, random_projector(), llm)  # would silently drop VILA's "\n" token
    no_template = VilaHDPipeline(tower, random_projector(), llm, image_end_token_ids=[])
    assert no_template.find_look_close_positions(ids).tolist() == [13] and no_template.image_end_token_ids == []
    with pytest.raises(TypeError, match="causal LM"):
        VilaHDPipeline(tower, random_projector(), torch.nn.Linear(2, 2))


# ----- checkpoint folder -----


def write_vila_hd_folder(root, ps3_model, llm, tok, projector_state, **config_overrides):
    """A folder in VILA's save layout, written without this library's loader in the loop."""
    ps3_model.save_pretrained(root / "vision_tower")
    PS3ImageProcessor(image_size=224).save_pretrained(root / "vision_tower")
    (root / "mm_projector").mkdir(parents=True)
    (root / "mm_projector" / "config.json").write_text(json.dumps(
        {"architectures": ["MultimodalProjector"], "model_type": "v2l_projector", "mm_projector_type": "mlp_downsample_2x2_fix"}))
    save_file(projector_state, str(root / "mm_projector" / "model.safetensors"))
    llm.save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    config = {
        "architectures": ["LlavaTopDownLlamaModel"], "model_type": "llava_topdown_llama",
        "llm_cfg": llm.config.to_dict(), "vision_tower_cfg": ps3_model.config.to_dict(),
        "mm_projector_cfg": {"mm_projector_type": "mlp_downsample_2x2_fix", "model_type": "v2l_projector"},
        "hidden_size": D, "mm_hidden_size": C, "model_dtype": "torch.float32", "ps3": True,
        "look_close_mode": "after_prompt", "num_look_close": 3, "num_token_look_close": None,
        "top_down_prompt_head_type": "mlp", "high_res_pos_embed": True, "mm_low_res_token_num": L, "mm_scale_num": SCALES,
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "cls_patch", "ps3_dynamic_aspect_ratio": False,
    }
    config.update(config_overrides)
    (root / "config.json").write_text(json.dumps(config))


def test_load_vila_hd_folder_round_trip(tmp_path, ps3_model, llm):
    gen = torch.Generator().manual_seed(7)
    state = {k: torch.randn(s, generator=gen) for k, s in {**VILA_2X2, **VILA_MLP_HEAD, **VILA_EMBEDS}.items()}
    write_vila_hd_folder(tmp_path / "ckpt", ps3_model, llm, tiny_tokenizer(), state)
    # transformers 5 re-reads a tokenizer saved next to a qwen2 config as Qwen2Tokenizer, which
    # this word-level test vocabulary is not: check it is found, then use the original.
    assert load_vila_hd(tmp_path / "ckpt").tokenizer is not None
    pipe = load_vila_hd(tmp_path / "ckpt", tokenizer=tiny_tokenizer())

    got = pipe.projector.state_dict()
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    ref = ps3_model.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in pipe.vision_tower.vision_tower.state_dict().items())
    assert all(torch.equal(v, llm.state_dict()[k]) for k, v in pipe.llm.state_dict().items())
    assert pipe.defaults.num_look_close == 3 and pipe.defaults.look_close_mode == "after_prompt"
    assert pipe.image_end_token_ids == [3]
    assert pipe.vision_tower.num_hidden_layers_to_return == 2
    ids = tokenize_with_images(pipe.tokenizer, "what is here?")
    with torch.no_grad(), use_backend("torch"):
        inputs = pipe.prepare_inputs(pixels(1), ids, num_look_close=1)
    assert inputs.inputs_embeds.shape[0] == 1 and inputs.top_down_prompts.shape == (1, C)

    lazy = PS3VisionTower(tmp_path / "ckpt" / "vision_tower", {"mm_vision_select_layer": -1}, delay_load=True)
    assert not lazy.is_loaded and isinstance(lazy.config, PS3VisionConfig) and lazy.hidden_size == C
    lazy.load_model()
    assert lazy.is_loaded and lazy.select_layer == -1 and isinstance(lazy.image_processor, PS3ImageProcessor)


def test_load_vila_hd_rejects_mismatches(tmp_path, ps3_model, llm):
    state = {k: torch.zeros(s) for k, s in {**VILA_2X2, **VILA_LINEAR_HEAD}.items()}
    write_vila_hd_folder(tmp_path / "a", ps3_model, llm, tiny_tokenizer(), state, high_res_pos_embed=False)
    with pytest.raises(ValueError, match="missing"):  # config says mlp head, weights hold a linear one
        load_vila_hd(tmp_path / "a", llm=llm)
    write_vila_hd_folder(tmp_path / "b", ps3_model, llm, tiny_tokenizer(), state, ps3=False)
    with pytest.raises(ValueError, match="ps3"):
        load_vila_hd(tmp_path / "b", llm=llm)
    wrong = dict(state)
    wrong["layers.2.weight"] = torch.zeros(wrong["layers.2.weight"].shape[0] + 1, *wrong["layers.2.weight"].shape[1:])
    write_vila_hd_folder(tmp_path / "c", ps3_model, llm, tiny_tokenizer(), wrong, high_res_pos_embed=False,
                         top_down_prompt_head_type="linear")
    with pytest.raises(ValueError, match="shape mismatches"):
        load_vila_hd(tmp_path / "c", llm=llm)
    with pytest.raises(FileNotFoundError):
        load_vila_hd(tmp_path / "nothing")


# ----- per-call quotas -----


def test_encoder_takes_per_call_quotas(ps3_model):
    """``select_num_each_scale`` on one call = a model configured with those quotas; bad values raise."""
    x = pixels(2, seed=6)
    configured = PS3VisionModel(tiny_vision_config(max_select_num_each_scale=[3, 9])).eval()
    configured.load_state_dict(ps3_model.state_dict())
    with torch.no_grad(), use_backend("torch"):
        for looks in ({"num_look_close": 2}, {"num_token_look_close": 17}):
            got = ps3_model(x, select_num_each_scale=(3, 9), **looks)
            want = configured(x, **looks)
            assert torch.equal(got.last_hidden_state, want.last_hidden_state)
            assert all(torch.equal(a, b) for a, b in zip(got.selection_maps, want.selection_maps))
        assert [int(m[0].sum()) for m in got.selection_maps] == [4, 13]  # 17 tokens split 3:9, remainder last
        pooled = ps3_model(x, output_hidden_states=False, select_num_each_scale=[3, 9]).pooled_output
        assert torch.equal(pooled, configured(x, output_hidden_states=False).pooled_output)
        assert ps3_model(x, num_look_close=0, select_num_each_scale=[0, 0]).selection_maps is None
        for bad in ([3], [3, -1], [True, 9], [3.0, 9], "39", 12):
            with pytest.raises(ValueError, match="select_num_each_scale"):
                ps3_model(x, num_look_close=1, select_num_each_scale=bad)
        with pytest.raises(ValueError, match="all 0"):
            ps3_model(x, num_look_close=1, select_num_each_scale=[0, 0])
    assert ps3_model.vision_model.max_select_num_each_scale == [4, 16]


def test_interleaved_calls_with_different_quotas_match_serial_ones(tower, llm, monkeypatch):
    """Two threads with different ``select_num_each_scale``, held together inside the encoder's
    forward (after both have started, before either plans its looks), get what serial calls get;
    nothing writes the shared encoder's quotas (VILA sets them on the model)."""
    pipe = make_pipeline(tower, llm)
    encoder = tower.encoder
    ids = torch.tensor([[IMAGE_TOKEN_INDEX, 7, 8]])
    x = pixels(1, seed=5)
    quotas = {"a": [8, 8], "b": [2, 20]}

    def run(q):
        with torch.no_grad():  # grad mode is per thread; the backend (set below) is the process's
            return pipe.prepare_inputs(x, ids, look_close_mode="after_image", num_look_close=1, select_num_each_scale=q)

    with use_backend("torch"):
        serial = {k: run(q) for k, q in quotas.items()}
    for k, q in quotas.items():
        assert [int(m.sum()) for m in serial[k].selection_maps] == q

    def no_write(self, name, value):
        if name == "max_select_num_each_scale":
            raise AssertionError("a call wrote the shared encoder's max_select_num_each_scale")
        nn.Module.__setattr__(self, name, value)

    monkeypatch.setattr(type(encoder), "__setattr__", no_write)
    config_quotas = encoder.max_select_num_each_scale
    saved = list(config_quotas)
    barrier = threading.Barrier(len(quotas), timeout=60)

    def meet(*args) -> None:  # returns None: the output stays as it is
        barrier.wait()

    hook = encoder.selection_feature_proj.register_forward_hook(meet)
    try:
        with use_backend("torch"), ThreadPoolExecutor(len(quotas)) as pool:
            futures = {k: pool.submit(run, q) for k, q in quotas.items()}
            threaded = {k: f.result(timeout=120) for k, f in futures.items()}
    finally:
        hook.remove()
    for k in quotas:
        assert torch.equal(threaded[k].inputs_embeds, serial[k].inputs_embeds), k
        assert all(torch.equal(a, b) for a, b in zip(threaded[k].selection_maps, serial[k].selection_maps)), k
    assert encoder.max_select_num_each_scale is config_quotas and config_quotas == saved
