"""Fine-tuning recipes: the presets, layer-wise learning-rate decay, augmentation, mixup, the loss.

Everything that timm already provides comes from timm: ``create_transform`` (RandAugment, random
erasing), ``Mixup`` (mixup / cutmix with label smoothing), ``param_groups_layer_decay``, the losses
and the optimizers (``create_optimizer_v2``: AdamW, LAMB, ...). The loop is the plain
``transformers.Trainer``; :class:`FinetuneTrainer` only builds the optimizer groups, computes the
loss on soft targets and uses the evaluation transform for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import Mixup, create_transform
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, param_groups_layer_decay
from torch import nn
from transformers import Trainer

from ..data import argument
from .backbone import ImageSettings

# ``cim-finetune --preset``: new defaults for the recipe flags below and for TrainingArguments; any
# flag given explicitly wins. Learning rates are per 256 images (``base_learning_rate``) and scale
# linearly with the global batch; at the global batch named in each comment they equal the source's
# peak rate.
# fmt: off
_GPU_RUN = dict(
    bf16=True, eval_strategy="epoch", save_strategy="epoch", save_total_limit=2, logging_steps=50,
    per_device_eval_batch_size=256, dataloader_num_workers=10, dataloader_persistent_workers=True,
    max_grad_norm=0.0,  # BEiT and RSB fine-tune without gradient clipping
)
# BEiT (Bao et al. 2022) ImageNet-1K fine-tuning of ViT-B/16, the recipe CIM follows (paper,
# appendix; BEiT's run_class_finetuning.py flags): 100 epochs, batch 1024 (8 x 128), peak lr 4e-3,
# layer decay 0.65, weight decay 0.05, drop path 0.1, warm-up 20 epochs then cosine, AdamW
# (0.9, 0.999), mixup 0.8, cutmix 1.0, label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, random
# erasing 0.25 (pixel mode), bicubic training crops. (BEiT decays to min_lr 1e-6, the Trainer's
# cosine to 0: a negligible difference.)
_BEIT = dict(
    num_train_epochs=100, per_device_train_batch_size=128, base_learning_rate=4e-3 * 256 / 1024,
    layer_decay=0.65, weight_decay=0.05, drop_path_rate=0.1, warmup_steps=20 / 100,
    lr_scheduler_type="cosine", optimizer="adamw", adam_beta1=0.9, adam_beta2=0.999,
    adam_epsilon=1e-8, mixup=0.8, cutmix=1.0, label_smoothing=0.1,
    auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, loss="ce", **_GPU_RUN,
)
FINETUNE_PRESETS: dict[str, dict[str, Any]] = {
    "vit_base": _BEIT,
    # ViT-S/16: BEiT's recipe with layer decay 0.75 [ours: the value BEiT-style recipes use for
    # smaller models; neither the CIM nor the BEiT paper lists a ViT-S fine-tuning recipe].
    "vit_small": dict(_BEIT, layer_decay=0.75),
    # ResNet-50: "ResNet strikes back" procedure A2 (Wightman et al. 2021, Table 1): 300 epochs,
    # LAMB, lr 5e-3 at batch 2048 (8 x 256), weight decay 0.02, warm-up 5 epochs then cosine, binary
    # cross-entropy with targets thresholded at 0.2, no label smoothing, mixup 0.1, cutmix 1.0,
    # RandAugment rand-m7-mstd0.5-inc1, drop path 0.05, no random erasing, test crop 0.95 (the
    # cim_resnet50 pretrained cfg). Not reproduced: A2's repeated augmentation (3 repeats), which
    # needs its own distributed sampler. No layer decay (RSB trains from scratch); --layer_decay
    # works for ResNets too (stem, then one layer per residual block).
    "resnet50": dict(
        num_train_epochs=300, per_device_train_batch_size=256, base_learning_rate=5e-3 * 256 / 2048,
        layer_decay=1.0, weight_decay=0.02, drop_path_rate=0.05, warmup_steps=5 / 300,
        lr_scheduler_type="cosine", optimizer="lamb", adam_beta1=0.9, adam_beta2=0.999,
        adam_epsilon=1e-6, mixup=0.1, cutmix=1.0, label_smoothing=0.0,
        auto_augment="rand-m7-mstd0.5-inc1", reprob=0.0, loss="bce", bce_target_threshold=0.2,
        **_GPU_RUN,
    ),
    # A CPU run of a few minutes on the built-in 64 px shapes [ours]: the BEiT recipe's structure
    # (AdamW, layer decay, warm-up + cosine, label smoothing) without the strong regularisers,
    # which need hundreds of epochs to pay off: no mixup/cutmix, RandAugment or random erasing,
    # crops of at least 35% of the image (smaller ones can cut the shape out). 10 epochs of 3000
    # images at 5e-3 per 256: 48% top-1 from the tiny cim-pretrain run (probe 27%); on a 500-step
    # run 49%, against 40% at 2e-3 and 29% after 3 epochs.
    "tiny": dict(
        num_train_epochs=10, per_device_train_batch_size=64, base_learning_rate=5e-3,
        layer_decay=0.75, weight_decay=0.05, drop_path_rate=0.1, warmup_steps=0.1,
        lr_scheduler_type="cosine", optimizer="adamw", adam_beta1=0.9, adam_beta2=0.999,
        mixup=0.0, cutmix=0.0, label_smoothing=0.1, auto_augment=None, color_jitter=0.0,
        reprob=0.0, min_crop_scale=0.35, loss="ce", max_grad_norm=0.0, eval_strategy="no",
        save_strategy="no", logging_steps=10, per_device_eval_batch_size=256,
        dataloader_num_workers=0,
    ),
}

# fmt: on


@dataclass
class RecipeArguments:
    """The fine-tuning recipe (defaults come from --preset; TrainingArguments hold the schedule)."""

    preset: str = argument(
        "tiny", f"One of {sorted(FINETUNE_PRESETS)}.", choices=sorted(FINETUNE_PRESETS)
    )
    base_learning_rate: float | None = argument(
        None, "Peak learning rate per 256 images; learning_rate = this x global batch / 256."
    )
    optimizer: str = argument("adamw", "timm optimizer name (adamw, lamb, sgd, ...).")
    layer_decay: float = argument(
        1.0, "Layer-wise lr decay: layer l of L gets lr x decay^(L - l); 1 = off."
    )
    drop_path_rate: float | None = argument(None, "Stochastic depth of the backbone.")
    min_crop_scale: float = argument(0.08, "Smallest RandomResizedCrop area fraction.")
    auto_augment: str | None = argument(
        None, "timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1; none = off."
    )
    color_jitter: float = argument(0.4, "Colour jitter (timm ignores it with auto_augment).")
    reprob: float = argument(0.0, "Random erasing probability (pixel mode).")
    mixup: float = argument(0.0, "Mixup alpha; 0 = off.")
    cutmix: float = argument(0.0, "CutMix alpha; 0 = off.")
    mixup_prob: float = argument(1.0, "Probability of mixing a batch.")
    mixup_switch_prob: float = argument(0.5, "Probability of cutmix instead of mixup.")
    label_smoothing: float = argument(0.1, "Label smoothing.")
    loss: str = argument(
        "ce", "ce (cross-entropy) or bce (binary cross-entropy, RSB).", choices=["ce", "bce"]
    )
    bce_target_threshold: float | None = argument(
        None, "With --loss bce: targets above it become 1 (RSB: 0.2)."
    )
    train_interpolation: str = argument("bicubic", "Interpolation of training crops.")
    trainer_optimizer: bool = argument(
        False, "Use the Trainer's --optim instead of --optimizer (set when --optim is given)."
    )

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    @property
    def auto_augment_policy(self) -> str | None:
        return None if (self.auto_augment or "none").lower() == "none" else self.auto_augment


# --------------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay


def layer_decay_param_groups(
    model: nn.Module, learning_rate: float, weight_decay: float, layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """Optimizer groups of a ``CIMForImageClassification`` with BEiT's layer-wise rate decay.

    timm's ``param_groups_layer_decay`` numbers the backbone's layers with its ``group_matcher``:
    ViT: patch/position embeddings and class token 0, block ``i`` layer ``i + 1`` (the final norm
    joins the last block); ResNet: the stem 0, then each residual block in order. The new classifier
    is the top layer ``L`` (one above the backbone's last, as timm numbers a model's own head), with
    rate scale 1; layer ``l`` gets ``layer_decay ** (L - l)``. For ViT-B (L = 13) that is BEiT's
    rule: embeddings 0.65^13, block 11 0.65. No weight decay on 1-D parameters and the backbone's
    ``no_weight_decay()`` names. Each group's ``lr`` is set, so any scheduler (the Trainer's
    LambdaLR) scales it; ``lr_scale`` is kept for inspection. Groups come top layer first, so the
    rate the Trainer logs (group 0's) is the peak.
    """
    enhancer = model.enhancer
    no_decay = enhancer.no_weight_decay() if hasattr(enhancer, "no_weight_decay") else ()
    groups = param_groups_layer_decay(
        enhancer, weight_decay=weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay
    )
    for group in groups:  # timm scales the backbone's top layer by 1; the classifier sits above it
        group["lr_scale"] *= layer_decay
    head = [p for n, p in model.named_parameters() if not n.startswith("enhancer.")]
    head = [p for p in head if p.requires_grad]
    for decay in (True, False):
        params = [p for p in head if (p.ndim > 1) == decay]
        groups.append(
            {"params": params, "weight_decay": weight_decay if decay else 0.0, "lr_scale": 1.0}
        )
    groups = [g for g in groups if g["params"]]
    for group in groups:
        group["lr"] = learning_rate * group["lr_scale"]
    return sorted(groups, key=lambda g: -g["lr_scale"])


def create_optimizer(model: nn.Module, recipe: RecipeArguments, args) -> torch.optim.Optimizer:
    """timm's optimizer ``recipe.optimizer`` over :func:`layer_decay_param_groups`; betas and eps
    from the TrainingArguments for the Adam family and LAMB. With ``recipe.trainer_optimizer``
    (``cim-finetune --optim``) the Trainer's ``--optim`` choice runs over the same groups."""
    lr, weight_decay = args.learning_rate, args.weight_decay
    groups = layer_decay_param_groups(model, lr, weight_decay, recipe.layer_decay)
    if recipe.trainer_optimizer:
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        optimizer_kwargs.pop("lr", None)  # every group carries its own
        return optimizer_cls(groups, lr=lr, **optimizer_kwargs)
    kwargs = {}
    if any(name in recipe.optimizer.lower() for name in ("adam", "lamb")):
        kwargs = dict(betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    return create_optimizer_v2(
        groups, opt=recipe.optimizer, lr=lr, weight_decay=weight_decay, **kwargs
    )


# --------------------------------------------------------------------------------------------------
# Data: augmentation and mixup


def train_transform(
    recipe: RecipeArguments, settings: ImageSettings
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's ImageNet training transform: random resized crop, flip, RandAugment or colour jitter,
    normalisation, random erasing."""
    return create_transform(
        settings.image_size,
        is_training=True,
        scale=(recipe.min_crop_scale, 1.0),
        hflip=0.5,
        color_jitter=recipe.color_jitter,
        auto_augment=recipe.auto_augment_policy,
        interpolation=recipe.train_interpolation,
        mean=settings.mean,
        std=settings.std,
        re_prob=recipe.reprob,
        re_mode="pixel",
        re_count=1,
    )


def create_mixup(recipe: RecipeArguments, num_classes: int) -> Mixup | None:
    if not recipe.mixup_active:
        return None
    return Mixup(
        mixup_alpha=recipe.mixup,
        cutmix_alpha=recipe.cutmix,
        prob=recipe.mixup_prob,
        switch_prob=recipe.mixup_switch_prob,
        mode="batch",
        label_smoothing=recipe.label_smoothing,
        num_classes=num_classes,
    )


# --------------------------------------------------------------------------------------------------
# Loss, metrics and the Trainer


def train_loss(recipe: RecipeArguments) -> nn.Module:
    """The training loss as timm's train.py chooses it: soft-target CE after mixup,
    label-smoothing CE, or BCE (RSB) on either."""
    if recipe.loss == "bce":
        smoothing = 0.0 if recipe.mixup_active else recipe.label_smoothing  # mixup already smoothed
        return BinaryCrossEntropy(smoothing=smoothing, target_threshold=recipe.bce_target_threshold)
    if recipe.mixup_active:
        return SoftTargetCrossEntropy()
    if recipe.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(recipe.label_smoothing)
    return nn.CrossEntropyLoss()


class FinetuneTrainer(Trainer):
    """The Trainer with the recipe's optimizer groups and loss, and eval-transformed eval data."""

    loss_is_scaled_for_ga = False  # the loss is a per-batch mean

    def __init__(
        self, *args, recipe: RecipeArguments, eval_collator: Callable | None = None, **kwargs
    ):
        super().__init__(*args, **kwargs)
        self.recipe = recipe
        self.eval_collator = eval_collator
        self.train_loss_fn = train_loss(recipe)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            self.optimizer = create_optimizer(model or self.model, self.recipe, self.args)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The loss is computed here, not by the model: CIMForImageClassification would take (B, C)
        # float targets for multi-label BCE (and switch config.problem_type to it for good).
        labels = inputs["labels"]
        outputs = model(pixel_values=inputs["pixel_values"])
        logits = outputs.logits.float()  # (B, C)
        if model.training:
            loss = self.train_loss_fn(logits, labels)
        else:
            loss = F.cross_entropy(logits, labels)
        return (loss, outputs) if return_outputs else loss

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator
