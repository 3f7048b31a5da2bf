"""The interface every CIM image tokenizer implements: frozen, ``encode`` to ids, ``decode``."""

from __future__ import annotations

import torch
from torch import nn


class ImageTokenizer(nn.Module):
    """A frozen image tokenizer.

    ``encode(images)`` takes images in ``[0, 1]`` of shape ``(B, 3, H, W)`` and returns token
    ids of shape ``(B, H / downsample, W / downsample)``; ``decode(ids)`` paints images in
    ``[0, 1]`` from such a grid. Subclasses set ``vocab_size`` and ``downsample``. A tokenizer
    never trains: its parameters never require grad and ``train()`` leaves it in eval mode,
    because CIM's corruption must come from a fixed decoder and the tokenizer must stay out of
    the optimizer.

    ``weights_in_checkpoint`` says whether the tokenizer's state must travel in the model's
    checkpoint: True for a tokenizer that cannot be rebuilt from a source (a codebook fitted on
    the training data), False for one that is weightless or reloads from its own files
    (palette, DALL-E).
    """

    vocab_size: int
    downsample: int
    weights_in_checkpoint: bool = False

    def freeze(self) -> ImageTokenizer:
        for param in self.parameters():
            param.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> ImageTokenizer:
        # Trainer and DDP call model.train() on every step; a frozen tokenizer ignores it.
        return self.freeze()

    def reload_weights(self) -> None:
        """(Re)load the weights from the tokenizer's own source; called by ``from_pretrained``."""
        self.freeze()

    def check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"{type(self).__name__}.encode expects RGB images of shape (B, 3, H, W), got "
                f"{tuple(images.shape)}; convert grayscale or RGBA images to RGB first."
            )
        height, width = images.shape[-2:]
        if height % self.downsample or width % self.downsample:
            raise ValueError(
                f"{type(self).__name__} needs image sides divisible by {self.downsample}, got "
                f"{height}x{width}; resize or crop the images."
            )

    def check_ids(self, ids: torch.Tensor) -> None:
        if ids.ndim != 3 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"{type(self).__name__}.decode expects an integer id grid of shape (B, h, w), got "
                f"{tuple(ids.shape)} of {ids.dtype}."
            )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
