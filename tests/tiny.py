"""Tiny CIM configurations and batches shared by the tests."""

import torch

TINY_VIT = dict(depth=2, embed_dim=64, num_heads=2)
TINY_RESNET = dict(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128))
TINY_DALL_E = dict(random_init=True, n_hid=16, n_blk_per_group=1, vocab_size=512, n_init=32)


def tiny_config(objective="respix", enhancer="vit", tokenizer="palette", **overrides):
    """A 64px CIM with a 4x4 token grid: a step takes milliseconds on CPU."""
    from cim_models import CIMConfig

    enhancer_name, enhancer_kwargs = {
        "vit": ("cim_vit_tiny_patch16_224", TINY_VIT),
        "resnet": ("cim_resnet50", TINY_RESNET),
    }[enhancer]
    kwargs = dict(
        enhancer=enhancer_name,
        enhancer_kwargs=enhancer_kwargs,
        objective=objective,
        image_size=64,
        num_mask_patches=6,
        tokenizer=tokenizer,
        tokenizer_kwargs=TINY_DALL_E if tokenizer == "dall-e" else {},
        generator_hidden_size=64,
        generator_num_hidden_layers=1,
        drop_path_rate=0.0,
    )
    kwargs.update(overrides)
    return CIMConfig(**kwargs)


def tiny_batch(model, batch_size=4, seed=0):
    """Random images as the collator would give them: normalised view, tokenizer view, masks."""
    from cim_models import BlockMaskingGenerator

    rng = torch.Generator().manual_seed(seed)
    images = torch.rand(
        batch_size, 3, model.config.image_size, model.config.image_size, generator=rng
    )
    tokenizer_view = torch.nn.functional.interpolate(
        images, size=model.tokenizer_image_size, mode="area"
    )
    masking = BlockMaskingGenerator(model.config.grid_size, model.config.num_mask_patches)
    masks = torch.stack([masking(rng) for _ in range(batch_size)])
    return {
        "pixel_values": (images - model.image_mean) / model.image_std,
        "tokenizer_pixel_values": tokenizer_view,
        "bool_masked_pos": masks,
    }


def tiny_model(objective="respix", enhancer="vit", tokenizer="palette", seed=0, **overrides):
    from cim_models import CIMForPreTraining

    torch.manual_seed(seed)
    return CIMForPreTraining(tiny_config(objective, enhancer, tokenizer, **overrides))
