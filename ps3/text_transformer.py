"""PS3's text tower: an open_clip-style causal text transformer plus a prompt projector.

Parameter names and shapes follow upstream's checkpoints (``text_model.*`` keys), so a state
dict saved by upstream loads here unchanged. The attention is written out with
``scaled_dot_product_attention`` on batch-first tensors; its parameters keep the
``nn.MultiheadAttention`` names (``in_proj_weight``, ``in_proj_bias``, ``out_proj``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from .configuration_ps3 import PS3TextConfig
from .vit import Mlp

POOL_TYPES = ("first", "last", "argmax", "none")


@dataclass
class PS3TextModelOutput(ModelOutput):
    """``pooled_output``: projected text embedding; ``prompt``: what PS3's vision side consumes."""

    pooled_output: torch.FloatTensor | None = None
    prompt: torch.FloatTensor | None = None


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_value: float):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_value)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class SelfAttention(nn.Module):
    """Multi-head self-attention stored like ``nn.MultiheadAttention`` (packed qkv projection)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"text width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        n, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm block: ``x + ls_1(attn(ln_1 x))`` then ``x + ls_2(mlp(ln_2 x))``."""

    def __init__(self, config: PS3TextConfig):
        super().__init__()
        width, hidden = config.width, int(config.width * config.mlp_ratio)
        self.ln_1 = nn.LayerNorm(width, **config.norm_kwargs)
        self.attn = SelfAttention(width, config.heads)
        self.ls_1 = LayerScale(width, config.ls_init_value) if config.ls_init_value is not None else nn.Identity()
        self.ln_2 = nn.LayerNorm(width, **config.norm_kwargs)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, hidden),
                gelu=nn.GELU(**config.act_kwargs),
                c_proj=nn.Linear(hidden, width),
            )
        )
        self.ls_2 = LayerScale(width, config.ls_init_value) if config.ls_init_value is not None else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls_1(self.attn(self.ln_1(x), mask))
        return x + self.ls_2(self.mlp(self.ln_2(x)))


class Transformer(nn.Module):
    """The block stack; exists so checkpoint keys read ``transformer.resblocks.N``."""

    def __init__(self, config: PS3TextConfig):
        super().__init__()
        self.width = config.width
        self.layers = config.layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.resblocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return x


class TextTransformer(nn.Module):
    """Token ids ``(N, T)`` -> :class:`PS3TextModelOutput` (``pooled_output``, ``prompt``).

    Behaviour matches upstream, including its quirks: with ``embed_cls`` the appended class
    token is always the pooled one (``pool_type`` is ignored) and its padding mask is applied
    only together with the causal mask. Unlike upstream, ``T`` may be shorter than
    ``context_length`` (the causal mask is cut to size instead of failing).
    """

    def __init__(self, config: PS3TextConfig):
        super().__init__()
        if config.pool_type not in POOL_TYPES:
            raise ValueError(f"config.pool_type must be one of {POOL_TYPES}, got {config.pool_type!r}")
        self.config = config
        self.context_length = config.context_length
        self.pool_type = config.pool_type
        self.pad_id = config.pad_id
        self.causal = not config.no_causal_mask
        width = config.width

        self.token_embedding = nn.Embedding(config.vocab_size, width)
        self.cls_emb = nn.Parameter(torch.empty(width)) if config.embed_cls else None
        self.num_pos = config.context_length + int(config.embed_cls)
        self.positional_embedding = nn.Parameter(torch.empty(self.num_pos, width))
        self.transformer = Transformer(config)
        self.ln_final = nn.LayerNorm(width, **config.norm_kwargs)
        if config.proj_bias:
            self.text_projection = nn.Linear(width, config.output_dim)
        else:
            self.text_projection = nn.Parameter(torch.empty(width, config.output_dim))
        self.prompt_proj = Mlp(config.output_dim, config.prompt_proj_dim, config.prompt_proj_dim, norm=True)
        self.init_parameters()

    def init_parameters(self) -> None:
        """open_clip's initialisation (only matters for freshly built, untrained models)."""
        width, layers = self.config.width, self.config.layers
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if isinstance(self.text_projection, nn.Linear):
            nn.init.normal_(self.text_projection.weight, std=width**-0.5)
            nn.init.zeros_(self.text_projection.bias)
        else:
            nn.init.normal_(self.text_projection, std=width**-0.5)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def _check_text(self, text) -> None:
        if not isinstance(text, torch.Tensor):
            raise TypeError(f"text must be a torch.Tensor of token ids, got {type(text).__name__}")
        if text.dtype.is_floating_point or text.dtype.is_complex or text.dtype == torch.bool:
            raise TypeError(f"text must hold integer token ids, got dtype {text.dtype}")
        if text.dim() != 2:
            raise ValueError(f"text must be 2-D (batch, tokens), got shape {tuple(text.shape)}")
        if not 1 <= text.shape[1] <= self.context_length:
            raise ValueError(f"text must have 1..{self.context_length} (context_length) columns, got {text.shape[1]}")
        if text.numel() and (int(text.min()) < 0 or int(text.max()) >= self.config.vocab_size):
            raise ValueError(f"text token ids must lie in [0, {self.config.vocab_size}) (vocab_size)")

    def _attention_mask(self, text: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive mask: causal ``(L, L)``, or ``(N, 1, L, L)`` when the class token is appended."""
        if not self.causal:
            return None  # upstream also drops the class-token padding mask in this case
        device = text.device
        mask = torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)
        if self.cls_emb is None:
            return mask
        # The class-token row may only see non-pad tokens. Like open_clip, the key mask is the
        # token mask shifted right by one, with key 0 always visible.
        visible = F.pad(text != self.pad_id, (1, 0), value=True)
        cls_row = torch.zeros(visible.shape, device=device, dtype=dtype).masked_fill_(~visible, float("-inf"))
        mask = mask.expand(text.shape[0], 1, length, length).clone()
        mask[:, 0, -1, :] += cls_row
        return mask

    def _pool(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        if self.cls_emb is not None or self.pool_type == "last":
            return x[:, -1]
        if self.pool_type == "first":
            return x[:, 0]
        if self.pool_type == "argmax":  # end-of-text has the largest id in CLIP vocabularies
            return x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
        return x

    def forward(self, text: torch.Tensor) -> PS3TextModelOutput:
        self._check_text(text)
        dtype = self.transformer.resblocks[0].mlp.c_fc.weight.dtype if self.config.layers else self.positional_embedding.dtype
        x = self.token_embedding(text).to(dtype)
        if self.cls_emb is not None:
            x = torch.cat([x, self.cls_emb.to(dtype).expand(x.shape[0], 1, -1)], dim=1)
        length = x.shape[1]
        x = x + self.positional_embedding[:length].to(dtype)
        x = self.transformer(x, self._attention_mask(text, length, dtype))

        # LayerNorm is per token, so normalising before or after pooling is the same thing;
        # pooling first is cheaper.
        pooled = self.ln_final(self._pool(x, text))
        if isinstance(self.text_projection, nn.Linear):
            pooled = self.text_projection(pooled)
        else:
            pooled = pooled @ self.text_projection
        prompt = self.prompt_proj(F.normalize(pooled, dim=-1))
        return PS3TextModelOutput(pooled_output=pooled, prompt=prompt)
