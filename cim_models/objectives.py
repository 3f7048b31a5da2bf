"""The enhancer's objectives: ResPix (restore normalised pixels) and RevDet (detect replaced tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _window_average(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Mean over a window_size x window_size window centred on each pixel; stride 1, same size.

    Zero padding plus division by the number of in-image pixels makes border windows average only over
    pixels inside the image (not over replicated or zero pixels).
    """
    before, after = (window_size - 1) // 2, window_size // 2
    pad = (before, after, before, after)
    sums = F.avg_pool2d(F.pad(x, pad), window_size, stride=1)
    counts = F.avg_pool2d(F.pad(torch.ones_like(x[:1, :1]), pad), window_size, stride=1)
    return sums / counts


def window_statistics(images: torch.Tensor, window_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance (each (B, 1, H, W)) of the window around every pixel, joint over channels."""
    x = images.float()
    mean = _window_average(x.mean(1, keepdim=True), window_size)
    mean_sq = _window_average(x.pow(2).mean(1, keepdim=True), window_size)
    return mean, (mean_sq - mean.pow(2)).clamp_min(0)


def sliding_window_normalize(images: torch.Tensor, window_size: int = 16, eps: float = 1e-6) -> torch.Tensor:
    """ResPix's target: each pixel minus its window's mean, over the window's standard deviation.

    Statistics are joint over the channels, so colour relations inside a window survive normalisation.
    ``images``: (B, C, H, W) in any range; returns the same shape in float32. A constant window gives 0.
    """
    mean, var = window_statistics(images, window_size)
    return (images.float() - mean) / torch.sqrt(var + eps)


def respix_loss(predicted_pixels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all pixels: every pixel is re-rendered by the decoder, so all are restored."""
    return F.mse_loss(predicted_pixels.float(), target)


def revdet_labels(
    input_ids: torch.Tensor, corrupted_ids: torch.Tensor, bool_masked_pos: torch.Tensor
) -> torch.Tensor:
    """1 where a token was replaced, by the ELECTRA rule: a masked position whose sample equals the
    original counts as not replaced, and unmasked positions are never replaced. Shapes (B, h, w)."""
    return (corrupted_ids != input_ids) & bool_masked_pos.view_as(input_ids)


def revdet_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over every token position."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
