"""Prediction heads that turn an enhancer's features into ResPix pixels or RevDet per-token logits.

Two families cover every timm backbone: token backbones (ViT, DeiT, BEiT: ``forward_features`` gives
(B, prefix + N, D)) get a per-token linear layer; feature-map backbones (ResNet, ConvNeXt, any CNN:
(B, C, H/s, W/s)) get a 1x1 convolution and a pixel shuffle back to the needed resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TokenHead(nn.Module):
    """Linear per patch token to ``channels * patch_size**2`` values, unpatchified to an image."""

    def __init__(
        self,
        embed_dim: int,
        channels: int,
        patch_size: int,
        grid_size: tuple[int, int],
        num_prefix_tokens: int,
    ):
        super().__init__()
        self.channels, self.patch_size, self.grid_size = channels, patch_size, grid_size
        self.num_prefix_tokens = num_prefix_tokens
        self.proj = nn.Linear(embed_dim, channels * patch_size**2)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.proj(features[:, self.num_prefix_tokens :])  # (B, h*w, C*p*p)
        (h, w), p, c = self.grid_size, self.patch_size, self.channels
        x = x.view(x.shape[0], h, w, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], c, h * p, w * p)  # (B, C, h*p, w*p)


class MapHead(nn.Module):
    """1x1 convolution to ``channels * upscale**2`` maps, pixel-shuffled ``upscale`` times
    larger."""

    def __init__(self, in_channels: int, channels: int, upscale: int):
        super().__init__()
        self.upscale = upscale
        self.proj = nn.Conv2d(in_channels, channels * upscale**2, kernel_size=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(self.proj(features), self.upscale)  # (B, C, H*up, W*up)


def create_head(
    enhancer: nn.Module, objective: str, grid_size: tuple[int, int], patch_size: int
) -> nn.Module:
    """The head for ``enhancer`` and ``objective``: ResPix -> (B, 3, H, W), RevDet -> (B, 1, h, w).

    ``grid_size`` is the visual-token grid and ``patch_size`` its stride in input pixels.
    """
    channels = 3 if objective == "respix" else 1
    name = type(enhancer).__name__
    if hasattr(enhancer, "patch_embed") and hasattr(enhancer, "num_prefix_tokens"):
        enhancer_grid = tuple(enhancer.patch_embed.grid_size)
        enhancer_patch = enhancer.patch_embed.patch_size[0]
        if objective == "revdet" and enhancer_grid != tuple(grid_size):
            raise ValueError(
                f"RevDet predicts one logit per visual token, so the enhancer's patch grid "
                f"{enhancer_grid} must equal the token grid {tuple(grid_size)}; use an enhancer "
                f"with patch size {patch_size}."
            )
        out_patch = enhancer_patch if objective == "respix" else 1
        return TokenHead(
            enhancer.num_features, channels, out_patch, enhancer_grid, enhancer.num_prefix_tokens
        )
    feature_info = getattr(enhancer, "feature_info", None)
    if not feature_info:
        raise ValueError(
            f"Cannot attach a CIM head to {name}: it is neither a token backbone (patch_embed, "
            "num_prefix_tokens) nor a timm feature-map backbone (feature_info)."
        )
    stride = feature_info[-1]["reduction"]
    upscale = stride if objective == "respix" else stride // patch_size
    if upscale < 1 or (objective == "revdet" and stride % patch_size):
        raise ValueError(
            f"{name}'s final feature map has stride {stride}; RevDet needs a stride that is a "
            f"multiple of the token stride {patch_size}."
        )
    return MapHead(enhancer.num_features, channels, upscale)
