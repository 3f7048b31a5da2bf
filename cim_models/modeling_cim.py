"""The CIM enhancer as a transformers model: the base class shared by every CIM model, and the backbone.

This file imports only torch, timm, transformers and ``configuration_cim``, so it can travel inside a
Hub repo and load with ``trust_remote_code=True`` where ``cim_models`` is not installed.
"""

from __future__ import annotations

import timm
from torch import nn
from transformers import PreTrainedModel

from .configuration_cim import CIMConfig


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
    base_model_prefix = "cim"
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
