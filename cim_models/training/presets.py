"""Named configurations for ``cim-pretrain --preset``: the paper's runs and a tiny CPU run.

Each preset gives new defaults to the command's flags; any flag given explicitly wins. Learning
rates are given per 256 images (``base_learning_rate``); an explicit ``--learning_rate`` replaces
the scaled rate.
"""

from __future__ import annotations

# fmt: off
# The paper's recipe (Fang et al. 2023, appendix): AdamW, 1.5e-3 at a global batch of 2048
# (= 1.875e-4 per 256 images), 10 warm-up epochs of 300, cosine, weight decay 0.05, clipping 3.0,
# drop path 0.1, bf16.
_PAPER_TRAINING = dict(
    base_learning_rate=1.5e-3 * 256 / 2048, num_train_epochs=300, warmup_steps=10 / 300,
    lr_scheduler_type="cosine", weight_decay=0.05, max_grad_norm=3.0, adam_beta2=0.999, bf16=True,
    per_device_train_batch_size=128, logging_steps=50, save_strategy="epoch", save_total_limit=3,
    image_log_steps=2000, dataloader_num_workers=10, dataloader_persistent_workers=True,
)
_PAPER_MODEL = dict(
    image_size=224, patch_size=16, num_mask_patches=75, generator_num_hidden_layers=4,
    tokenizer="dall-e", drop_path_rate=0.1, objective="respix",
)

PRESETS: dict[str, dict] = {
    "vit_small": dict(_PAPER_MODEL, enhancer="cim_vit_small_patch16_224",
                      generator_hidden_size=384, **_PAPER_TRAINING),
    "vit_base": dict(_PAPER_MODEL, enhancer="cim_vit_base_patch16_224",
                     generator_hidden_size=768, **_PAPER_TRAINING),
    "resnet50": dict(_PAPER_MODEL, enhancer="cim_resnet50", generator_hidden_size=384,
                     **_PAPER_TRAINING),
    # A CPU run of minutes [ours, measured on 2 cores]: 64px shapes, an 8x8 token grid from a
    # 512-token patch codebook fitted on the training images (it measured better than the
    # weightless palette for both objectives), a ViT-Ti/8 enhancer of depth 6 and RevDet.
    "tiny": dict(
        enhancer="cim_vit_tiny_patch16_224", enhancer_kwargs='{"depth": 6, "patch_size": 8}',
        image_size=64, patch_size=8, num_mask_patches=24, generator_hidden_size=96,
        generator_num_hidden_layers=2, tokenizer="codebook", drop_path_rate=0.0, objective="revdet",
        synthetic_train_samples=3000, synthetic_eval_samples=1000,
        base_learning_rate=1e-3 * 256 / 64, per_device_train_batch_size=64,
        per_device_eval_batch_size=256, max_steps=300, warmup_steps=30, lr_scheduler_type="cosine",
        weight_decay=0.05, max_grad_norm=3.0, adam_beta2=0.999, logging_steps=25,
        eval_strategy="steps", eval_steps=150, save_steps=150, save_total_limit=2,
        image_log_steps=50, dataloader_num_workers=0,
    ),
}
# fmt: on

DEFAULT_PRESET = "tiny"

# What each preset is for, shown when a run needs one named.
PRESET_DESCRIPTIONS: dict[str, str] = {
    "vit_small": "ViT-S/16 enhancer, the paper's ImageNet recipe (224 px, DALL-E tokenizer, GPUs)",
    "vit_base": "ViT-B/16 enhancer, the paper's ImageNet recipe (224 px, DALL-E tokenizer, GPUs)",
    "resnet50": "ResNet-50 enhancer, the paper's ImageNet recipe (224 px, DALL-E tokenizer, GPUs)",
    "tiny": "a CPU run of minutes: 64 px images, a patch codebook, a ViT-Ti/8 of depth 6",
}
