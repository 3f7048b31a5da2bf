"""The CIM enhancer as a transformers model: the shared base class, the backbone and the classifier.

Every CIM model keeps the timm enhancer as ``self.enhancer``, and
``base_model_prefix = "enhancer"``: ``from_pretrained`` then adds or strips that prefix per key, so
one file loads everywhere. A Hub repo's ``model.safetensors`` (timm key names:
``blocks.0.attn.qkv.weight``), a ``CIMModel`` checkpoint and a whole ``CIMForPreTraining``
checkpoint (``enhancer.*`` next to ``generator.*``) all load into ``CIMModel`` and
``CIMForImageClassification``.

The pooled feature of a ViT enhancer is the mean of its patch tokens after the final norm: CIM's
losses reach the patch tokens only, so the class token is never trained (Fang et al., 2023; BEiT
fine-tunes from the same mean). CNN enhancers average their last feature map.
"""

from __future__ import annotations

from typing import ClassVar

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput

from .configuration_cim import CIMConfig

# Parts of a pre-training checkpoint that the backbone models do not have: loading one is expected.
_PRETRAINING_ONLY_KEYS = [r"^generator\.", r"^enhancer_head\.", r"^tokenizer\."]


def create_enhancer(config: CIMConfig) -> nn.Module:
    """The timm backbone named by ``config.enhancer`` with ``num_classes=0``.

    Falls back to ``config.enhancer_architecture`` (a stock timm name) when the CIM name is not
    registered. A ViT that would pool its class token pools the mean of its patch tokens instead,
    unless ``enhancer_kwargs`` name a ``global_pool``. Sets ``config.hidden_size`` to the feature
    width.
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
        enhancer = timm.create_model(name, **{"img_size": config.image_size, **kwargs})
    except TypeError:
        enhancer = timm.create_model(name, **kwargs)
    if (
        isinstance(enhancer, VisionTransformer)
        and enhancer.global_pool == "token"
        and "global_pool" not in config.enhancer_kwargs
    ):
        # The final norm stays where it is (no fc_norm), so the state dict is unchanged.
        enhancer.reset_classifier(0, global_pool="avg")
    config.hidden_size = enhancer.num_features
    return enhancer


def enhancer_forward(
    enhancer: nn.Module, pixel_values: torch.Tensor, output_hidden_states: bool = False
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """``(features, pooled, hidden_states)`` of a timm backbone.

    ``hidden_states`` (when asked for) of a token backbone with ``blocks`` (ViT, BEiT) are the
    embeddings and every block's output, prefix tokens included, each (B, 1 + N, D), as in
    transformers' ViT; of any other backbone, timm's ``forward_intermediates`` (stage maps).
    """
    hidden_states = None
    blocks = getattr(enhancer, "blocks", None)
    if not output_hidden_states:
        features = enhancer.forward_features(pixel_values)
    elif isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks):
        states: list[torch.Tensor] = []
        handles = [blocks[0].register_forward_pre_hook(lambda _, args: states.append(args[0]))]
        handles += [b.register_forward_hook(lambda *io: states.append(io[2])) for b in blocks]
        try:
            features = enhancer.forward_features(pixel_values)
        finally:
            for handle in handles:
                handle.remove()
        hidden_states = tuple(states)
    else:
        features, intermediates = enhancer.forward_intermediates(pixel_values)
        hidden_states = tuple(intermediates)
    pooled = enhancer.forward_head(features, pre_logits=True)  # (B, num_features)
    return features, pooled, hidden_states


class CIMPreTrainedModel(PreTrainedModel):
    """Base of every CIM model: the config class, and weight init that keeps timm's own."""

    config_class = CIMConfig
    base_model_prefix = "enhancer"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules: ClassVar[list[str]] = ["Block", "Bottleneck"]

    def _init_weights(self, module: nn.Module) -> None:
        # timm modules initialise themselves at construction. from_pretrained builds on the meta
        # device and refills non-persistent buffers (BEiT's relative_position_index) with empty
        # tensors, so recompute those.
        if hasattr(module, "init_non_persistent_buffers"):
            module.init_non_persistent_buffers()

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs) -> None:
        for module in self.modules():
            if module is not self and hasattr(module, "set_grad_checkpointing"):
                module.set_grad_checkpointing(enable)


class CIMModel(CIMPreTrainedModel):
    """The pre-trained enhancer alone, as a transformers backbone.

    ``last_hidden_state`` is timm's ``forward_features``: (B, 1 + N, D) tokens after the final norm
    for a ViT, a (B, C, H/32, W/32) map for a ResNet. ``pooler_output`` (B, D) is timm's pooled
    pre-logits feature: the mean of the patch tokens for a ViT, the average of the map for a
    ResNet. ``output_hidden_states=True`` adds the embeddings and every block's output.
    """

    _keys_to_ignore_on_load_unexpected = _PRETRAINING_ONLY_KEYS

    def __init__(self, config: CIMConfig):
        super().__init__(config)
        self.enhancer = create_enhancer(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple[torch.Tensor, ...]:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        features, pooled, hidden_states = enhancer_forward(
            self.enhancer, pixel_values, output_hidden_states
        )
        if not return_dict:
            return tuple(v for v in (features, pooled, hidden_states) if v is not None)
        return BaseModelOutputWithPooling(
            last_hidden_state=features, pooler_output=pooled, hidden_states=hidden_states
        )


class CIMForImageClassification(CIMPreTrainedModel):
    """The enhancer with a linear classifier on its pooled feature, for fine-tuning.

    ``labels`` give a loss chosen by ``config.problem_type`` as in every transformers classifier:
    cross-entropy for integer labels, MSE when ``num_labels == 1``, BCE for multi-label float
    targets. Stochastic depth for fine-tuning is ``config.drop_path_rate`` (pass
    ``drop_path_rate=`` to ``from_pretrained``).
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
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple[torch.Tensor, ...]:
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict
        _, pooled, hidden_states = enhancer_forward(
            self.enhancer, pixel_values, output_hidden_states
        )
        logits = self.classifier(pooled)  # (B, num_labels)
        loss = None if labels is None else self.loss_function(labels, logits, self.config)
        if not return_dict:
            return tuple(v for v in (loss, logits, hidden_states) if v is not None)
        return ImageClassifierOutput(loss=loss, logits=logits, hidden_states=hidden_states)


__all__ = [
    "CIMForImageClassification",
    "CIMModel",
    "CIMPreTrainedModel",
    "create_enhancer",
    "enhancer_forward",
]
