"""Top-k accuracy: the one metric of every evaluation protocol (kNN, linear probe, fine-tuning)."""

from __future__ import annotations

import torch
from transformers import EvalPrediction

__all__ = ["topk_accuracy", "topk_metrics", "topk_predictions"]


@torch.no_grad()
def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, topk: tuple[int, ...] = (1, 5)
) -> dict[int, float]:
    """``{k: fraction}`` of the rows of ``scores`` (N, C) whose label (N,) is among the ``k`` best.

    ``scores`` may also be classes already ranked best first, (N, K) integer ids (as
    :func:`topk_predictions` keeps them); ``k`` above the number of classes counts every class.
    """
    if scores.is_floating_point():
        scores = scores.topk(min(max(topk), scores.shape[1]), dim=1).indices  # (N, maxk)
    hits = scores == labels.view(-1, 1).to(scores.device)
    return {k: hits[:, :k].any(1).float().mean().item() for k in topk}


def topk_predictions(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The 5 best classes (B, 5) instead of the logits (B, C): what evaluation keeps per image
    (the Trainer's ``preprocess_logits_for_metrics``)."""
    return logits.topk(min(5, logits.shape[-1]), dim=-1).indices


def topk_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """``top1`` and ``top5`` (fractions) from :func:`topk_predictions`' output (the Trainer's
    ``compute_metrics``)."""
    ranked, labels = torch.as_tensor(prediction.predictions), torch.as_tensor(prediction.label_ids)
    return {f"top{k}": value for k, value in topk_accuracy(ranked, labels).items()}
