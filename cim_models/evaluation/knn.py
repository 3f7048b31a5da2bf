"""k-nearest-neighbour classification on frozen features: the cheap probe of a pre-trained
backbone (``cim-eval knn``, and the kNN monitor of pre-training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .metrics import topk_accuracy


@torch.no_grad()
def knn_predict(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> torch.Tensor:
    """Class scores (Q, C) of each query by a vote of its ``k`` most cosine-similar bank features,
    each weighted by ``exp(similarity / temperature)`` (the InstDisc / DINO rule).

    Features must be L2-normalised. Queries are processed in batches, so the (Q, N) similarity
    matrix never exists whole and ImageNet-size banks fit on one GPU.
    """
    if bank_features.shape[0] == 0:
        raise ValueError("The kNN feature bank is empty.")
    num_classes = num_classes or int(bank_labels.max()) + 1
    k = min(k, bank_features.shape[0])
    scores = []
    for start in range(0, query_features.shape[0], batch_size):
        similarity = query_features[start : start + batch_size] @ bank_features.T  # (q, N)
        top_similarity, top_index = similarity.topk(k, dim=1)  # (q, k)
        votes = F.one_hot(bank_labels[top_index], num_classes).float()  # (q, k, C)
        weights = (top_similarity / temperature).exp().unsqueeze(-1)
        scores.append((votes * weights).sum(1))  # (q, C)
    return torch.cat(scores)


def knn_accuracy(
    bank_features: torch.Tensor,
    bank_labels: torch.Tensor,
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    k: int = 20,
    temperature: float = 0.07,
    topk: tuple[int, ...] = (1,),
) -> dict[int, float]:
    """Top-k accuracies of :func:`knn_predict`, as fractions in [0, 1]."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    scores = knn_predict(bank_features, bank_labels, query_features, k, temperature, num_classes)
    return topk_accuracy(scores, query_labels, topk)
