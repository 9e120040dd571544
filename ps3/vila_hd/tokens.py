"""Token ids around images: LLaVA's image placeholder, a one-turn chat with image placeholders,
and the chat template's end of the user turn (where VILA reads the top-down prompt)."""

from __future__ import annotations

from typing import Any

import torch

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
