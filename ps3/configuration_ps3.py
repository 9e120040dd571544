"""Configurations, field-compatible with upstream PS3's ``config.json`` files.

Upstream builds its ViT trunk by ``timm`` name. This package needs no timm: the known trunks
are described in :data:`KNOWN_TRUNKS`, and any other ``model_name`` is defined by the
explicit fields ``depth``, ``num_heads``, ``mlp_ratio`` and ``patch_size`` (width is
``hidden_size``), which is how small random test models are written. ``radio: true`` makes
it a C-RADIO trunk (cropped position embedding, optional final norm, the SigLIP adapter MLP
``radio_adapter_mlp_*`` before the MAP head).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PretrainedConfig


@dataclass(frozen=True)
class AdapterSpec:
    """Shape of C-RADIO's SigLIP adapter MLP (``ps3.radio_adapter``)."""

    version: str  # "v1" or "v2"
    input_dim: int
    hidden_dim: int
    output_dim: int
    num_inner: int


@dataclass(frozen=True)
class TrunkSpec:
    """Shape of the ViT trunk: no class token, MAP attention-pool head. SigLIP trunks keep the
    defaults; C-RADIO trunks crop their position table instead of resampling it
    (``cropped_pos_embed``), may drop the final norm, and put ``adapter`` before the MAP head."""

    width: int
    depth: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    img_size: int
    cropped_pos_embed: bool = False
    final_norm: bool = True
    adapter: AdapterSpec | None = None

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def pool_shape(self) -> tuple[int, int, float]:
        """``(width, heads, mlp_ratio)`` of the MAP head: the trunk's own, or for a C-RADIO
        trunk upstream's SigLIP-shaped head over the adapter's output."""
        if self.adapter is None:
            return self.width, self.num_heads, self.mlp_ratio
        return self.adapter.output_dim, RADIO_POOL_NUM_HEADS, RADIO_POOL_MLP_RATIO

    @property
    def mlp_hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


# timm's shapes of the trunks upstream's configs name; ``width`` must agree with ``hidden_size``.
KNOWN_TRUNKS: dict[str, dict] = {
    "vit_so400m_patch14_siglip_378": dict(width=1152, depth=27, num_heads=16, mlp_ratio=3.7362, patch_size=14, img_size=378),
    "vit_so400m_patch14_siglip_384": dict(width=1152, depth=27, num_heads=16, mlp_ratio=3.7362, patch_size=14, img_size=384),
    "vit_large_patch16_224": dict(width=1024, depth=24, num_heads=16, mlp_ratio=4.0, patch_size=16, img_size=224),
}

_EXPLICIT_TRUNK_FIELDS = ("depth", "num_heads", "mlp_ratio", "patch_size")
ADAPTER_VERSIONS = ("v1", "v2")
# Upstream rebuilds a C-RADIO trunk's MAP head SigLIP-SO400M-shaped over the adapter's output.
RADIO_POOL_NUM_HEADS = 16
RADIO_POOL_MLP_RATIO = 3.7362


def _is_int(value, minimum: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= minimum


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
        radio_adapter_mlp_version: str | None = None,
        radio_adapter_mlp_input_dim: int | None = None,
        radio_adapter_mlp_hidden_dim: int | None = None,
        radio_adapter_mlp_output_dim: int | None = None,
        radio_adapter_mlp_num_inner: int | None = None,
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
        self.radio_adapter_mlp_version = radio_adapter_mlp_version
        self.radio_adapter_mlp_input_dim = radio_adapter_mlp_input_dim
        self.radio_adapter_mlp_hidden_dim = radio_adapter_mlp_hidden_dim
        self.radio_adapter_mlp_output_dim = radio_adapter_mlp_output_dim
        self.radio_adapter_mlp_num_inner = radio_adapter_mlp_num_inner
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
        ``img_size`` from the checkpoint's ``pos_embed`` when the config is silent. With
        ``radio`` the table is cropped instead of resampled, the final norm is kept only with
        ``final_norm``, and the ``radio_adapter_mlp_*`` fields shape the adapter (as upstream's
        ``radio`` branch; SigLIP trunks ignore ``final_norm`` there too).
        """
        if self.class_token:
            raise ValueError("config.class_token must be false: PS3 trunks have no prefix tokens")
        for name in ("drop_path", "patch_drop"):
            if getattr(self, name):
                raise ValueError(f"config.{name}={getattr(self, name)} is not supported (stochastic depth / patch dropout)")
        if self.model_name in KNOWN_TRUNKS:
            fields = dict(KNOWN_TRUNKS[self.model_name])
            known_width = fields.pop("width")
            if self.hidden_size != known_width:
                raise ValueError(f"config.hidden_size={self.hidden_size!r} but the trunk {self.model_name!r} is "
                                 f"{known_width} wide (upstream's timm model has that width whatever the config says)")
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
            if not _is_int(value, 1):
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
        if self.radio:
            fields.update(cropped_pos_embed=True, final_norm=bool(self.final_norm), adapter=self._adapter_spec(fields["width"]))
        return TrunkSpec(**fields)

    def _adapter_spec(self, width: int) -> AdapterSpec:
        """The ``radio_adapter_mlp_*`` fields, checked: the adapter reads the trunk's tokens and
        feeds the 16-head MAP head."""
        version = self.radio_adapter_mlp_version
        if version not in ADAPTER_VERSIONS:
            raise ValueError(f"config.radio_adapter_mlp_version must be one of {ADAPTER_VERSIONS} when radio=True, got {version!r}")
        dims = {f: getattr(self, f"radio_adapter_mlp_{f}") for f in ("input_dim", "hidden_dim", "output_dim", "num_inner")}
        for name, value in dims.items():
            if not _is_int(value, 0 if name == "num_inner" else 1):
                kind = "an int >= 0" if name == "num_inner" else "a positive int"
                raise ValueError(f"config.radio_adapter_mlp_{name} must be {kind} when radio=True, got {value!r}")
        if dims["input_dim"] != width:
            raise ValueError(f"config.radio_adapter_mlp_input_dim={dims['input_dim']} must equal the trunk width "
                             f"hidden_size={width}: the adapter reads the trunk's tokens")
        if dims["output_dim"] % RADIO_POOL_NUM_HEADS:
            raise ValueError(f"config.radio_adapter_mlp_output_dim={dims['output_dim']} must be divisible by the "
                             f"{RADIO_POOL_NUM_HEADS} heads of the MAP head upstream builds over the adapter")
        return AdapterSpec(version=version, **dims)

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
