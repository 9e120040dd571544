"""Configurations, field-compatible with upstream PS3's ``config.json`` files.

Upstream builds its ViT trunk by ``timm`` name. This package needs no timm: the known trunks
are described in :data:`KNOWN_TRUNKS`, and any other ``model_name`` is defined by the
explicit fields ``depth``, ``num_heads``, ``mlp_ratio`` and ``patch_size`` (width is
``hidden_size``), which is how small random test models are written.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class TrunkSpec:
    """Shape of the ViT trunk (SigLIP style: no class token, MAP attention-pool head)."""

    width: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    img_size: int

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


KNOWN_TRUNKS: dict[str, dict] = {
    "vit_so400m_patch14_siglip_378": dict(depth=27, num_heads=16, mlp_ratio=3.7362, patch_size=14, img_size=378),
    "vit_so400m_patch14_siglip_384": dict(depth=27, num_heads=16, mlp_ratio=3.7362, patch_size=14, img_size=384),
}

_EXPLICIT_TRUNK_FIELDS = ("depth", "num_heads", "mlp_ratio", "patch_size")


class PS3VisionConfig(PretrainedConfig):
    model_type = "ps3_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        model_name: str | None = None,
        hidden_size: int = 1152,
        pool: str = "map",
        drop_path: float | None = None,
        patch_drop: float | None = None,
        pretrained: bool = False,
        dynamic_img_size: bool = True,
        ps3_scales: list[int] | None = None,
        select_based_on_layer: list[int] | None = None,
        max_select_num: int = 1280,
        max_select_num_each_scale: list[int] | None = None,
        separate_pos_emb: bool = True,
        highres_selection_feature: bool = True,
        highres_selection_module_hidden_dim: int = 512,
        highres_selection_module_out_dim: int = 512,
        highres_selection_module_depth: int = 3,
        highres_selection_module_kernel_size: int = 28,
        radio: bool = False,
        img_size: int | None = None,
        drop: float = 0.0,
        class_token: bool | None = None,
        final_norm: bool = False,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float | None = None,
        patch_size: int | None = None,
        **kwargs,
    ):
        # Upstream writes these dummies for VILA; they are derived, never read back.
        for derived in ("vision_tower_name", "image_size"):
            kwargs.pop(derived, None)
        super().__init__(**kwargs)
        self.model_name = model_name
        self.hidden_size = hidden_size
        self.pool = pool
        self.drop_path = drop_path
        self.patch_drop = patch_drop
        self.pretrained = pretrained
        self.dynamic_img_size = dynamic_img_size
        self.ps3_scales = sorted(ps3_scales) if ps3_scales is not None else [378, 756, 1512]
        self.select_based_on_layer = list(select_based_on_layer) if select_based_on_layer is not None else [0, 9, 18, 26]
        self.max_select_num = max_select_num
        self.max_select_num_each_scale = max_select_num_each_scale
        self.separate_pos_emb = separate_pos_emb
        self.highres_selection_feature = highres_selection_feature
        self.highres_selection_module_hidden_dim = highres_selection_module_hidden_dim
        self.highres_selection_module_out_dim = highres_selection_module_out_dim
        self.highres_selection_module_depth = highres_selection_module_depth
        self.highres_selection_module_kernel_size = highres_selection_module_kernel_size
        self.radio = radio
        self.img_size = img_size
        self.drop = drop
        self.class_token = class_token
        self.final_norm = final_norm
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.patch_size = patch_size if patch_size is not None else 14
        self.vision_tower_name = model_name
        self.image_size = self.ps3_scales[-1]

    def trunk_spec(self) -> TrunkSpec:
        """Resolve the trunk's shape from :data:`KNOWN_TRUNKS` or the explicit fields.

        The position table's native size is ``img_size`` when set (as upstream passes it to
        timm), else the known trunk's own, else the low-res scale. ``from_pretrained`` fills
        ``img_size`` from the checkpoint's ``pos_embed`` when the config is silent.
        """
        if self.radio:
            raise ValueError("config.radio=True (C-RADIO trunks) is not supported by this package")
        if self.class_token:
            raise ValueError("config.class_token must be false: PS3 trunks have no prefix tokens")
        for name in ("drop_path", "patch_drop"):
            if getattr(self, name):
                raise ValueError(f"config.{name}={getattr(self, name)} is not supported (stochastic depth / patch dropout)")
        if self.model_name in KNOWN_TRUNKS:
            fields = dict(KNOWN_TRUNKS[self.model_name])
        else:
            missing = [f for f in _EXPLICIT_TRUNK_FIELDS if getattr(self, f, None) is None]
            if missing:
                raise ValueError(
                    f"config.model_name={self.model_name!r} is not a known trunk {sorted(KNOWN_TRUNKS)}; "
                    f"define it with the config fields {list(_EXPLICIT_TRUNK_FIELDS)} (missing: {missing})"
                )
            fields = {f: getattr(self, f) for f in _EXPLICIT_TRUNK_FIELDS}
            fields["img_size"] = self.ps3_scales[0]
        if self.img_size is not None:
            fields["img_size"] = self.img_size
        fields["width"] = self.hidden_size
        for name in ("width", "depth", "num_heads", "patch_size", "img_size"):
            value = fields[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                label = "hidden_size" if name == "width" else name
                raise ValueError(f"config.{label} must be a positive int, got {value!r}")
        ratio = fields["mlp_ratio"]
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
            raise ValueError(f"config.mlp_ratio must be a positive number, got {ratio!r}")
        if fields["width"] % fields["num_heads"]:
            raise ValueError(f"config.hidden_size={fields['width']} must be divisible by num_heads={fields['num_heads']}")
        if fields["img_size"] < fields["patch_size"]:
            raise ValueError(f"config.img_size={fields['img_size']} must be at least the patch size {fields['patch_size']}")
        fields["mlp_ratio"] = float(ratio)
        return TrunkSpec(**fields)

    def adopt_pos_grid(self, grid: int) -> None:
        """Take the trunk's position grid from a checkpoint when the config names no ``img_size``.

        Upstream's timm trunk then has its model's default grid (224 px, 16x16, for a generic
        ViT), which only the checkpoint's ``pos_embed`` shows. The grid is recorded as
        ``img_size`` so that saving and upstream's loader keep it; an explicit ``img_size``
        wins (a checkpoint that disagrees is then reported as mis-shaped).
        """
        spec = self.trunk_spec()
        if self.img_size is None and spec.img_size // spec.patch_size != grid:
            self.img_size = grid * spec.patch_size


class PS3TextConfig(PretrainedConfig):
    model_type = "ps3_text_model"
    base_config_key = "text_config"

    def __init__(
        self,
        output_dim: int = 1152,
        prompt_proj_dim: int = 1152,
        context_length: int = 77,
        vocab_size: int = 49408,
        hf_tokenizer_name: str | None = None,
        tokenizer_kwargs: dict | None = None,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        mlp_ratio: float = 4.0,
        ls_init_value: float | None = None,
        embed_cls: bool = False,
        pad_id: int = 0,
        no_causal_mask: bool = False,
        final_ln_after_pool: bool = False,
        pool_type: str = "argmax",
        proj_bias: bool = False,
        output_tokens: bool = False,
        act_kwargs: dict | None = None,
        norm_kwargs: dict | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.output_dim = output_dim
        self.prompt_proj_dim = prompt_proj_dim
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.hf_tokenizer_name = hf_tokenizer_name
        self.tokenizer_kwargs = tokenizer_kwargs
        self.width = width
        self.heads = heads
        self.layers = layers
        self.mlp_ratio = mlp_ratio
        self.ls_init_value = ls_init_value
        self.embed_cls = embed_cls
        self.pad_id = pad_id
        self.no_causal_mask = no_causal_mask
        self.final_ln_after_pool = final_ln_after_pool
        self.pool_type = pool_type
        self.proj_bias = proj_bias
        self.output_tokens = output_tokens
        self.act_kwargs = dict(act_kwargs or {})
        self.norm_kwargs = dict(norm_kwargs or {})


class PS3Config(PretrainedConfig):
    model_type = "ps3"
    sub_configs = {"text_config": PS3TextConfig, "vision_config": PS3VisionConfig}

    def __init__(self, text_config: dict | PS3TextConfig | None = None, vision_config: dict | PS3VisionConfig | None = None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(text_config, PretrainedConfig):
            text_config = text_config.to_dict()
        if isinstance(vision_config, PretrainedConfig):
            vision_config = vision_config.to_dict()
        self.text_config = PS3TextConfig(**(text_config or {}))
        self.vision_config = PS3VisionConfig(**(vision_config or {}))
