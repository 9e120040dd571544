"""PS3 vision/text models with upstream's API and checkpoint format.

The encoder runs every image's low-res pass as one packed batch, plans all looks on the host
(quotas never depend on pixel values), selects every look's patches with one sort per scale,
and encodes all looks of all images as one packed varlen batch whose sequences attend to
their image's low-res KV cache. Upstream instead loops over looks (and over images whenever
their selection counts differ) and concatenates the cache onto K/V in every layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithNoAttention

from ps3_kernels import assign_looks, selection_probs, sparse_patch_embed
from ps3_kernels.patch_embed import PatchTokens

from .checkpoint import WEIGHTS_NAME, check_model_type, pos_embed_grid, read_config, weight_shapes
from .configuration_ps3 import PS3Config, PS3TextConfig, PS3VisionConfig
from .convnext import ShallowConvNet
from .packing import group_by, host_tensor, resize_bicubic
from .selection_plan import default_quotas, plan_looks
from .text_transformer import TextTransformer
from .validation import LookArgs, check_flag, check_images, check_look_args
from .vit import Mlp, PackedSequences, VisionTrunk

HIGHRES_SELECTION_SIZE = 1512  # upstream scores saliency on a fixed 1512x1512 view


@dataclass
class PS3VisionModelOutput(BaseModelOutputWithNoAttention):
    """Upstream's output fields, plus ``look_maps`` (only with ``output_look_maps=True``):
    per high-res scale, ``(B, h, w)`` int64, the look that selected each patch (-1 where none
    did); ``selection_maps`` is its union. For a list input, each field is a list with one
    entry per image, equal to that field of the image encoded alone (batch dimension 1)."""

    last_hidden_state: Any = None
    hidden_states: Any = None
    pooled_output: Any = None
    selection_maps: Any = None
    selection_probs: Any = None
    bottomup_selection_probs: Any = None
    topdown_selection_probs: Any = None
    look_maps: Any = None


class PS3VisionEncoder(nn.Module):
    """Upstream's ``vision_model``: trunk, selection heads, per-scale position residuals."""

    def __init__(self, config: PS3VisionConfig):
        super().__init__()
        self.config = config
        spec = config.trunk_spec()
        self.spec = spec
        self.ps3_scales = list(config.ps3_scales)
        self._check_scales(spec.patch_size)
        self.trunk = VisionTrunk(spec)
        self.width = spec.width
        self.layers = spec.depth
        self.patch_size = spec.patch_size
        self.num_hidden_layers_to_return = self.layers
        self.low_res_token_num = (self.ps3_scales[0] // self.patch_size) ** 2
        self.max_select_num_each_scale = (
            list(config.max_select_num_each_scale)
            if config.max_select_num_each_scale is not None
            else default_quotas(config.max_select_num, self.ps3_scales)
        )
        num_high = len(self.ps3_scales) - 1
        num_sel = len(config.select_based_on_layer)
        if any(not -spec.depth <= i < spec.depth for i in config.select_based_on_layer):
            raise ValueError(f"config.select_based_on_layer={config.select_based_on_layer} must index the {spec.depth} layers")
        quotas = self.max_select_num_each_scale
        if len(quotas) != len(self.ps3_scales) - 1 or any(isinstance(q, bool) or not isinstance(q, int) or q < 0 for q in quotas):
            raise ValueError(
                f"config.max_select_num_each_scale={config.max_select_num_each_scale} needs one int >= 0 per "
                f"high-res scale ({len(self.ps3_scales) - 1})"
            )
        self.selection_feature_proj = Mlp(self.width * num_sel, self.width * num_sel, self.width * num_high, norm=True)
        self.prior_prompt = nn.Parameter(torch.randn(self.width))
        if config.separate_pos_emb:
            self.pos_emb_residual = nn.ParameterList(
                [nn.Parameter(torch.zeros(1, (s // self.patch_size) ** 2, self.width)) for s in self.ps3_scales[1:]]
            )
        if config.highres_selection_feature:
            self.highres_selection_feature_module = ShallowConvNet(
                config.highres_selection_module_hidden_dim,
                config.highres_selection_module_out_dim,
                config.highres_selection_module_depth,
                config.highres_selection_module_kernel_size,
            )
            self.prompt_proj_for_highres = nn.Linear(self.width, config.highres_selection_module_out_dim * num_high)
        self._pos_cache: dict = {}

    @property
    def s3_scales(self) -> list[int]:
        """Alias VILA reads (``mm_scale_num``, dynamic aspect ratios)."""
        return self.ps3_scales

    def token_selection_param_names(self) -> list[str]:
        """Modules that only serve patch selection (VILA's ``tune_top_down_selection``)."""
        return ["selection_feature_proj", "highres_selection_feature_module", "prompt_proj_for_highres"]

    def _check_scales(self, patch: int) -> None:
        s = self.ps3_scales
        if len(s) < 2:
            raise ValueError(f"config.ps3_scales needs a low-res and at least one high-res scale, got {s}")
        if s[0] % patch or any(x % s[0] for x in s):
            raise ValueError(f"config.ps3_scales={s} must be multiples of the patch size {patch} and of the first scale")

    # ----- geometry (host ints) -----

    def image_size_scale_i(self, x: torch.Tensor | tuple[int, int], scale_idx: int) -> tuple[int, int]:
        """Size the image is resized to at ``scale_idx``; scale 0 is always square."""
        s0, p = self.ps3_scales[0], self.patch_size
        if scale_idx == 0:
            return (s0, s0)
        h, w = x.shape[-2:] if isinstance(x, torch.Tensor) else x
        zoom = self.ps3_scales[scale_idx] // s0
        if h >= w:
            return (s0 * zoom, max(int(s0 / h * w) // p, 1) * p * zoom)
        return (max(int(s0 / w * h) // p, 1) * p * zoom, s0 * zoom)

    def feature_size_scale_i(self, x: torch.Tensor | tuple[int, int], scale_idx: int) -> tuple[int, int]:
        h, w = self.image_size_scale_i(x, scale_idx)
        return (max(h // self.patch_size, 1), max(w // self.patch_size, 1))

    def max_highres_token_num(self, x: torch.Tensor | tuple[int, int], only_select_first_n_scale=None) -> int:
        n = len(self.ps3_scales) - 1 if only_select_first_n_scale is None else max(only_select_first_n_scale)
        return sum(h * w for h, w in (self.feature_size_scale_i(x, i) for i in range(1, n + 1)))

    # ----- position embeddings -----

    def _pos_table(self, size: tuple[int, int]) -> torch.Tensor:
        """Trunk pos-embed resampled (bicubic, antialias, fp32) to ``size``, ``(h*w, C)``.

        Cached per size while the table cannot receive gradients; upstream resamples it on
        every call.
        """
        pos = self.trunk.pos_embed
        grid = self.trunk.grid_size
        if size == (grid, grid):
            return pos[0]
        if not self.config.dynamic_img_size:
            raise ValueError(
                f"config.dynamic_img_size is off, so the trunk's position embedding only fits its {grid}x{grid} grid "
                f"(img_size {self.spec.img_size}), but this input needs {size[0]}x{size[1]}; upstream's timm trunk "
                "refuses such inputs too. Set dynamic_img_size=True to resample it."
            )
        # Not cached under torch.compile (the graph computes it once) or while it needs gradients.
        cacheable = not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and pos.requires_grad)
        key = (size, pos.data_ptr(), pos._version, pos.dtype, pos.device) if cacheable else None
        if cacheable and key in self._pos_cache:
            return self._pos_cache[key]
        table = pos.float().reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        table = F.interpolate(table, size=size, mode="bicubic", antialias=True)
        table = table.permute(0, 2, 3, 1).reshape(size[0] * size[1], -1).to(pos.dtype)
        if cacheable:
            self._pos_cache = {k: v for k, v in self._pos_cache.items() if k[1:] == key[1:]}
            self._pos_cache[key] = table
        return table

    def pos_embed_for_grid(self, h: int, w: int, exact: bool = False) -> torch.Tensor:
        """Position embedding of an ``(h, w)`` token grid, ``(h*w, C)``.

        PS3 resamples the square table to ``max(h, w)`` and crops ``[:h, :w]``; ``exact``
        resamples straight to ``(h, w)`` instead (LLaVA-UHD's slices).
        """
        if exact:
            return self._pos_table((h, w))
        side = max(h, w)
        return self._pos_table((side, side)).view(side, side, -1)[:h, :w].reshape(h * w, -1)

    # ----- passes -----

    def encode_dense(
        self,
        pixel_values: torch.Tensor,
        return_kv: bool = False,
        keep_layers: int | None = None,
        exact_pos_embed: bool = False,
    ):
        """Dense ViT pass over whole images ``(B, 3, H, W)`` (H, W multiples of the patch).

        Returns the hidden states ``(B, h*w, C)`` of the last ``keep_layers`` layers (all by
        default) and, if asked, the per-layer K/V cache ``(B, heads, h*w, head_dim)``. This is
        PS3's low-res pass and what the dense baselines (AnyRes, S2, slicing) run on their
        crops; see :meth:`pos_embed_for_grid` for ``exact_pos_embed``.
        """
        B, _, H, W = pixel_values.shape
        h, w = H // self.patch_size, W // self.patch_size
        tokens = self.trunk.patch_embed.proj(pixel_values).flatten(2).transpose(1, 2)  # (B, h*w, C)
        pos = self.pos_embed_for_grid(h, w, exact=exact_pos_embed)
        seqs = PackedSequences.from_lengths([h * w] * B, pixel_values.device)
        out = self.trunk((tokens + pos).flatten(0, 1), seqs, keep_layers=keep_layers, return_kv=return_kv)
        hidden = [t.view(B, h * w, -1) for t in out.hidden_states]
        cache = None
        if return_kv:
            heads, hd = self.spec.num_heads, self.spec.head_dim
            cache = [tuple(t.view(B, h * w, heads, hd).transpose(1, 2).contiguous() for t in kv) for kv in out.kv_cache]
        return hidden, cache

    def _low_res(self, images: list[torch.Tensor], return_kv: bool):
        s0 = self.ps3_scales[0]
        return self.encode_dense(self._resize_all(images, (s0, s0)), return_kv=return_kv)

    @staticmethod
    def _resize_all(images: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """Resize every image to ``size`` (one interpolate call per distinct input size)."""
        groups = group_by([im.shape for im in images])
        x = torch.cat([resize_bicubic(torch.stack([images[i] for i in idx]), size) for idx in groups.values()])
        order = [i for idx in groups.values() for i in idx]
        if order != sorted(order):
            x = x[torch.argsort(host_tensor(order, x.device))]
        return x

    def _pool(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.trunk.attn_pool(self.trunk.norm(tokens), mask)

    # ----- selection -----

    def _selection_probs(self, images, low_hidden, prompt, gt_maps, smooth):
        """Per-scale selection probabilities: ``probs[s][b]`` is ``(h, w)`` of image ``b``."""
        g = self.ps3_scales[0] // self.patch_size
        feats = torch.cat([low_hidden[i] for i in self.config.select_based_on_layer], dim=-1)
        feats = self.selection_feature_proj(feats)[..., : self.width]  # every scale uses the first map
        feats = feats.transpose(1, 2).reshape(len(images), self.width, g, g)
        highres = None
        if self.config.highres_selection_feature:
            views = self._resize_all(images, (HIGHRES_SELECTION_SIZE, HIGHRES_SELECTION_SIZE))
            highres = self.highres_selection_feature_module(views)

        def probs_for(p: torch.Tensor) -> torch.Tensor:
            hp = None
            if highres is not None:
                hp = self.prompt_proj_for_highres(p)[:, : self.config.highres_selection_module_out_dim]
            return selection_probs(feats, p, highres, hp)

        prior = probs_for(self.prior_prompt[None].expand(len(images), -1))
        posterior = probs_for(prompt) if prompt is not None else None
        chosen = posterior if posterior is not None else prior
        return (
            self._per_scale(images, chosen, gt_maps, smooth),
            self._per_scale(images, prior, None, False),
            self._per_scale(images, posterior, None, False) if posterior is not None else None,
        )

    def _per_scale(self, images, probs, gt_maps, smooth):
        num_high = len(self.ps3_scales) - 1
        out = [[None] * len(images) for _ in range(num_high)]
        grids = [tuple(self.feature_size_scale_i(im, s + 1) for s in range(num_high)) for im in images]
        gt_shapes = [tuple(g.shape) for g in gt_maps] if gt_maps is not None else [None] * len(images)
        for (grid, _), idx in group_by(list(zip(grids, gt_shapes))).items():
            p = probs if len(idx) == len(images) else probs[host_tensor(idx, probs.device)]  # no per-call host copy
            gt = None
            if gt_maps is not None:
                gt = torch.stack([gt_maps[i] for i in idx])
                gt = F.interpolate(gt[:, None].float(), size=grid[0], mode="area")[:, 0].to(gt.dtype)
            for s, size in enumerate(grid):
                ps = F.interpolate(p[:, None].float(), size=size, mode="nearest")[:, 0].to(p.dtype)
                if gt is not None:
                    gs = F.interpolate(gt[:, None].float(), size=size, mode="nearest")[:, 0].to(gt.dtype)
                    ps = (gs > 0) * 1 + (gs <= 0) * ps
                if smooth:
                    ps = F.interpolate(F.interpolate(ps[:, None], size=(6, 6), mode="area"), size=size, mode="nearest")[:, 0]
                for j, b in enumerate(idx):
                    out[s][b] = ps[j]
        return out

    # ----- high-res looks -----

    def _select_and_pack(self, images, probs, plans):
        """Assign patches to looks and lay out all looks' tokens as one packed batch.

        Returns the per-scale look maps (``-1`` = unselected), the packed tokens' patch
        coordinates (sequence-major, then scale, then raster) and the sequence lengths.
        """
        device = probs[0][0].device
        B, num_high = len(images), len(self.ps3_scales) - 1
        grids = [[self.feature_size_scale_i(im, s + 1) for s in range(num_high)] for im in images]
        n_max = [max(grids[b][s][0] * grids[b][s][1] for b in range(B)) for s in range(num_high)]
        max_looks = max([0] + [len(p) for p in plans])
        look_maps = []
        for s in range(num_high):
            flat = torch.full((B, n_max[s]), float("-inf"), device=device, dtype=probs[s][0].dtype)
            for idx in group_by([probs[s][b].numel() for b in range(B)]).values():
                rows = host_tensor(idx, device)
                # Equal counts, not equal shapes: a portrait and a landscape grid may share a count.
                flat[rows, : probs[s][idx[0]].numel()] = torch.stack([probs[s][b].flatten() for b in idx])
            quotas = [[p[l][s] if l < len(p) else 0 for l in range(max_looks)] for p in plans]
            look_maps.append(assign_looks(flat, host_tensor(quotas, device, torch.long)))

        seq_image = [b for b in range(B) for _ in plans[b]]
        seq_base = host_tensor([0] + [len(p) for p in plans], device, torch.long).cumsum(0)[:-1]
        lengths = [sum(look) for p in plans for look in p]
        stride = sum(n_max)
        scale_off = [sum(n_max[:s]) for s in range(num_high)]
        keys = []
        for s in range(num_high):
            look = look_maps[s]
            pos = torch.arange(n_max[s], device=device)
            seq = seq_base[:, None] + look
            keys.append(torch.where(look >= 0, seq * stride + scale_off[s] + pos, torch.full_like(look, torch.iinfo(torch.long).max)))
        total = sum(lengths)
        packed = torch.sort(torch.cat(keys, dim=1).flatten()).values[:total]
        seq, rem = packed // stride, packed % stride
        scale_off_t = host_tensor(scale_off, device)
        scale = torch.searchsorted(scale_off_t, rem, right=True) - 1
        pos = rem - scale_off_t[scale]
        image = host_tensor(seq_image, device, torch.long)[seq] if total else seq
        width = host_tensor([[gw for _, gw in grids[b]] for b in range(B)], device)
        w = width[image, scale]
        tokens = PatchTokens(image=image, scale=scale, row=pos // w, col=pos % w)
        return look_maps, tokens, lengths, seq_image, grids, scale_off, stride

    def _embed_tokens(self, images, tokens: PatchTokens, grids):
        """Tokens of the selected patches; ``images`` is the (B, 3, H, W) batch (read in place by the
        kernel) or the list of images."""
        B, num_high, p = len(images), len(self.ps3_scales) - 1, self.patch_size
        device = self.trunk.pos_embed.device
        sides = sorted({max(g) for gb in grids for g in gb})
        side_off = {}
        tables = []
        for side in sides:
            side_off[side] = sum(t.shape[0] for t in tables)
            tables.append(self._pos_table((side, side)))
        pos_table = torch.cat(tables)
        side_t = host_tensor([[max(grids[b][s]) for s in range(num_high)] for b in range(B)], device)
        off_t = host_tensor([[side_off[max(grids[b][s])] for s in range(num_high)] for b in range(B)], device)
        pos_index = off_t[tokens.image, tokens.scale] + tokens.row * side_t[tokens.image, tokens.scale] + tokens.col
        res_table = res_index = None
        if self.config.separate_pos_emb:
            res_table = torch.cat([r[0] for r in self.pos_emb_residual])
            full = [s // p for s in self.ps3_scales[1:]]
            res_off = host_tensor([sum(f * f for f in full[:s]) for s in range(num_high)], device)
            res_side = host_tensor(full, device)
            res_index = res_off[tokens.scale] + tokens.row * res_side[tokens.scale] + tokens.col
        hw = [tuple(images.shape[-2:])] * B if isinstance(images, torch.Tensor) else [im.shape[-2:] for im in images]
        sizes = [[self.image_size_scale_i(size, s + 1) for s in range(num_high)] for size in hw]
        proj = self.trunk.patch_embed.proj
        return sparse_patch_embed(images, sizes, tokens, proj.weight, proj.bias, pos_table, pos_index, res_table, res_index)

    # ----- feature maps -----

    def format_features_into_feature_maps(self, features: torch.Tensor, selection_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Scatter ``(B, N, C)`` features (low-res first) into zero-filled ``(B, C, h, w)`` maps per scale."""
        if not isinstance(features, torch.Tensor) or features.dim() != 3:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"features must be a (B, N, C) tensor, got {shape}")
        B, N, C = features.shape
        num_high = len(self.ps3_scales) - 1
        if not isinstance(selection_maps, (list, tuple)) or len(selection_maps) != num_high:
            raise ValueError(f"selection_maps must be a list of {num_high} (B, h, w) tensors, one per high-res scale")
        for i, m in enumerate(selection_maps):
            if not isinstance(m, torch.Tensor) or m.dim() != 3 or m.shape[0] != B:
                shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"selection_maps[{i}] must be a (B={B}, h, w) tensor like features' batch, got {shape}")
            if m.device != features.device:
                raise ValueError(f"selection_maps[{i}] is on {m.device} but features are on {features.device}")
        g = int(round(self.low_res_token_num**0.5))
        masks = [torch.ones(B, g, g, device=features.device, dtype=torch.bool)] + [m.bool() for m in selection_maps]
        flat = torch.cat([m.flatten(1) for m in masks], dim=1)
        counts = flat.sum(1)
        if not torch.all(counts == N):
            raise ValueError(f"features has {N} tokens per image but the selection maps select {counts.tolist()}")
        full = features.new_zeros(B, flat.shape[1], C)
        full[flat] = features.reshape(-1, C)
        maps = []
        for part, m in zip(full.split([m[0].numel() for m in masks], dim=1), masks):
            maps.append(part.transpose(1, 2).reshape(B, C, *m.shape[1:]))
        return maps

    # ----- forward -----

    def forward(
        self,
        x,
        prompt: torch.Tensor | None = None,
        gt_selection_maps=None,
        is_global_text: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        pool_gt_token_only: bool = False,
        num_look_close=None,
        num_token_look_close=None,
        smooth_selection_prob: bool = False,
        only_select_first_n_scale=None,
        output_look_maps: bool = False,
        select_num_each_scale=None,
    ) -> PS3VisionModelOutput:
        images, batched = check_images(x, self.ps3_scales[0], self.patch_size)
        if not isinstance(output_look_maps, bool):
            raise TypeError(f"output_look_maps must be a bool, got {type(output_look_maps).__name__}")
        weight = self.trunk.pos_embed
        if images[0].dtype != weight.dtype or images[0].device != weight.device:
            raise TypeError(
                f"pixel_values are {images[0].dtype} on {images[0].device} but the model is {weight.dtype} on "
                f"{weight.device}; move/cast them first (e.g. x.to(model.device, model.dtype))"
            )
        args = check_look_args(
            images, batched, self.width, len(self.ps3_scales) - 1, prompt, gt_selection_maps, is_global_text,
            output_hidden_states, pool_gt_token_only, num_look_close, num_token_look_close, only_select_first_n_scale,
            select_num_each_scale,
        )
        smooth_selection_prob = check_flag("smooth_selection_prob", smooth_selection_prob)
        B = len(images)
        no_look = output_hidden_states and (num_look_close == 0 or num_token_look_close == 0)
        low_hidden, cache = self._low_res(images, return_kv=not no_look)
        probs, prior, posterior = self._selection_probs(images, low_hidden, args.prompt, args.gt_maps, smooth_selection_prob)

        if no_look:
            return self._finish(batched, [h if batched else list(h.split(1)) for h in low_hidden], None, None, probs, prior, posterior)

        plans = self._plans(images, args, output_hidden_states, batched)
        look_maps, tokens, lengths, seq_image, grids, scale_off, stride = self._select_and_pack(images, probs, plans)
        embedded = self._embed_tokens(x if batched else images, tokens, grids)
        seqs = PackedSequences.from_lengths(lengths, embedded.device, prefix_index=seq_image)
        keep = self.num_hidden_layers_to_return if output_hidden_states else 1
        high = self.trunk(embedded, seqs, prefix=cache, keep_layers=keep)

        # Union of looks, per image in (scale, raster) order: upstream's output layout.
        scale_off_t = host_tensor(scale_off, embedded.device)
        order = torch.argsort(tokens.image * stride + scale_off_t[tokens.scale] + self._raster(tokens, grids))
        counts = [sum(sum(look) for look in plans[b]) for b in range(B)]
        selected = [(m >= 0).to(probs[s][0].dtype) for s, m in enumerate(look_maps)]  # one op per scale, not per image
        maps = [[selected[s][b, : h * w].view(h, w) for s, (h, w) in enumerate(grids[b])] for b in range(B)]
        looks = [[look_maps[s][b, : h * w].view(h, w) for s, (h, w) in enumerate(grids[b])] for b in range(B)] if output_look_maps else None

        if output_hidden_states:
            low_keep = low_hidden[len(low_hidden) - keep :]
            layers = [self._join(lo, hi[order], counts, batched) for lo, hi in zip(low_keep, high.hidden_states)]
            return self._finish(batched, layers, None, maps, probs, prior, posterior, looks)

        pooled = self._pooled(high.hidden_states[-1][order], tokens, order, counts, grids, scale_off, stride, args, pool_gt_token_only)
        if args.is_global_text is not None:
            pooled = torch.where(args.is_global_text, self._pool(low_hidden[-1]), pooled)
        return self._finish(batched, None, pooled if batched else list(pooled.split(1)), maps, probs, prior, posterior, looks)

    @staticmethod
    def _join(low: torch.Tensor, high: torch.Tensor, counts: list[int], batched: bool):
        """Low-res tokens then each image's high-res tokens: ``(B, N, C)``, or per-image ``(1, N_b, C)``."""
        if batched:  # equal counts: one copy, no per-image pieces
            if len(set(counts)) > 1:
                raise ValueError(
                    f"the images of this batch select different numbers of tokens {counts} (upstream fails here too); "
                    "pass pixel_values as a list of images to get per-image outputs"
                )
            return torch.cat([low, high.view(low.shape[0], counts[0], -1)], dim=1)
        return [torch.cat([lo, hi], dim=0)[None] for lo, hi in zip(low, high.split(counts))]

    @staticmethod
    def _raster(tokens: PatchTokens, grids) -> torch.Tensor:
        width = host_tensor([[gw for _, gw in gb] for gb in grids], tokens.image.device)
        return tokens.row * width[tokens.image, tokens.scale] + tokens.col

    def _plans(self, images, args: LookArgs, output_hidden_states: bool, batched: bool):
        first_n = args.first_n
        limit = max(first_n) if (batched and first_n is not None) else None
        quotas = self.max_select_num_each_scale if args.quotas is None else args.quotas
        plans = []
        for b, im in enumerate(images):
            n = [h * w for h, w in (self.feature_size_scale_i(im, s) for s in range(1, len(self.ps3_scales)))]
            if output_hidden_states:
                tokens = args.num_token_look_close[b] if isinstance(args.num_token_look_close, list) else args.num_token_look_close
                plan = plan_looks(n, quotas, args.num_look_close, tokens, first_n[b] if first_n is not None else None, limit)
            else:
                plan = plan_looks(n, quotas, 1, None)[:1]
            plans.append(plan)
        return plans

    def _pooled(self, last, tokens, order, counts, grids, scale_off, stride, args, pool_gt_token_only):
        """MAP-pool each image's high-res tokens (upstream's pre-training output).

        ``last`` holds the final layer's tokens in output order; with ``pool_gt_token_only``
        only tokens whose cell the gt map covers are pooled (all of them if it covers none).
        """
        B = len(counts)
        pad = torch.nn.utils.rnn.pad_sequence
        padded = pad(list(last.split(counts)), batch_first=True)
        valid = torch.arange(padded.shape[1], device=last.device)[None] < host_tensor(counts, last.device)[:, None]
        mask = valid
        if pool_gt_token_only:
            gt_flat = torch.zeros(B, stride, device=last.device)
            for b in range(B):  # tiny (h, w) maps of the pre-training path
                gt = args.gt_maps[b]
                for s, size in enumerate(grids[b]):
                    m = F.interpolate(gt[None, None].float(), size=size, mode="area")[0, 0].to(gt.dtype)
                    gt_flat[b, scale_off[s] : scale_off[s] + m.numel()] = m.flatten().float()
            scale_off_t = host_tensor(scale_off, last.device)
            covered = gt_flat[tokens.image[order], scale_off_t[tokens.scale[order]] + self._raster(tokens, grids)[order]] != 0
            gt_mask = pad(list(covered.split(counts)), batch_first=True)
            mask = torch.where(gt_mask.any(dim=1, keepdim=True), gt_mask, valid)
        return self._pool(padded, mask)

    @staticmethod
    def _finish(batched, layers, pooled, maps, probs, bottomup, topdown, looks=None) -> PS3VisionModelOutput:
        """Upstream's batched layout for a tensor input; per-image lists for a list input.

        ``layers`` (kept hidden layers) and ``pooled`` come already in that layout; ``maps``
        and ``looks`` (``[image][scale]``) and the probabilities (``[scale][image]``) are small
        per-image maps.
        """
        B = len(probs[0])
        if batched:
            def scales(p):
                return None if p is None else [torch.stack(s) for s in p]

            return PS3VisionModelOutput(
                last_hidden_state=None if layers is None else layers[-1],
                hidden_states=layers,
                pooled_output=pooled,
                selection_maps=None if maps is None else [torch.stack(s) for s in zip(*maps)],
                selection_probs=scales(probs),
                bottomup_selection_probs=scales(bottomup),
                topdown_selection_probs=scales(topdown),
                look_maps=None if looks is None else [torch.stack(s) for s in zip(*looks)],
            )

        def per_image(p):
            return None if p is None else [[s[b][None] for s in p] for b in range(B)]

        return PS3VisionModelOutput(
            last_hidden_state=None if layers is None else layers[-1],
            hidden_states=None if layers is None else [list(per) for per in zip(*layers)],
            pooled_output=pooled,
            selection_maps=None if maps is None else [[m[None] for m in per] for per in maps],
            selection_probs=per_image(probs),
            bottomup_selection_probs=per_image(bottomup),
            topdown_selection_probs=per_image(topdown),
            look_maps=None if looks is None else [[m[None] for m in per] for per in looks],
        )


def _describe_key(entry) -> str:
    """A loading-info entry as text; mismatches come as ``(name, checkpoint shape, model shape)``."""
    if isinstance(entry, tuple) and len(entry) == 3:
        name, stored, wanted = entry
        return f"{name}: checkpoint {tuple(stored)} vs model {tuple(wanted)}"
    return str(entry)


class PS3PreTrainedModel(PreTrainedModel):
    """Loading/saving in upstream's format; missing or unexpected weights are an error."""

    config_class = PS3Config
    base_model_prefix = "ps3"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PS3VisionEncoder"]

    # model_type values in config.json this class loads (a combined "ps3" holds both towers).
    _checkpoint_model_types: tuple[str, ...] = ("ps3",)
    _has_vision_trunk = False

    def _init_weights(self, module: nn.Module) -> None:
        """Modules initialise themselves; checkpoints overwrite everything."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """transformers' loader, strict: a missing ``config.json``, another model_type, an
        unreadable weights file (``OSError`` naming it) and missing, unexpected or mis-shaped
        weights (``ValueError`` listing them) are errors. A trunk position grid that the config
        leaves open is read from the checkpoint's ``pos_embed``."""
        wants_info = kwargs.pop("output_loading_info", False)
        if "torch_dtype" in kwargs and "dtype" not in kwargs:
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        path = pretrained_model_name_or_path
        if path is not None:  # None: transformers loads a given state_dict
            path = os.fspath(path)
            if os.path.isfile(path):
                raise OSError(f"{path} is a file; from_pretrained takes a checkpoint folder (config.json + {WEIGHTS_NAME})")
            if kwargs.get("config") is None:
                config = read_config(path, kwargs)
                if config is not None:
                    check_model_type(config, cls._checkpoint_model_types, cls.__name__, path)
        shapes = weight_shapes(path, kwargs) if path is not None else None
        if cls._has_vision_trunk and shapes is not None:
            grid = pos_embed_grid(shapes, path)
            if grid is not None:
                kwargs["trunk_pos_grid"] = grid
        kwargs["ignore_mismatched_sizes"] = True  # reported below as a ValueError listing them
        model, info = super().from_pretrained(path, *args, output_loading_info=True, **kwargs)
        problems = {k: sorted(map(_describe_key, info.get(k) or [])) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            raise ValueError(f"checkpoint {path!r} does not match {cls.__name__}: {problems}")
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' writer; a path that exists and is not a folder is an error (transformers
        only logs it and writes nothing)."""
        if os.path.exists(save_directory) and not os.path.isdir(save_directory):
            raise NotADirectoryError(f"save_directory {os.fspath(save_directory)!r} exists and is not a folder")
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs) -> None:
        """transformers' hook behind ``gradient_checkpointing_enable``: checkpoint each block
        of the vision trunk and of the text transformer."""
        for module in self.modules():
            if hasattr(module, "grad_checkpointing"):
                module.grad_checkpointing = enable


class PS3VisionModel(PS3PreTrainedModel):
    config_class = PS3VisionConfig
    main_input_name = "pixel_values"
    # Released checkpoints hold both towers (PS3Model); the vision model skips the text one.
    _keys_to_ignore_on_load_unexpected = [r"^text_model\."]
    _checkpoint_model_types = ("ps3_vision_model", "ps3")
    _has_vision_trunk = True

    def __init__(self, config: PS3VisionConfig, trunk_pos_grid: int | None = None):
        """``trunk_pos_grid``: the checkpoint's position grid, set by ``from_pretrained``."""
        super().__init__(config)
        if trunk_pos_grid is not None:
            config.adopt_pos_grid(trunk_pos_grid)
        self.vision_model = PS3VisionEncoder(config)
        self.post_init()

    def forward(
        self,
        pixel_values,
        num_look_close=None,
        num_token_look_close=None,
        prompt=None,
        gt_selection_maps=None,
        smooth_selection_prob=False,
        only_select_first_n_scale=None,
        is_global_text=None,
        pool_gt_token_only=False,
        output_hidden_states=True,
        output_look_maps=False,
        select_num_each_scale=None,
    ) -> PS3VisionModelOutput:
        """Encode images: the low-res view, then ``num_look_close`` high-res looks.

        ``pixel_values`` is ``(B, 3, H, W)`` or a list of ``(3, H, W)`` images of any sizes
        (encoded as one packed batch; outputs are then per-image lists). See the README for
        every argument; they mean what they mean upstream. ``output_look_maps`` (not
        upstream's) also returns which look selected each patch; ``select_num_each_scale`` (VILA's
        knob) replaces the config's per-look quota per high-res scale for this call only.
        """
        return self.vision_model(
            pixel_values, prompt=prompt, gt_selection_maps=gt_selection_maps, is_global_text=is_global_text,
            output_hidden_states=output_hidden_states, pool_gt_token_only=pool_gt_token_only,
            num_look_close=num_look_close, num_token_look_close=num_token_look_close,
            smooth_selection_prob=smooth_selection_prob, only_select_first_n_scale=only_select_first_n_scale,
            output_look_maps=output_look_maps, select_num_each_scale=select_num_each_scale,
        )


class PS3TextModel(PS3PreTrainedModel):
    config_class = PS3TextConfig
    main_input_name = "text"
    _keys_to_ignore_on_load_unexpected = [r"^vision_model\."]
    _checkpoint_model_types = ("ps3_text_model", "ps3")

    def __init__(self, config: PS3TextConfig):
        super().__init__(config)
        self.text_model = TextTransformer(config)
        self.post_init()

    def forward(self, text: torch.Tensor):
        return self.text_model(text)


class PS3Model(PS3PreTrainedModel):
    config_class = PS3Config
    main_input_name = "pixel_values"
    _has_vision_trunk = True

    def __init__(self, config: PS3Config, trunk_pos_grid: int | None = None):
        super().__init__(config)
        if not isinstance(config.text_config, PS3TextConfig) or not isinstance(config.vision_config, PS3VisionConfig):
            raise TypeError("PS3Config needs a PS3TextConfig text_config and a PS3VisionConfig vision_config")
        if trunk_pos_grid is not None:
            config.vision_config.adopt_pos_grid(trunk_pos_grid)
        self.text_model = TextTransformer(config.text_config)
        self.vision_model = PS3VisionEncoder(config.vision_config)
        self.post_init()

    def encode_text(self, text: torch.Tensor):
        return self.text_model(text)

    def encode_image(self, pixel_values, **kwargs) -> PS3VisionModelOutput:
        """Same arguments as :meth:`PS3VisionModel.forward`."""
        return PS3VisionModel.forward(self, pixel_values, **kwargs)
