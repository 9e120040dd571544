"""The ViT trunk of PS3 (SigLIP or C-RADIO), with timm's parameter names so checkpoints load.

Unlike timm's ``VisionTransformer`` it runs on *packed* token sequences: ``x`` is
``(total_tokens, width)`` and ``cu_seqlens`` splits it into sequences (one per image for the
low-res pass, one per image and look for the high-res passes), each attending to an optional
per-layer key/value prefix (the low-res cache of its image).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ps3_kernels import PackedSequences, varlen_prefix_attention  # PackedSequences: also importable from here

from .configuration_ps3 import TrunkSpec
from .radio_adapter import build_adapter


class Mlp(nn.Module):
    """fc1 -> GELU (exact erf) -> [LayerNorm] -> fc2, timm's ``Mlp`` names."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None, norm: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(hidden_features) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, seqs: PackedSequences, prefix: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Returns the output and this layer's ``(k, v)`` as ``(total, heads, head_dim)``."""
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)
        prefix_k, prefix_v = prefix if prefix is not None else (None, None)
        out = varlen_prefix_attention(q, k, v, seqs, prefix_k, prefix_v)
        return self.proj(out.reshape(x.shape[0], self.num_heads * self.head_dim)), (k, v)


class Block(nn.Module):
    def __init__(self, spec: TrunkSpec):
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.width, eps=1e-6)
        self.attn = Attention(spec.width, spec.num_heads)
        self.norm2 = nn.LayerNorm(spec.width, eps=1e-6)
        self.mlp = Mlp(spec.width, spec.mlp_hidden)

    def forward(self, x, seqs, prefix=None):
        attn_out, kv = self.attn(self.norm1(x), seqs, prefix)
        x = x + attn_out
        x = x + self.mlp(self.norm2(x))
        return x, kv


class AttentionPoolLatent(nn.Module):
    """MAP head: one learned query attends over the tokens, then a residual MLP."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = width // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, width))
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, width * 2)
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: (B, N, C); ``mask``: (B, N) bool of the tokens to pool over, or None."""
        B, N, C = x.shape
        q = self.q(self.latent).view(1, self.num_heads, 1, self.head_dim).expand(B, -1, -1, -1)
        k, v = self.kv(x).view(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn_mask = mask.view(B, 1, 1, N) if mask is not None else None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(out.transpose(1, 2).reshape(B, 1, C))
        out = out + self.mlp(self.norm(out))
        return out[:, 0]


class PatchEmbed(nn.Module):
    def __init__(self, spec: TrunkSpec):
        super().__init__()
        self.proj = nn.Conv2d(3, spec.width, kernel_size=spec.patch_size, stride=spec.patch_size)


@dataclass
class TrunkOutput:
    hidden_states: list[torch.Tensor]  # one (total, C) tensor per kept layer
    kv_cache: list[torch.Tensor] | None  # per layer (2, total, H, D): k and v, one contiguous copy


class VisionTrunk(nn.Module):
    """timm-named ViT trunk: ``patch_embed``, ``pos_embed``, ``blocks``, ``norm``, ``attn_pool``,
    and for C-RADIO the adapter ``siglip_proj`` (``norm`` is then parameter-free unless the
    config keeps the final norm)."""

    def __init__(self, spec: TrunkSpec):
        super().__init__()
        self.spec = spec
        self.patch_embed = PatchEmbed(spec)
        self.grid_size = spec.img_size // spec.patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, spec.width))
        self.blocks = nn.ModuleList([Block(spec) for _ in range(spec.depth)])
        self.norm = nn.LayerNorm(spec.width, eps=1e-6) if spec.final_norm else nn.Identity()
        self.attn_pool = AttentionPoolLatent(*spec.pool_shape)
        self.siglip_proj = build_adapter(spec.adapter) if spec.adapter is not None else None
        self.grad_checkpointing = False
        self._pos_cache: dict = {}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's switch (VILA calls it for ``ps3_grad_checkpointing``): recompute each block
        in backward instead of keeping its activations."""
        self.grad_checkpointing = enable

    def pool(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The MAP head over ``(B, N, width)`` tokens after the final norm (and the C-RADIO adapter),
        ``(B, pool width)``; ``mask``: ``(B, N)`` bool of the tokens to pool, or None."""
        x = self.norm(tokens)
        if self.siglip_proj is not None:
            x = self.siglip_proj(x)
        return self.attn_pool(x, mask)

    def check_pos_grid(self, size: tuple[int, int]) -> None:
        """A cropped table (C-RADIO's CPE) covers only grids up to its own; anything else is resampled."""
        grid = self.grid_size
        if self.spec.cropped_pos_embed and (size[0] > grid or size[1] > grid):
            raise ValueError(f"this C-RADIO trunk crops its {grid}x{grid} position table (img_size {self.spec.img_size}, "
                             f"patch {self.spec.patch_size}) instead of resampling it, so it cannot cover a "
                             f"{size[0]}x{size[1]} token grid; that needs img_size >= {max(size) * self.spec.patch_size}")

    def pos_table(self, size: tuple[int, int]) -> torch.Tensor:
        """``pos_embed`` for a ``size`` grid, ``(h*w, C)``: its top-left ``size`` corner for a C-RADIO
        trunk (upstream's CPE), else resampled (bicubic, antialias, fp32) to ``size``; the resampled
        tables are cached per size (upstream resamples every call) but not under torch.compile or
        while they need gradients."""
        pos, grid = self.pos_embed, self.grid_size
        if size == (grid, grid):
            return pos[0]
        if self.spec.cropped_pos_embed:
            self.check_pos_grid(size)
            return pos[0].view(grid, grid, -1)[: size[0], : size[1]].reshape(size[0] * size[1], -1)
        cacheable = not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and pos.requires_grad)
        key = (size, pos.data_ptr(), pos._version, pos.dtype, pos.device) if cacheable else None
        if cacheable and key in self._pos_cache:
            return self._pos_cache[key]
        table = pos.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=size, mode="bicubic", antialias=True)
        table = table.permute(0, 2, 3, 1).reshape(size[0] * size[1], -1).to(pos.dtype)
        if cacheable:  # one parameter version at a time
            self._pos_cache = {k: v for k, v in self._pos_cache.items() if k[1:] == key[1:]}
            self._pos_cache[key] = table
        return table

    def forward(
        self,
        x: torch.Tensor,
        seqs: PackedSequences,
        prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        keep_layers: int | None = None,
        return_kv: bool = False,
    ) -> TrunkOutput:
        """Run every block on packed tokens ``x``; keep the last ``keep_layers`` outputs."""
        depth = len(self.blocks)
        keep_from = 0 if keep_layers is None else depth - keep_layers
        hidden, kv_cache = [], []
        for i, blk in enumerate(self.blocks):
            layer_prefix = prefix[i] if prefix is not None else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x, kv = torch.utils.checkpoint.checkpoint(blk, x, seqs, layer_prefix, use_reentrant=False)
            else:
                x, kv = blk(x, seqs, layer_prefix)
            if i >= keep_from:
                hidden.append(x)
            if return_kv:  # k and v are views of this layer's qkv output: keep them (one copy), not q with them
                kv_cache.append(torch.stack(kv))
        return TrunkOutput(hidden, kv_cache if return_kv else None)
