"""The enhancer's objectives: ResPix (restore normalised pixels), RevDet (find replaced tokens)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _window_average(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Mean over the ``window_size`` x ``window_size`` window of each pixel; stride 1, same size.

    On each axis the window of pixel p spans p - (k - 1) // 2 .. p + k // 2 (k = 16: p - 7 ..
    p + 8). Zero padding plus division by the number of in-image pixels makes border windows
    average only the pixels inside the image. The box is separable: a column pass and a row pass
    cost 2k additions per pixel instead of k * k.
    """
    before, after = (window_size - 1) // 2, window_size // 2
    pad = (before, after, before, after)

    def box(t: torch.Tensor) -> torch.Tensor:
        t = F.avg_pool2d(F.pad(t, pad), (window_size, 1), stride=1)
        return F.avg_pool2d(t, (1, window_size), stride=1)

    return box(x) / box(torch.ones_like(x[:1, :1]))


def window_statistics(images: torch.Tensor, window_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance, each (B, 1, H, W) float32, of the window around every pixel.

    The statistics are joint over the channels: the k x k x C values of a window count alike. The
    variance is the biased estimator (divide by n, the number of in-image values of the window),
    as a normalisation needs. ``E[x^2] - E[x]^2`` cancels catastrophically on flat regions (8-bit
    images are mostly flat at this scale), so it is taken in float64 (float32 on MPS, which has no
    float64) after subtracting each image's mean, which leaves the variance unchanged.
    """
    dtype = torch.float32 if images.device.type == "mps" else torch.float64
    x = images.to(dtype)
    shift = x.mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    x = x - shift
    mean = _window_average(x.mean(1, keepdim=True), window_size)  # (B, 1, H, W)
    mean_sq = _window_average(x.pow(2).mean(1, keepdim=True), window_size)
    var = (mean_sq - mean.pow(2)).clamp_min(0)
    return (mean + shift).float(), var.float()


def sliding_window_normalize(
    images: torch.Tensor, window_size: int = 16, eps: float = 1e-6
) -> torch.Tensor:
    """ResPix's target: each pixel minus its window's mean, over the window's standard deviation,
    ``(x(p) - mean_k(p)) / sqrt(var_k(p) + eps)``.

    Statistics as :func:`window_statistics` defines them: joint over the channels, so colour
    relations inside a window survive normalisation; biased variance; border windows hold only
    in-image pixels. ``images``: (B, C, H, W) in any range; returns the same shape in float32. A
    constant window gives 0.
    """
    mean, var = window_statistics(images, window_size)
    return (images.float() - mean) * torch.rsqrt(var + eps)


def respix_loss(predicted_pixels: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all pixels: every pixel is re-rendered by the decoder, so all are
    restored."""
    return F.mse_loss(predicted_pixels.float(), target)


def revdet_labels(
    input_ids: torch.Tensor, corrupted_ids: torch.Tensor, bool_masked_pos: torch.Tensor
) -> torch.Tensor:
    """1 where a token was replaced, by the ELECTRA rule: a masked position whose sample equals
    the original counts as not replaced, and unmasked positions are never replaced. Shapes
    (B, h, w)."""
    return (corrupted_ids != input_ids) & bool_masked_pos.view_as(input_ids)


def revdet_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy over every token position."""
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
