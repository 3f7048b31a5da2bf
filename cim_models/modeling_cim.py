"""The CIM enhancer as a transformers model: the shared base class, the backbone and the classifier.

This file imports only torch, timm, transformers and ``configuration_cim``, so it can travel inside a
Hub repo and load with ``trust_remote_code=True`` where ``cim_models`` is not installed.

Every CIM model keeps the timm enhancer as ``self.enhancer``, and ``base_model_prefix = "enhancer"``:
``from_pretrained`` then adds or strips that prefix per key, so one file loads everywhere. A Hub
repo's ``model.safetensors`` (timm key names: ``blocks.0.attn.qkv.weight``), a ``CIMModel`` checkpoint
and a whole ``CIMForPreTraining`` checkpoint (``enhancer.*`` next to ``generator.*``) all load into
``CIMModel`` and ``CIMForImageClassification``.
"""

from __future__ import annotations

import timm
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from .configuration_cim import CIMConfig

# Parts of a pre-training checkpoint that the backbone models do not have: loading one is expected.
_PRETRAINING_ONLY_KEYS = [r"^generator\.", r"^enhancer_head\.", r"^tokenizer\."]


def create_enhancer(config: CIMConfig) -> nn.Module:
    """The timm backbone named by ``config.enhancer`` with ``num_classes=0``.

    Falls back to ``config.enhancer_architecture`` (a stock timm name) when the CIM name is not
    registered, i.e. when ``cim_models`` was not imported.
    """
    name = config.enhancer
    if not timm.is_model(name):
        if config.enhancer_architecture and timm.is_model(config.enhancer_architecture):
            name = config.enhancer_architecture
        else:
            raise ValueError(
                f"Unknown enhancer {config.enhancer!r}: not a timm model. Use a timm name such as "
                "'cim_vit_base_patch16_224', 'cim_resnet50' or 'vit_small_patch16_224' "
                "(the cim_* names exist after `import cim_models`)."
            )
    kwargs = {"num_classes": 0, "drop_path_rate": config.drop_path_rate, **config.enhancer_kwargs}
    try:
        # Token backbones are built for the configured input size; CNNs take no img_size argument.
        return timm.create_model(name, **{"img_size": config.image_size, **kwargs})
    except TypeError:
        return timm.create_model(name, **kwargs)


class CIMPreTrainedModel(PreTrainedModel):
    """Base of every CIM model: the config class, and weight init that keeps timm's own."""

    config_class = CIMConfig
    base_model_prefix = "enhancer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["Block", "Bottleneck"]

    def _init_weights(self, module: nn.Module) -> None:
        # timm modules initialise themselves at construction. from_pretrained builds on the meta device
        # and refills non-persistent buffers (BEiT's relative_position_index) with empty tensors, so
        # recompute those.
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing(enable)


class CIMModel(CIMPreTrainedModel):
    """The pre-trained enhancer alone, as a transformers backbone.

    ``last_hidden_state`` is timm's ``forward_features``: (B, 1 + N, D) tokens for a ViT, a
    (B, C, H/32, W/32) map for a ResNet. ``pooler_output`` is timm's pooled pre-logits feature
    (``forward_head(..., pre_logits=True)``): the class token for a ViT, the average for a ResNet.
    """

    _keys_to_ignore_on_load_unexpected = _PRETRAINING_ONLY_KEYS

    def __init__(self, config: CIMConfig):
        super().__init__(config)
        self.enhancer = create_enhancer(config)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, return_dict: bool | None = None
    ) -> BaseModelOutputWithPooling:
        features = self.enhancer.forward_features(pixel_values)
        pooled = self.enhancer.forward_head(features, pre_logits=True)  # (B, num_features)
        if return_dict is False:
            return features, pooled
        return BaseModelOutputWithPooling(last_hidden_state=features, pooler_output=pooled)


class CIMForImageClassification(CIMPreTrainedModel):
    """The enhancer with a linear classifier on its pooled feature, for fine-tuning.

    ``labels`` give a loss chosen by ``config.problem_type`` as in every transformers classifier:
    cross-entropy for integer labels, MSE when ``num_labels == 1``, BCE for multi-label float targets.
    Stochastic depth for fine-tuning is ``config.drop_path_rate`` (pass ``drop_path_rate=`` to
    ``from_pretrained``).
    """

    _keys_to_ignore_on_load_unexpected = _PRETRAINING_ONLY_KEYS

    def __init__(self, config: CIMConfig):
        super().__init__(config)
        self.enhancer = create_enhancer(config)
        num_features, num_labels = self.enhancer.num_features, config.num_labels
        self.classifier = nn.Linear(num_features, num_labels) if num_labels > 0 else nn.Identity()
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if module is self.classifier and isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> ImageClassifierOutput:
        features = self.enhancer.forward_features(pixel_values)
        pooled = self.enhancer.forward_head(features, pre_logits=True)  # (B, num_features)
        logits = self.classifier(pooled)  # (B, num_labels)
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        if return_dict is False:
            return (logits,) if loss is None else (loss, logits)
        return ImageClassifierOutput(loss=loss, logits=logits)


__all__ = ["CIMForImageClassification", "CIMModel", "CIMPreTrainedModel", "create_enhancer"]
