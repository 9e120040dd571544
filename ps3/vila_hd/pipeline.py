"""VILA-HD's two-pass driver around any Hugging Face causal LM.

Behaviour follows ``LlavaTopDownMetaForCausalLM`` (``llava/model/llava_arch.py``): pass 1
encodes the low-res view only and reads the top-down prompt off the LLM; pass 2 encodes with
that prompt and feeds the LLM ``[low-res tokens; kept high-res tokens; "\\n"]`` per image. Every
knob of a call travels as an argument down to the encoder: nothing shared is written. Also the
token ids around images: LLaVA's placeholder, a chat with placeholders, the end of the user turn.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn as nn

from .projector import VilaHDProjector
from .settings import LookCloseSettings, first_n_scales_for_sizes, resolve_look_close_settings

if TYPE_CHECKING:
    from .tower import PS3VisionTower

IMAGE_TOKEN_INDEX = -200  # LLaVA's placeholder id for an image in ``input_ids``


def tokenize_with_images(tokenizer, question: str, num_images: int = 1, image_token_id: int = IMAGE_TOKEN_INDEX,
                         image_token: str = "<image>") -> torch.Tensor:
    """``(1, L)`` ids of a one-turn chat (images first, then the question, as VILA writes
    it) with one ``image_token_id`` per image; needs a tokenizer with a chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat_template; build input_ids yourself with image_token_id placeholders")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": image_token * num_images + question}], add_generation_prompt=True, tokenize=False
    )
    ids: list[int] = []
    for i, piece in enumerate(text.split(image_token)):
        if i:
            ids.append(image_token_id)
        ids.extend(tokenizer(piece, add_special_tokens=False).input_ids)
    return torch.tensor([ids])


def user_turn_end_ids(tokenizer: Any) -> list[int]:
    """The ids the chat template writes after a user turn (VILA's ``get_user_prompt_end_id_pos``
    looks for them); empty without a tokenizer or chat template."""
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        return []
    dummy = "Here is the prompt."
    text = tokenizer.apply_chat_template([{"role": "user", "content": dummy}], add_generation_prompt=True, tokenize=False)
    return tokenizer(text.split(dummy)[-1].strip(), add_special_tokens=False).input_ids


@dataclass
class VilaHDInputs:
    """What pass 2 hands the LLM, plus the selection it made."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    selection_maps: Any
    selection_probs: Any
    top_down_prompts: torch.Tensor | None


class VilaHDPipeline:
    """VILA-HD inference around any Hugging Face causal LM.

    ``input_ids`` carry one ``image_token_id`` per image (images are consumed in row-major
    order). Pass 1 (``after_prompt``) runs the LLM over ``[low-res image tokens; text]`` up to
    the look-close position (by default the end of the user turn, found from the tokenizer's
    chat template as VILA does, else the last real token) and turns its last hidden state
    there into a PS3 prompt with ``top_down_prompt_head``. Pass 2 encodes with that prompt and
    returns the LLM inputs. Knobs: explicit arguments > VILA's environment variables
    (read at each call) > ``defaults`` (e.g. the checkpoint's config).
    """

    def __init__(
        self,
        vision_tower: "PS3VisionTower",
        projector: VilaHDProjector,
        llm: nn.Module,
        tokenizer: Any = None,
        *,
        image_token_id: int = IMAGE_TOKEN_INDEX,
        image_end_token_ids: Sequence[int] | None = None,
        padding_side: str = "left",
        defaults: LookCloseSettings | None = None,
        dynamic_aspect_ratio: bool = False,
    ):
        for name in ("get_input_embeddings", "generate"):
            if not callable(getattr(llm, name, None)):
                raise TypeError(f"llm must be a Hugging Face causal LM (no {name}())")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        self.vision_tower = vision_tower
        self.projector = projector
        self.llm = llm
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        if image_end_token_ids is None:  # VILA's BasicImageEncoder appends "\n" to every image
            if tokenizer is None:
                raise ValueError(
                    "a VilaHDPipeline without a tokenizer needs image_end_token_ids (VILA's '\\n' after each "
                    "image; pass [] to append nothing)"
                )
            image_end_token_ids = tokenizer("\n", add_special_tokens=False).input_ids
        self.image_end_token_ids = list(image_end_token_ids)
        self.padding_side = padding_side
        self.defaults = defaults or LookCloseSettings()
        self.dynamic_aspect_ratio = dynamic_aspect_ratio

    # ----- pieces -----

    def encode_images(
        self,
        images,
        settings: LookCloseSettings,
        top_down_prompts: torch.Tensor | None = None,
        look_close: bool = True,
        gt_selection_maps=None,
        original_image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> tuple[list[torch.Tensor], Any, Any]:
        """Images -> per-image LLM token embeddings (with the end tokens), maps, probs.
        ``look_close=False`` is pass 1: low-res tokens only."""
        encoder = self.vision_tower.encoder
        first_n = None
        if look_close and self.dynamic_aspect_ratio and original_image_sizes is not None:
            first_n = first_n_scales_for_sizes(encoder.ps3_scales, original_image_sizes)
        kwargs = settings.vision_kwargs() if look_close else {"num_look_close": 0, "num_token_look_close": None}
        features, maps, probs = self.vision_tower(
            images, top_down_prompts, kwargs["num_look_close"], kwargs["num_token_look_close"],
            settings.smooth_selection_prob, gt_selection_maps, first_n,
            select_num_each_scale=settings.select_num_each_scale,
        )
        dtype = self.projector.dtype
        if not look_close or maps is None:
            low = features if isinstance(features, torch.Tensor) else torch.cat([f.reshape(1, *f.shape[-2:]) for f in features])
            embeds = list(self.projector.embed_low_res(low.to(dtype)).unbind(0))
        else:
            features = features.to(dtype) if isinstance(features, torch.Tensor) else [f.to(dtype) for f in features]
            embeds = self.projector.embed_ps3_features(features, maps, encoder.low_res_token_num)
        if self.image_end_token_ids:
            embed = self.llm.get_input_embeddings()
            end = embed(torch.tensor(self.image_end_token_ids, device=embed.weight.device))
            embeds = [torch.cat([e, end.to(e)]) for e in embeds]
        return embeds, maps, probs

    def splice(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               image_embeds: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Replace each image token by its embeddings, drop padding, re-pad on ``padding_side``.

        Returns ``inputs_embeds``, ``attention_mask`` and, for every input position, the
        output position of its last row (to map look-close positions).
        """
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, L), got shape {tuple(input_ids.shape)}")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        if mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(mask.shape)} must match input_ids {tuple(input_ids.shape)}")
        is_image = (input_ids == self.image_token_id) & mask
        if int(is_image.sum()) != len(image_embeds):
            raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens (id {self.image_token_id}) but {len(image_embeds)} images were given")
        embed = self.llm.get_input_embeddings()
        text = embed(input_ids.masked_fill(is_image | ~mask, 0))
        B, device = input_ids.shape[0], input_ids.device
        image_len = torch.tensor([e.shape[0] for e in image_embeds], device=device, dtype=torch.long)
        lens = mask.long()
        lens[is_image] = image_len
        ends = lens.cumsum(1)
        total = ends[:, -1]
        width = int(total.max())
        offset = (width - total) if self.padding_side == "left" else torch.zeros_like(total)
        ends = ends + offset[:, None]
        starts = ends - lens
        out = text.new_zeros(B, width, text.shape[-1])
        b, t = (mask & ~is_image).nonzero(as_tuple=True)
        out[b, starts[b, t]] = text[b, t]
        if len(image_embeds):
            b, t = is_image.nonzero(as_tuple=True)
            rows = torch.arange(int(image_len.sum()), device=device)
            first_row = (image_len.cumsum(0) - image_len).repeat_interleave(image_len)
            out[b.repeat_interleave(image_len), starts[b, t].repeat_interleave(image_len) + rows - first_row] = (
                torch.cat(list(image_embeds)).to(out)
            )
        pos = torch.arange(width, device=device)
        new_mask = (pos >= offset[:, None]) & (pos < (offset + total)[:, None])
        return out, new_mask.long(), ends - 1

    def find_look_close_positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per row, the last token of the user turn: the token before the first occurrence of
        the chat template's post-user text (VILA's ``get_user_prompt_end_id_pos``), else the
        last real token."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        idx = torch.arange(input_ids.shape[1], device=input_ids.device)
        last = torch.where(mask, idx, -1).max(1).values
        ending = user_turn_end_ids(self.tokenizer)
        n = len(ending)
        if not n or n > input_ids.shape[1]:
            return last
        windows = input_ids.unfold(1, n, 1) == torch.tensor(ending, device=input_ids.device)
        hit = windows.all(-1) & mask[:, n - 1:]
        first = torch.where(hit, idx[: hit.shape[1]], input_ids.shape[1]).min(1).values
        return torch.where(hit.any(1), (first - 1).clamp(min=0), last)

    def top_down_prompts(
        self,
        images,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        look_close_positions: torch.Tensor | None = None,
        settings: LookCloseSettings | None = None,
    ) -> torch.Tensor:
        """Pass 1: one PS3 prompt per image, ``(num_images, vision width)``; every image of a
        row gets that row's prompt."""
        settings = settings or self.defaults
        if look_close_positions is None:
            look_close_positions = self.find_look_close_positions(input_ids, attention_mask)
        look_close_positions = torch.as_tensor(look_close_positions, device=input_ids.device).long()
        if look_close_positions.shape != (input_ids.shape[0],):
            raise ValueError(f"look_close_positions must hold one index per row ({input_ids.shape[0]})")
        if ((look_close_positions < 0) | (look_close_positions >= input_ids.shape[1])).any():
            raise ValueError("look_close_positions must index into input_ids")
        embeds, _, _ = self.encode_images(images, settings, look_close=False)
        inputs_embeds, mask, row_end = self.splice(input_ids, attention_mask, embeds)
        rows = torch.arange(input_ids.shape[0], device=input_ids.device)
        at = row_end[rows, look_close_positions]
        cut = int(at.max()) + 1
        with torch.no_grad():
            out = self.llm(inputs_embeds=inputs_embeds[:, :cut], attention_mask=mask[:, :cut],
                           output_hidden_states=True, use_cache=False)
        states = out.hidden_states[-1][rows, at]
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        per_row = ((input_ids == self.image_token_id) & real).sum(1)
        prompts = self.projector(states.to(self.projector.dtype), forward_top_down_prompt_head=True)
        return prompts.repeat_interleave(per_row, dim=0)

    # ----- entry points -----

    def prepare_inputs(
        self,
        images,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        look_close_positions: torch.Tensor | None = None,
        gt_selection_maps=None,
        original_image_sizes: Sequence[tuple[int, int]] | None = None,
        num_look_close: int | str | None = None,
        num_token_look_close: int | None = None,
        select_num_each_scale: Sequence[int] | None = None,
        look_close_mode: str | None = None,
        smooth_selection_prob: bool | None = None,
    ) -> VilaHDInputs:
        """Both passes: the LLM's ``inputs_embeds`` and ``attention_mask`` for ``images``
        (``(N, 3, H, W)`` or a list of ``(3, H, W)``) placed at the image tokens of ``input_ids``."""
        settings = resolve_look_close_settings(
            self.defaults, num_look_close=num_look_close, num_token_look_close=num_token_look_close,
            select_num_each_scale=None if select_num_each_scale is None else tuple(select_num_each_scale),
            look_close_mode=look_close_mode, smooth_selection_prob=smooth_selection_prob,
        )
        prompts = None
        if settings.look_close_mode == "after_prompt":
            if not hasattr(self.projector, "top_down_prompt_head"):
                raise ValueError("look_close_mode='after_prompt' needs a top_down_prompt_head; use 'after_image'")
            prompts = self.top_down_prompts(images, input_ids, attention_mask, look_close_positions, settings)
        embeds, maps, probs = self.encode_images(images, settings, prompts, True, gt_selection_maps, original_image_sizes)
        inputs_embeds, mask, _ = self.splice(input_ids, attention_mask, embeds)
        return VilaHDInputs(inputs_embeds, mask, maps, probs, prompts)

    @torch.inference_mode()
    def generate(self, images, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 return_selection_probs: bool = False, **kwargs: Any):
        """Both passes, then ``llm.generate``: the new token ids, or with
        ``return_selection_probs`` ``(ids, selection_maps, selection_probs)`` as VILA returns.
        Keyword arguments of :meth:`prepare_inputs` (the knobs) go there, the rest to ``llm.generate``."""
        knobs = {name: kwargs.pop(name) for name in _KNOBS if name in kwargs}
        inputs = self.prepare_inputs(images, input_ids, attention_mask, **knobs)
        ids = self.llm.generate(inputs_embeds=inputs.inputs_embeds, attention_mask=inputs.attention_mask, **kwargs)
        return (ids, inputs.selection_maps, inputs.selection_probs) if return_selection_probs else ids


_KNOBS = tuple(p.name for p in inspect.signature(VilaHDPipeline.prepare_inputs).parameters.values() if p.kind is p.KEYWORD_ONLY)
