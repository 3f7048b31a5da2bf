"""CIMConfig: every hyper-parameter of a CIM model, as a transformers ``PretrainedConfig``.

Defaults marked [paper] come from Fang et al., "Corrupted Image Modeling for Self-Supervised Visual
Pre-Training" (ICLR 2023); [BEiT] from BEiT's code; [ours] are this project's choices where the
paper is silent. Model cards print all of them.

Two layouts of ``config.json`` load into a CIMConfig:

- a checkpoint (``save_pretrained``, the Trainer): the fields at the top, ``model_type: "cim"``;
- an exported Hub repo (``cim-export``): timm's config (``architecture``, ``model_args``,
  ``pretrained_cfg``, no ``model_type``), which plain timm and transformers' built-in timm wrapper
  read, with the CIMConfig under the key ``"cim_config"``.
"""

from __future__ import annotations

from transformers import PretrainedConfig

OBJECTIVES = ("respix", "revdet")
TOKENIZERS = ("dall-e", "palette", "codebook")
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
# Where an exported repo's config.json keeps the CIMConfig, next to timm's keys.
EXPORT_CONFIG_KEY = "cim_config"
# timm's keys of an exported config.json. A CIMConfig leaves them out, so that a model loaded from
# the Hub and saved again does not carry timm metadata that no longer describes its weights (e.g.
# after fine-tuning adds a classifier).
TIMM_CONFIG_KEYS = (
    "architecture",
    "num_classes",
    "num_features",
    "global_pool",
    "model_args",
    "pretrained_cfg",
    "image_processor_type",
)


class CIMConfig(PretrainedConfig):
    r"""
    Configuration of a CIM model: the enhancer (the backbone that is kept), the generator, the
    frozen tokenizer and the corruption, and the enhancer objective.

    Args:
        enhancer (`str`, defaults to `"cim_vit_base_patch16_224"`):
            timm model name of the enhancer; any timm backbone works [paper: ViT-S/B, ResNet-50].
        enhancer_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model` (e.g. `img_size`, `depth`).
        enhancer_architecture (`str`, *optional*):
            The stock timm architecture the enhancer's weights load into (e.g.
            `vit_base_patch16_224`); used when the `enhancer` name is not registered with timm.
        hidden_size (`int`, *optional*): the enhancer's feature width (timm `num_features`); set
            when the enhancer is built. DeepSpeed's "auto" values read it.
        drop_path_rate (`float`, defaults to 0.1): stochastic depth of the enhancer [ours, BEiT
            recipe].
        objective (`str`, defaults to `"respix"`): `"respix"` (restore pixels) or `"revdet"`
            (detect replaced tokens) [paper].
        image_size (`int`, defaults to 224): enhancer and generator input size [paper].
        patch_size (`int`, defaults to 16): stride of the visual-token grid in input pixels; the
            grid is `image_size / patch_size` on each side and the tokenizer sees
            `grid * downsample` pixels.
        image_mean, image_std (`list[float]`): normalisation of `pixel_values` and of the
            enhancer's corrupted input [ours: ImageNet defaults].
        generator_hidden_size (`int`, *optional*): generator width; defaults to the enhancer's
            width (384 for ResNet-50) [ours].
        generator_num_hidden_layers (`int`, defaults to 4) [ours].
        generator_num_attention_heads (`int`, *optional*): defaults to width / 64 [ours].
        generator_layer_scale_init_value (`float`, defaults to 0.1) [paper, BEiT].
        tokenizer (`str`, defaults to `"dall-e"`): `"dall-e"` [paper, BEiT], `"palette"`
            (weightless) or `"codebook"` (a patch codebook fitted to the data).
        tokenizer_weights (`str`, *optional*): folder or Hub repo with the converted DALL-E
            weights.
        tokenizer_kwargs (`dict`, *optional*): extra tokenizer arguments (`random_init`,
            `cell_size`, ...).
        save_tokenizer_weights (`bool`, defaults to `False`): include the frozen tokenizer in
            checkpoints.
        vocab_size (`int`, *optional*): set from the tokenizer when the model is built.
        num_mask_patches (`int`, defaults to 75): masked patches per image [BEiT; ours for CIM].
        min_mask_patches_per_block (`int`, defaults to 16) [BEiT].
        sampling_temperature (`float`, defaults to 1.0): temperature of the generator's samples
            [ours].
        window_size (`int`, defaults to 16): ResPix sliding-window size [ours].
        enhancer_loss_weight (`float`, defaults to 1.0): lambda in L = L_gen + lambda * L_enh
            [ours].
        initializer_range (`float`, defaults to 0.02): init of heads added on top of the enhancer.
    """

    model_type = "cim"

    enhancer: str = "cim_vit_base_patch16_224"
    enhancer_kwargs: dict | None = None
    enhancer_architecture: str | None = None
    hidden_size: int | None = None
    drop_path_rate: float = 0.1
    objective: str = "respix"
    image_size: int = 224
    patch_size: int = 16
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    generator_hidden_size: int | None = None
    generator_num_hidden_layers: int = 4
    generator_num_attention_heads: int | None = None
    generator_layer_scale_init_value: float = 0.1
    tokenizer: str = "dall-e"
    tokenizer_weights: str | None = None
    tokenizer_kwargs: dict | None = None
    save_tokenizer_weights: bool = False
    vocab_size: int | None = None
    num_mask_patches: int = 75
    min_mask_patches_per_block: int = 16
    sampling_temperature: float = 1.0
    window_size: int = 16
    enhancer_loss_weight: float = 1.0
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        for key in TIMM_CONFIG_KEYS:
            kwargs.pop(key, None)
        self.enhancer_kwargs = dict(self.enhancer_kwargs or {})
        self.tokenizer_kwargs = dict(self.tokenizer_kwargs or {})
        self.image_mean = list(self.image_mean or IMAGENET_DEFAULT_MEAN)
        self.image_std = list(self.image_std or IMAGENET_DEFAULT_STD)
        super().__post_init__(**kwargs)
        self.validate_cim()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> CIMConfig:
        """Also reads an exported repo's config.json: the CIMConfig under ``"cim_config"``."""
        if isinstance(config_dict.get(EXPORT_CONFIG_KEY), dict):
            config_dict = config_dict[EXPORT_CONFIG_KEY]
        return super().from_dict(dict(config_dict), **kwargs)

    def validate_cim(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"Unknown objective {self.objective!r}; choose one of {OBJECTIVES}.")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"Unknown tokenizer {self.tokenizer!r}; choose one of {TOKENIZERS}.")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}."
            )
        if not 0 < self.num_mask_patches <= self.grid_size**2:
            raise ValueError(
                f"num_mask_patches must be in 1..{self.grid_size**2} for a {self.grid_size}x"
                f"{self.grid_size} token grid, got {self.num_mask_patches}."
            )
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("image_mean and image_std need 3 values, one per RGB channel.")

    @property
    def grid_size(self) -> int:
        """Visual tokens per side."""
        return self.image_size // self.patch_size


__all__ = ["CIMConfig"]
