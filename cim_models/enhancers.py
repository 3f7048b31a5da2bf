"""CIM enhancers registered as timm models.

The enhancers are architecturally the stock timm ``VisionTransformer`` and ``ResNet`` (the paper
keeps them vanilla), so their weights load with ``strict=True`` into ``vit_*_patch16_224`` /
``resnet50`` with ``num_classes=0``. What the registration adds is the pretrained metadata (the Hub
repos of the CIM checkpoints, the preprocessing they were trained with, licence and paper) and the
pooled feature of the ViTs: the mean of the patch tokens after the final norm
(``global_pool="avg"``, ``fc_norm=False``, which keeps the stock state dict). CIM's losses reach the
patch tokens only, so the class token is never trained; BEiT fine-tunes from the same mean.

``import cim_models`` runs this module: timm has no plugin mechanism, so the names exist only after
it.
"""

from __future__ import annotations

from typing import Any

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    register_model,
    resolve_pretrained_cfg,
)
from timm.models.resnet import Bottleneck, ResNet
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as _vit_checkpoint_filter_fn

# Every published CIM checkpoint lives under this Hub organisation: change it here, and only here.
HF_HUB_ORGANIZATION = "cim-models"

# Stock timm architecture of each CIM enhancer: exported repos name it, so that they load where
# cim_models is not installed.
STOCK_ARCHITECTURES = {
    "cim_vit_tiny_patch16_224": "vit_tiny_patch16_224",
    "cim_vit_small_patch16_224": "vit_small_patch16_224",
    "cim_vit_base_patch16_224": "vit_base_patch16_224",
    "cim_vit_large_patch16_224": "vit_large_patch16_224",
    "cim_resnet50": "resnet50",
    "cim_vit_small": "vit_small_patch16_224",
    "cim_vit_base": "vit_base_patch16_224",
    "cim_vit_large": "vit_large_patch16_224",
}
_PRETRAINING_PREFIXES = ("generator.", "enhancer_head.", "tokenizer.")


def checkpoint_filter_fn(state_dict: dict[str, Any], model) -> dict[str, Any]:
    """Accept an exported enhancer or a whole ``CIMForPreTraining`` state dict; keep the enhancer.

    Pretraining keys (generator, heads, ``mask_token``) are dropped before timm's ViT filter, which
    would otherwise mistake a top-level ``mask_token`` for a DINOv2 checkpoint.
    """
    state_dict = state_dict.get("model", state_dict)
    if any(k.startswith("enhancer.") for k in state_dict):
        state_dict = {
            k[len("enhancer.") :]: v for k, v in state_dict.items() if k.startswith("enhancer.")
        }
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_PRETRAINING_PREFIXES)}
    if isinstance(model, VisionTransformer):
        state_dict = _vit_checkpoint_filter_fn(state_dict, model)
    return state_dict


def _cfg(variant: str, tag: str, **kwargs) -> dict[str, Any]:
    return {
        "hf_hub_id": f"{HF_HUB_ORGANIZATION}/{variant}.{tag}",
        "num_classes": 0,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2202.03382",
        "paper_name": "Corrupted Image Modeling for Self-Supervised Visual Pre-Training",
        "origin_url": "https://github.com/cim-models/cim-models",
        **kwargs,
    }


def _resnet_cfg(variant: str, tag: str, **kwargs) -> dict[str, Any]:
    return _cfg(
        variant,
        tag,
        fixed_input_size=False,
        pool_size=(7, 7),
        crop_pct=0.95,
        first_conv="conv1",
        classifier="fc",
        **kwargs,
    )


def _tags(variant: str, cfg_fn=_cfg, repo_variant: str | None = None) -> dict[str, dict[str, Any]]:
    # The first tag is the default one that pretrained=True resolves to; aliases share their
    # target's repo.
    repo_variant = repo_variant or variant
    return {f"{variant}.{tag}": cfg_fn(repo_variant, tag) for tag in ("respix_in1k", "revdet_in1k")}


default_cfgs = generate_default_cfgs(
    {
        **_tags("cim_vit_tiny_patch16_224"),
        **_tags("cim_vit_small_patch16_224"),
        **_tags("cim_vit_base_patch16_224"),
        **_tags("cim_vit_large_patch16_224"),
        **_tags("cim_resnet50", _resnet_cfg),
        **_tags("cim_vit_small", repo_variant="cim_vit_small_patch16_224"),
        **_tags("cim_vit_base", repo_variant="cim_vit_base_patch16_224"),
        **_tags("cim_vit_large", repo_variant="cim_vit_large_patch16_224"),
    }
)


def _build(model_cls: type, variant: str, pretrained: bool, **kwargs):
    """``build_model_with_cfg``; a failed weight download names the repo and says what to do."""
    try:
        return build_model_with_cfg(model_cls, variant, pretrained, **kwargs)
    except OSError as err:  # every huggingface_hub download error, and a missing local file
        if not pretrained:
            raise
        cfg = resolve_pretrained_cfg(
            variant,
            pretrained_cfg=kwargs.get("pretrained_cfg"),
            pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"),
        )
        name = f"{variant}.{cfg.tag}" if cfg.tag else variant
        if cfg.file:
            problem = f"the file {cfg.file!r} cannot be read"
        else:
            problem = (
                f"the Hugging Face Hub repo {cfg.hf_hub_id!r} is not published yet or cannot be "
                "reached from here"
            )
        raise OSError(
            f"Could not load the pretrained weights of {name}: {problem} "
            f"({type(err).__name__}: {err})\n"
            f"- To publish it: export a CIM checkpoint, then upload it under that repo id:\n"
            f"    cim-export --checkpoint RUN/checkpoint-N --out DIR\n"
            f"    cim-push --folder DIR --repo-id {cfg.hf_hub_id}\n"
            f"- To load your own export from its folder:\n"
            f"    timm.create_model({variant!r}, pretrained=True, "
            f"pretrained_cfg_overlay=dict(file='DIR/model.safetensors'))\n"
            f"    timm.create_model('local-dir:DIR', pretrained=True)\n"
            f"- Published on another Hub? Set HF_ENDPOINT to it. Offline (HF_HUB_OFFLINE=1), the "
            f"repo must already be in the Hub cache (HF_HUB_CACHE)."
        ) from err


def _create_cim_vit(variant: str, pretrained: bool = False, **kwargs) -> VisionTransformer:
    out_indices = kwargs.pop("out_indices", 3)
    # Mean of the patch tokens after the final norm; fc_norm=False keeps the stock state dict.
    kwargs = dict(dict(global_pool="avg", fc_norm=False), **kwargs)
    return _build(
        VisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _create_cim_resnet(variant: str, pretrained: bool = False, **kwargs) -> ResNet:
    return _build(ResNet, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def cim_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Ti/16 CIM enhancer (not in the paper; small runs and tests)."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_cim_vit("cim_vit_tiny_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def cim_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-S/16 CIM enhancer."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_cim_vit("cim_vit_small_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def cim_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-B/16 CIM enhancer."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_cim_vit("cim_vit_base_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def cim_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-L/16 CIM enhancer."""
    model_args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_cim_vit("cim_vit_large_patch16_224", pretrained, **dict(model_args, **kwargs))


@register_model
def cim_resnet50(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 CIM enhancer."""
    model_args = dict(block=Bottleneck, layers=(3, 4, 6, 3))
    return _create_cim_resnet("cim_resnet50", pretrained, **dict(model_args, **kwargs))


@register_model
def cim_vit_small(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Alias of ``cim_vit_small_patch16_224``."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_cim_vit("cim_vit_small", pretrained, **dict(model_args, **kwargs))


@register_model
def cim_vit_base(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Alias of ``cim_vit_base_patch16_224``."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_cim_vit("cim_vit_base", pretrained, **dict(model_args, **kwargs))


@register_model
def cim_vit_large(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """Alias of ``cim_vit_large_patch16_224``."""
    model_args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_cim_vit("cim_vit_large", pretrained, **dict(model_args, **kwargs))
