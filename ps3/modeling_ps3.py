"""PS3 vision/text models with upstream's API and checkpoint format.

:class:`PS3VisionEncoder` owns the parameters (upstream's ``vision_model.*`` names) and runs
PS3 in order, delegating to ``geometry`` (sizes, resize), ``selection`` (probabilities per
scale, look layout), ``selection_plan`` (quotas), ``vit`` (trunk) and ``outputs``. Unlike
upstream, all looks of all images run as one packed varlen batch whose sequences attend to
their image's low-res KV cache; upstream loops over looks, concatenating the cache onto K/V.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import PreTrainedModel

from ps3_kernels import assign_looks, selection_probs, sparse_patch_embed
from ps3_kernels.layout import device_table

from .checkpoint import WEIGHTS_NAME, check_model_type, pos_embed_grid, read_config, weight_shapes
from .configuration_ps3 import PS3Config, PS3TextConfig, PS3VisionConfig
from .convnext import ShallowConvNet
from .geometry import ScaleGeometry, resize_all
from .outputs import PS3VisionModelOutput, assemble, feature_maps, join_layer, pool_each
from .selection import LookLayout, SelectionProbs, per_scale
from .selection_plan import default_quotas, look_quotas, plan_batch
from .text_transformer import TextTransformer
from .steps import (carried_quotas, check_disjoint, check_kv_cache, check_maps, check_steps, look_from_maps, merge_order,
                    selected, cache_views)
from .validation import (LookArgs, check_first_n, check_flag, check_gt_maps, check_images, check_look_args,
                         check_map, check_num_select_token, check_prompt, values_checkable)
from .vit import Mlp, PackedSequences, TrunkOutput, VisionTrunk

HIGHRES_SELECTION_SIZE = 1512  # upstream scores saliency on a fixed 1512x1512 view


def _hw(x: torch.Tensor | tuple[int, int]) -> tuple[int, int]:
    """An image's ``(H, W)``: the last two dims of a tensor, or the pair itself."""
    return tuple(x.shape[-2:]) if isinstance(x, torch.Tensor) else x


class PS3VisionEncoder(nn.Module):
    """Upstream's ``vision_model``: trunk, selection heads, per-scale position residuals."""

    def __init__(self, config: PS3VisionConfig, **kwargs):
        """``kwargs``: upstream's ``patch_dropout``, which must be 0 (PS3 needs every low-res token)."""
        super().__init__()
        if set(kwargs) - {"patch_dropout"}:
            raise TypeError(f"PS3VisionEncoder got unexpected keyword arguments {sorted(set(kwargs) - {'patch_dropout'})}")
        if kwargs.get("patch_dropout", 0):
            raise ValueError(f"patch_dropout must be 0 (PS3 needs the whole low-res feature map), "
                             f"got {kwargs['patch_dropout']}")
        self.config = config
        self.spec = spec = config.trunk_spec()
        self.ps3_scales = list(config.ps3_scales)
        self.geometry = ScaleGeometry(tuple(self.ps3_scales), spec.patch_size)
        self.trunk = VisionTrunk(spec)
        self.width, self.layers, self.patch_size = spec.width, spec.depth, spec.patch_size
        self.s3_image_size = self.ps3_scales[-1]
        self.num_hidden_layers_to_return = self.layers
        self.low_res_token_num = (self.ps3_scales[0] // self.patch_size) ** 2
        quotas = config.max_select_num_each_scale
        quotas = default_quotas(config.max_select_num, self.ps3_scales) if quotas is None else list(quotas)
        self.max_select_num_each_scale = quotas
        num_high, num_sel = len(self.ps3_scales) - 1, len(config.select_based_on_layer)
        if any(not -spec.depth <= i < spec.depth for i in config.select_based_on_layer):
            raise ValueError(f"config.select_based_on_layer={config.select_based_on_layer} must index the {spec.depth} layers")
        if len(quotas) != num_high or any(isinstance(q, bool) or not isinstance(q, int) or q < 0 for q in quotas):
            raise ValueError(f"config.max_select_num_each_scale={config.max_select_num_each_scale} needs one int >= 0 per "
                             f"high-res scale ({num_high})")
        self.selection_feature_proj = Mlp(self.width * num_sel, self.width * num_sel, self.width * num_high, norm=True)
        self.prior_prompt = nn.Parameter(torch.randn(self.width))
        if config.separate_pos_emb:
            self.pos_emb_residual = nn.ParameterList(
                [nn.Parameter(torch.zeros(1, (s // self.patch_size) ** 2, self.width)) for s in self.ps3_scales[1:]])
        if config.highres_selection_feature:
            out_dim = config.highres_selection_module_out_dim
            self.highres_selection_feature_module = ShallowConvNet(
                config.highres_selection_module_hidden_dim, out_dim, config.highres_selection_module_depth,
                config.highres_selection_module_kernel_size)
            self.prompt_proj_for_highres = nn.Linear(self.width, out_dim * num_high)

    @property
    def gradient_checkpointing(self) -> bool:
        """Upstream's flag (a placeholder there); here it switches the trunk's block checkpointing."""
        return self.trunk.grad_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enable: bool) -> None:
        self.trunk.set_grad_checkpointing(check_flag("gradient_checkpointing", enable))

    @property
    def s3_scales(self) -> list[int]:
        """Alias VILA reads (``mm_scale_num``, dynamic aspect ratios)."""
        return self.ps3_scales

    def token_selection_param_names(self) -> list[str]:
        """Modules that only serve patch selection (VILA's ``tune_top_down_selection``)."""
        return ["selection_feature_proj", "highres_selection_feature_module", "prompt_proj_for_highres"]

    # ----- geometry of an image (a tensor or its (H, W)), see ScaleGeometry -----

    def image_size_scale_i(self, x: torch.Tensor | tuple[int, int], scale_idx: int) -> tuple[int, int]:
        """Size the image is resized to at ``scale_idx``; scale 0 is always square."""
        return self.geometry.image_size(_hw(x), scale_idx)

    def feature_size_scale_i(self, x: torch.Tensor | tuple[int, int], scale_idx: int) -> tuple[int, int]:
        return self.geometry.grid(_hw(x), scale_idx)

    def max_highres_token_num(self, x: torch.Tensor | tuple[int, int], only_select_first_n_scale=None) -> int:
        n = len(self.ps3_scales) - 1 if only_select_first_n_scale is None else max(only_select_first_n_scale)
        grids = self.geometry.highres_grids(_hw(x))
        return sum(h * w for h, w in grids[:n])

    # ----- trunk passes -----

    def _check_pos_grid(self, size: tuple[int, int]) -> None:
        grid = self.trunk.grid_size
        if size != (grid, grid) and not self.config.dynamic_img_size:
            raise ValueError(f"config.dynamic_img_size is off, so the trunk's position embedding only fits its {grid}x{grid} "
                             f"grid (img_size {self.spec.img_size}), but this input needs {size[0]}x{size[1]}; upstream's "
                             "timm trunk refuses such inputs too. Set dynamic_img_size=True to resample it.")
        self.trunk.check_pos_grid(size)

    def _pos_table(self, size: tuple[int, int]) -> torch.Tensor:
        self._check_pos_grid(size)
        return self.trunk.pos_table(size)

    def pos_embed_for_grid(self, h: int, w: int, exact: bool = False) -> torch.Tensor:
        """Position embedding of an ``(h, w)`` token grid, ``(h*w, C)``.

        PS3 resamples the square table to ``max(h, w)`` and crops ``[:h, :w]``; ``exact``
        resamples straight to ``(h, w)`` instead (LLaVA-UHD's slices). A C-RADIO trunk crops
        its table to ``[:h, :w]`` either way, as upstream's CPE does.
        """
        if exact or self.spec.cropped_pos_embed:
            return self._pos_table((h, w))
        side = max(h, w)
        return self._pos_table((side, side)).view(side, side, -1)[:h, :w].reshape(h * w, -1)

    def encode_dense(self, pixel_values: torch.Tensor, return_kv: bool = False, keep_layers: int | None = None,
                     exact_pos_embed: bool = False):
        """Dense ViT pass over whole images ``(B, 3, H, W)`` (H, W multiples of the patch).

        Returns the hidden states ``(B, h*w, C)`` of the last ``keep_layers`` layers (all by
        default) and, if asked, the K/V cache: per layer ``(2, B, heads, h*w, head_dim)``, views
        of the K and V the trunk keeps of each layer (one copy per layer, without q; the attention
        ops read the views as they are). ``cache[i]``
        is layer ``i``'s ``(k, v)``, the prefix the trunk takes; ``torch.stack(cache)`` is upstream's
        ``(layers, 2, B, heads, h*w, head_dim)`` layout. This is
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
        return hidden, cache_views(out.kv_cache, B, h * w) if return_kv else None

    def _look_pos_rows(self, layout: LookLayout) -> torch.Tensor:
        """Each token's position embedding row, ``(tokens, C)``. Each look grid is the top-left
        corner of a square table: one resampled table per distinct side, made one at a time, or
        for a C-RADIO trunk the native table itself, read in place (no table is concatenated)."""
        side = [[max(g) for g in gb] for gb in layout.grids]
        sides = sorted({s for row in side for s in row})
        if self.spec.cropped_pos_embed:
            for s in sides:
                self._check_pos_grid((s, s))
            native = [[self.trunk.grid_size] * len(row) for row in side]
            return layout.grid_rows([self.trunk.pos_embed[0]], [[0] * len(row) for row in side], native)
        tables = (self._pos_table((s, s)) for s in sides)  # made one at a time
        return layout.grid_rows(tables, [[sides.index(s) for s in row] for row in side], side)

    def _encode_looks(self, images, layout: LookLayout, cache, keep: int, return_kv: bool = False) -> TrunkOutput:
        """The selected patches embedded (:meth:`_embed_looks`) and run through the trunk as one
        packed batch, each look's sequence attending to its image's K/V ``cache`` (none if None)."""
        tokens = self._embed_looks(images, layout)
        prefix_index = layout.seq_image if cache is not None else None
        seqs = PackedSequences.from_lengths(layout.lengths, tokens.device, prefix_index=prefix_index)
        return self.trunk(tokens, seqs, prefix=cache, keep_layers=keep, return_kv=return_kv)

    def _embed_looks(self, images, layout: LookLayout) -> torch.Tensor:
        """The selected patches of ``layout`` embedded, ``(tokens, C)``: sparse patch embed plus each
        token's position rows. ``images``: the (B, 3, H, W) batch (read in place) or a list."""
        pos = self._look_pos_rows(layout)
        num_images = len(layout.grids)
        if self.config.separate_pos_emb:
            full = [s // self.patch_size for s in self.ps3_scales[1:]]
            residuals = [r.view(r.shape[1:]) for r in self.pos_emb_residual]  # a view: its gradient is not copied
            pos = pos + layout.grid_rows(residuals, [list(range(len(full)))] * num_images, [full] * num_images)
        if not sum(layout.lengths):
            return pos  # (0, C): no look took a token
        hw = [images.shape[-2:]] * num_images if isinstance(images, torch.Tensor) else [im.shape[-2:] for im in images]
        sizes = [[self.geometry.image_size(size, s) for s in range(1, len(self.ps3_scales))] for size in hw]
        proj = self.trunk.patch_embed.proj
        return sparse_patch_embed(images, sizes, layout.tokens, proj.weight, proj.bias, pos, None)

    def pool(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk's MAP head over ``(B, N, width)`` tokens after its final norm (and a C-RADIO
        trunk's adapter); ``mask``: the ones to pool. ``(B, pool width)``: 1152 for PS3-C-RADIO."""
        return self.trunk.pool(tokens, mask)

    # ----- selection scoring -----

    def _selection_probs(self, images, low_hidden, grids, args: LookArgs, smooth: bool) -> SelectionProbs:
        """Cosine of the projected low-res features (averaged with the 1512 px ConvNet view's)
        with the prior and with the prompt, as probabilities on every high-res grid. ``images``:
        the (B, 3, H, W) batch or the list of images."""
        g = self.ps3_scales[0] // self.patch_size
        feats = torch.cat([low_hidden[i] for i in self.config.select_based_on_layer], dim=-1).view(len(images), g, g, -1)
        highres = None
        if self.config.highres_selection_feature:
            highres = self.highres_selection_feature_module(resize_all(images, (HIGHRES_SELECTION_SIZE,) * 2))
        return self._score(feats, highres, args.prompt, grids, args.gt_maps, smooth)

    def _score(self, feats: torch.Tensor, highres: torch.Tensor | None, prompt: torch.Tensor | None, grids,
               gt_maps: list[torch.Tensor] | None, smooth: bool) -> SelectionProbs:
        """Selection probabilities from the ``(B, h, w, C_sel)`` selection-layer states and the
        ConvNet's map (or None), per image's high-res ``grids``."""
        feats = self.selection_feature_proj(feats)[..., : self.width]  # every scale uses the first map
        feats = feats.permute(0, 3, 1, 2)

        def probs_for(p: torch.Tensor) -> torch.Tensor:
            hp = None if highres is None else self.prompt_proj_for_highres(p)[:, : self.config.highres_selection_module_out_dim]
            return selection_probs(feats, p, highres, hp)

        prior = probs_for(self.prior_prompt[None].expand(len(feats), -1))
        posterior = probs_for(prompt) if prompt is not None else None
        chosen = prior if posterior is None else posterior  # the prompt's map, with gt maps and smoothing
        return SelectionProbs(per_scale(chosen, grids, gt_maps, smooth), per_scale(prior, grids),
                              None if posterior is None else per_scale(posterior, grids))

    def format_features_into_feature_maps(self, features: torch.Tensor, selection_maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Scatter ``(B, N, C)`` features (low-res first) into zero-filled ``(B, C, h, w)`` maps per scale."""
        return feature_maps(features, selection_maps, self.ps3_scales[0] // self.patch_size, len(self.ps3_scales) - 1)

    # ----- upstream's step-by-step API: the forward's steps as separate calls -----
    # Upstream's research code drives looks by hand with these (encode the low-res view once, then
    # choose and encode looks). They run on the forward's building blocks: the packed trunk, the
    # ops and the look layout; upstream's dense (B, h, w) maps and (layers, 2, B, heads, N,
    # head_dim) KV cache are their interface.

    def _kept_layers(self) -> int:
        """How many of the last layers the hidden states hold: upstream slices them with
        ``[-num_hidden_layers_to_return:]``, so 0 (or more than the depth) means all."""
        return len(range(self.layers)[-self.num_hidden_layers_to_return:])

    def _check_input(self, image: torch.Tensor) -> None:
        weight = self.trunk.pos_embed
        if image.dtype != weight.dtype or image.device != weight.device:
            raise TypeError(f"pixel_values are {image.dtype} on {image.device} but the model is {weight.dtype} on "
                            f"{weight.device}; move/cast them first (e.g. x.to(model.device, model.dtype))")

    def _batch(self, x) -> tuple[torch.Tensor, tuple[tuple[int, int], ...]]:
        """``x`` checked as a (B, 3, H, W) batch of the model's dtype and device, and its high-res grids."""
        images, batched = check_images(x, self.ps3_scales[0], self.patch_size)
        if not batched:
            raise TypeError("this method takes the images as one (B, 3, H, W) tensor, as upstream's does")
        self._check_input(images[0])
        return x, self.geometry.highres_grids(x.shape[-2:])

    def _look_layout(self, x: torch.Tensor, grids, selection_maps) -> tuple[LookLayout, int]:
        """One look per image on the given maps, packed, and its tokens per image. Reads the maps'
        per-image counts on the host: they size the packed tokens (a device sync for GPU maps)."""
        B = x.shape[0]
        maps = check_maps("selection_maps", selection_maps, B, len(grids), x.device, grids)
        look_maps, plans = look_from_maps(selected(maps))
        totals = sorted({sum(p[0]) for p in plans})
        if len(totals) > 1:
            raise ValueError(f"selection_maps select {[sum(p[0]) for p in plans]} patches per image; the (B, N, C) "
                             "tokens need the same number for every image (upstream fails here too)")
        if totals[0] == 0:
            raise ValueError("selection_maps select no patch")
        return LookLayout.pack(look_maps, plans, [grids] * B), totals[0]

    def resize_to_scale_i(self, x: torch.Tensor, scale_idx: int) -> torch.Tensor:
        """``x`` (B, C, H, W) bicubic-resized to :meth:`image_size_scale_i`, in ``x``'s dtype as
        upstream does (its passes call it on ``x.float()``; the high-res pass here never
        materialises the resized image)."""
        return F.interpolate(x, size=self.image_size_scale_i(x, scale_idx), mode="bicubic")

    def forward_low_res(self, x, output_hidden_states: bool = False, return_kv_cache: bool = False) -> dict:
        """The low-res pass alone: ``{"x": (B, C) MAP-pooled embedding, "hidden_states": every
        layer's (B, N, C) or None, "output_kv_cache": (layers, 2, B, heads, N, head_dim) or None}``,
        the cache :meth:`forward_high_res` attends to. ``x``: a (B, 3, H, W) batch or (beyond
        upstream) a list of (3, H, W) images of any sizes. No host sync."""
        images, batched = check_images(x, self.ps3_scales[0], self.patch_size)
        self._check_input(images[0])
        output_hidden_states = check_flag("output_hidden_states", output_hidden_states)
        return_kv_cache = check_flag("return_kv_cache", return_kv_cache)
        pixels = x if batched else images  # a batch is resized as one tensor, never restacked
        hidden, cache = self.encode_dense(resize_all(pixels, (self.ps3_scales[0],) * 2), return_kv=return_kv_cache,
                                          keep_layers=None if output_hidden_states else 1)
        return {"x": self.pool(hidden[-1]), "hidden_states": hidden if output_hidden_states else None,
                "output_kv_cache": torch.stack(cache) if return_kv_cache else None}

    def get_selection_probs(self, input: torch.Tensor, feature_map: torch.Tensor, highres_feature_map=None, prompt=None,
                            gt_selection_maps=None, smooth_selection_prob: bool = False):
        """``(select_probs, prior_select_probs, posterior_select_probs)``, each a list of (B, h, w)
        maps, one per high-res scale (the posterior None without a prompt). ``feature_map``: the
        ``select_based_on_layer`` states as (B, C * layers, h, w); ``highres_feature_map``: the
        ConvNet's (B, C', H', W') map of the 1512 px view, or None to score without it; ``input``
        gives the sizes only (its pixels and dtype are not read). Uses the fused scoring op; no host sync."""
        if not isinstance(input, torch.Tensor) or input.dim() != 4:
            got = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input).__name__
            raise ValueError(f"input must be the (B, 3, H, W) images (for their sizes), got {got}")
        B, device = input.shape[0], self.trunk.pos_embed.device
        grids = self.geometry.highres_grids(input.shape[-2:])
        c_sel = self.width * len(self.config.select_based_on_layer)
        check_map("feature_map", feature_map, (B, c_sel), "the select_based_on_layer states", device)
        if highres_feature_map is not None:
            if not self.config.highres_selection_feature:
                raise ValueError("highres_feature_map needs a model with config.highres_selection_feature")
            check_map("highres_feature_map", highres_feature_map, (B, self.config.highres_selection_module_out_dim),
                      "the ConvNet's map of the 1512 px view", device)
        prompt = check_prompt(prompt, B, self.width, device, feature_map.dtype)
        gt_maps = check_gt_maps(gt_selection_maps, B, device)
        smooth = check_flag("smooth_selection_prob", smooth_selection_prob)
        probs = self._score(feature_map.permute(0, 2, 3, 1), highres_feature_map, prompt, [grids] * B, gt_maps, smooth)
        chosen, prior, posterior = ([torch.stack(s) for s in p] if p is not None else None
                                    for p in (probs.chosen, probs.bottomup, probs.topdown))
        return chosen, prior, posterior

    @torch.no_grad()
    def get_selection_maps(self, select_probs, old_selection_maps=None, num_select_token=None,
                           only_select_first_n_scale=None) -> list[torch.Tensor]:
        """One look's 0/1 maps (B, h, w) per high-res scale, in ``select_probs``' dtype: each scale's
        quota (``max_select_num_each_scale``, or ``num_select_token`` split the same way; moved to
        the first scales by ``only_select_first_n_scale``, an int or one per image) of the most
        probable patches not in ``old_selection_maps`` (non-zero = taken); a scale with too few
        patches left passes the rest of its quota to the next. Ties: lower raster index first.
        Quotas are carried over on the device and the top-k is one ``assign_looks`` per scale
        for the whole batch: no host sync and no per-image loop. A quota left negative (upstream's
        top-k fails on it) is a ``ValueError`` where checkable (CPU, checked mode), else 0."""
        num_high = len(self.ps3_scales) - 1
        first = select_probs[0] if isinstance(select_probs, (list, tuple)) and select_probs else None
        if not isinstance(first, torch.Tensor):
            raise ValueError(f"select_probs must be a list of {num_high} (B, h, w) tensors, one per high-res scale")
        B, device = first.shape[0], first.device
        probs = check_maps("select_probs", select_probs, B, num_high, device)
        if not all(p.is_floating_point() for p in probs):
            raise TypeError(f"select_probs must be floating point, got {[p.dtype for p in probs]}")
        grids = [tuple(p.shape[1:]) for p in probs]
        flat = [p.reshape(B, -1) for p in probs]
        if old_selection_maps is not None:
            taken = selected(check_maps("old_selection_maps", old_selection_maps, B, num_high, device, grids))
            flat = [torch.where(t, -1.0, f) for t, f in zip(taken, flat)]  # upstream's mark of taken patches
            available = [(~t).sum(1) for t in taken]
        else:
            available = [device_table([f.shape[1]] * B, device) for f in flat]
        num_select_token = check_num_select_token(num_select_token, sum(self.max_select_num_each_scale))
        first_n = check_first_n(only_select_first_n_scale, B, num_high)
        base = [look_quotas(self.max_select_num_each_scale, num_select_token, f, "num_select_token")
                for f in first_n or [None] * B]
        quotas = carried_quotas(base, available)
        if any(q < 0 for row in base for q in row):  # only a carry-over can lift it to >= 0, as upstream
            if values_checkable(quotas[-1]) and any(bool((q < 0).any()) for q in quotas):
                raise ValueError(f"only_select_first_n_scale={only_select_first_n_scale!r} leaves negative quotas {base} "
                                 "(upstream's top-k fails on this setting too); use a larger value")
            quotas = [q.clamp(min=0) for q in quotas]
        return [(assign_looks(f, q[:, None]) == 0).to(p.dtype).view_as(p) for f, q, p in zip(flat, quotas, probs)]

    def update_selection_maps(self, old_selection_maps, new_selection_maps) -> list[torch.Tensor]:
        """The union ``old + new`` of two looks' maps per scale. Overlapping maps are an error where
        checking costs no device sync (CPU maps, or checked mode; upstream always syncs here)."""
        first = old_selection_maps[0] if isinstance(old_selection_maps, (list, tuple)) and old_selection_maps else None
        if not isinstance(first, torch.Tensor):
            raise ValueError("old_selection_maps must be a list of (B, h, w) tensors, one per high-res scale")
        B, num = first.shape[0], len(old_selection_maps)
        old = check_maps("old_selection_maps", old_selection_maps, B, num, first.device)
        new = check_maps("new_selection_maps", new_selection_maps, B, num, first.device, [tuple(m.shape[1:]) for m in old])
        check_disjoint("old_selection_maps and new_selection_maps", selected(old), selected(new))
        return [o + n for o, n in zip(old, new)]

    def aggregate_features(self, features_each_step, selection_maps_each_step) -> list[torch.Tensor]:
        """Several looks' features merged per layer into (B, N_total, C) in raster order of the
        union of their maps (scale, then row-major), as :meth:`forward` orders the high-res tokens.
        ``features_each_step[step][layer]``: (B, n_step, C); ``selection_maps_each_step[step]``:
        that look's maps (disjoint looks; checked where that needs no device sync). One sort
        and one gather per layer; no host sync (the counts come from the features' shapes).
        Keeps the features' dtype (upstream casts them to the maps' dtype)."""
        counts, sel = check_steps(features_each_step, selection_maps_each_step)
        C = features_each_step[0][0].shape[2]
        order = merge_order(sel, counts)[..., None].expand(-1, -1, C)
        layers = range(len(features_each_step[0]))
        return [torch.cat([feats[layer] for feats in features_each_step], dim=1).gather(1, order) for layer in layers]

    def tokenize_high_res(self, input: torch.Tensor, selection_maps) -> torch.Tensor:
        """The selected patches' tokens (B, N, C) (patch embed + resampled position embedding +
        the scale's residual), per image in scale then raster order, sampled straight from
        ``input`` by the sparse patch-embed op. Beyond upstream, the images may select different
        numbers per scale as long as their totals agree. One host sync: the maps' counts."""
        x, grids = self._batch(input)
        layout, n = self._look_layout(x, grids, selection_maps)
        return self._embed_looks(x, layout).view(x.shape[0], n, self.width)

    def forward_high_res(self, x: torch.Tensor, selection_maps, kv_cache=None, output_hidden_states: bool = False,
                         pool_gt_token_only: bool = False, gt_selection_maps=None, return_kv_cache: bool = False) -> dict:
        """One look on the given ``selection_maps`` (B, h, w) per high-res scale, its tokens
        attending to ``kv_cache`` (as :meth:`forward_low_res` or this method returns it; None:
        to nothing but themselves): ``{"x": (B, C) MAP-pooled tokens (over those in the gt maps
        with ``pool_gt_token_only``), "hidden_states": the last ``num_hidden_layers_to_return``
        layers' (B, N, C) or None, "output_kv_cache": (layers, 2, B, heads, P + N, head_dim)
        [cache; own] or None}``. All images run as one packed batch (upstream loops over images
        whose per-scale counts differ). One host sync: the maps' counts size the tokens."""
        x, grids = self._batch(x)
        output_hidden_states = check_flag("output_hidden_states", output_hidden_states)
        pool_gt_token_only = check_flag("pool_gt_token_only", pool_gt_token_only)
        return_kv_cache = check_flag("return_kv_cache", return_kv_cache)
        B = x.shape[0]
        check_kv_cache(kv_cache, self.layers, B, self.spec.num_heads, self.spec.head_dim, x.device)
        gt_maps = check_gt_maps(gt_selection_maps, B, x.device)
        if pool_gt_token_only and gt_maps is None:
            raise ValueError("pool_gt_token_only needs gt_selection_maps")
        layout, n = self._look_layout(x, grids, selection_maps)
        keep = self._kept_layers() if output_hidden_states else 1
        out = self._encode_looks(x, layout, kv_cache, keep, return_kv=return_kv_cache)
        hidden = [h.view(B, n, -1) for h in out.hidden_states]
        if pool_gt_token_only:
            pooled = pool_each(self.pool, list(hidden[-1]), list(layout.gt_cover(gt_maps, layout.key).view(B, n)))
        else:
            pooled = self.pool(hidden[-1])
        cache = None
        if return_kv_cache:
            cache = torch.stack(cache_views(out.kv_cache, B, n))
            cache = cache if kv_cache is None else torch.cat([kv_cache, cache], dim=-2)
        return {"x": pooled, "hidden_states": hidden if output_hidden_states else None, "output_kv_cache": cache}

    # ----- forward -----

    def forward(self, x, prompt: torch.Tensor | None = None, gt_selection_maps=None, is_global_text: torch.Tensor | None = None,
                output_hidden_states: bool = False, pool_gt_token_only: bool = False, num_look_close=None,
                num_token_look_close=None, smooth_selection_prob: bool = False, only_select_first_n_scale=None,
                output_look_maps: bool = False, select_num_each_scale=None) -> PS3VisionModelOutput:
        """PS3 in the order of its algorithm: low-res pass, selection scoring, looks, high-res pass, output."""
        images, batched = check_images(x, self.ps3_scales[0], self.patch_size)
        if not isinstance(output_look_maps, bool):
            raise TypeError(f"output_look_maps must be a bool, got {type(output_look_maps).__name__}")
        self._check_input(images[0])
        args = check_look_args(images, batched, self.width, len(self.ps3_scales) - 1, prompt, gt_selection_maps,
                               is_global_text, output_hidden_states, pool_gt_token_only, num_look_close,
                               num_token_look_close, only_select_first_n_scale, select_num_each_scale)
        smooth_selection_prob = check_flag("smooth_selection_prob", smooth_selection_prob)
        grids = [self.geometry.highres_grids(im.shape[-2:]) for im in images]
        no_look = output_hidden_states and (num_look_close == 0 or num_token_look_close == 0)

        # 1. Low-res pass: every image at the first scale; each layer's K/V is kept for the looks.
        pixels = x if batched else images  # a batch is resized as one tensor, never restacked
        low_hidden, cache = self.encode_dense(resize_all(pixels, (self.ps3_scales[0],) * 2), return_kv=not no_look)
        # 2. Selection scoring: each patch's probability at every high-res scale.
        probs = self._selection_probs(pixels, low_hidden, grids, args, smooth_selection_prob)
        if no_look:
            return assemble(batched, [h if batched else list(h.split(1)) for h in low_hidden], None, None, probs)

        # 3. Looks: quotas per look and scale (host ints), then each look's patches, packed.
        quotas = self.max_select_num_each_scale if args.quotas is None else args.quotas
        plans = plan_batch([[h * w for h, w in g] for g in grids], quotas, args, output_hidden_states, batched)
        layout = LookLayout.select(probs.chosen, plans, grids)
        # 4. High-res pass: all looks of all images as one packed batch over the low-res cache.
        keep = self._kept_layers() if output_hidden_states else 1
        high = self._encode_looks(pixels, layout, cache, keep)

        # 5. Output: each image's looks merged in (scale, raster) order after its low-res tokens.
        key, order = torch.sort(layout.key)
        counts = [sum(map(sum, p)) for p in plans]  # high-res tokens per image
        maps = layout.per_image([(m >= 0).to(probs.chosen[0][0].dtype) for m in layout.look_maps])
        looks = layout.per_image(layout.look_maps) if output_look_maps else None
        if output_hidden_states:
            low_keep = low_hidden[len(low_hidden) - keep :]
            layers = [join_layer(lo, hi[order], counts, batched) for lo, hi in zip(low_keep, high.hidden_states)]
            return assemble(batched, layers, None, maps, probs, looks)
        cover = layout.gt_cover(args.gt_maps, key).split(counts) if pool_gt_token_only else None
        pooled = pool_each(self.pool, high.hidden_states[-1][order].split(counts), cover)
        if args.is_global_text is not None:
            pooled = torch.where(args.is_global_text, self.pool(low_hidden[-1]), pooled)
        return assemble(batched, None, pooled if batched else list(pooled.split(1)), maps, probs, looks)


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


class _EncodesImages:
    """The image call with upstream's arguments and defaults, shared by
    :meth:`PS3VisionModel.forward` and :meth:`PS3Model.encode_image`."""

    vision_model: PS3VisionEncoder

    def encode_image(self, pixel_values, num_look_close=None, num_token_look_close=None, prompt=None, gt_selection_maps=None,
                     smooth_selection_prob=False, only_select_first_n_scale=None, is_global_text=None,
                     pool_gt_token_only=False, output_hidden_states=True, output_look_maps=False,
                     select_num_each_scale=None) -> PS3VisionModelOutput:
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


class PS3VisionModel(_EncodesImages, PS3PreTrainedModel):
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

    forward = _EncodesImages.encode_image


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


class PS3Model(_EncodesImages, PS3PreTrainedModel):
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
