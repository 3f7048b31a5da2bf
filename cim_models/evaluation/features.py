"""Pooled features of a frozen backbone, computed once per split and cached in the output folder.

The kNN classifier and the linear probe both read the cache (``features.safetensors``): the first of
them to run pays for the forward passes, the other reuses them. A cache is reused only when its
fingerprint (weights, data, transform) matches this run's exactly; otherwise it is recomputed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate.utils import send_to_device
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CACHE_FILE = "features.safetensors"


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    device: torch.device | str | None = None,
    normalize: bool = False,
    desc: str = "features",
    disable_tqdm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features (N, D) in float32 on the CPU and labels (N,) of every batch of ``loader``.

    ``backbone(pixel_values)`` is timm's pooled pre-logits feature (it has ``num_classes=0``).
    ``normalize`` L2-normalises each feature (what the kNN classifier compares); the linear probe
    takes them raw and standardises them with its BatchNorm. The backbone runs in eval mode and
    gets its training mode back afterwards.
    """
    device = device or next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    features, labels = [], []
    try:
        for batch in tqdm(loader, desc=desc, unit="batch", disable=disable_tqdm):
            batch = send_to_device(batch, device, non_blocking=True)
            output = backbone(batch["pixel_values"]).float().flatten(1)  # (B, D)
            features.append((F.normalize(output, dim=1) if normalize else output).cpu())
            labels.append(batch["labels"].cpu())
    finally:
        backbone.train(was_training)
    return torch.cat(features), torch.cat(labels)


def cached_features(
    enhancer: nn.Module,
    datasets: dict[str, Dataset],
    collator: Any,
    cache_dir: str | Path,
    fingerprint: dict[str, Any],
    batch_size: int,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    use_cache: bool = True,
    disable_tqdm: bool = False,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{split: (features (N, D), labels (N,))}`` for each dataset, from the cache when it matches
    ``fingerprint``; computed and written to ``cache_dir/features.safetensors`` otherwise."""
    path = Path(cache_dir) / CACHE_FILE
    key = json.dumps(fingerprint, sort_keys=True, default=str)
    if use_cache and path.is_file():
        cached = _read(path, key, list(datasets))
        if cached is not None:
            logger.info("Features of %s read from %s", ", ".join(datasets), path)
            return cached
        logger.info("%s was computed for other weights, data or transform; recomputing", path)
    result = {}
    for split, dataset in datasets.items():
        loader = DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=False,
            collate_fn=collator,
            num_workers=num_workers,
            pin_memory=torch.device(device).type == "cuda",
        )
        desc = f"{split} features"
        result[split] = extract_features(
            enhancer, loader, device, desc=desc, disable_tqdm=disable_tqdm
        )
    if use_cache:
        tensors = {}
        for split, (features, labels) in result.items():
            tensors[f"{split}.features"] = features.contiguous()
            tensors[f"{split}.labels"] = labels.contiguous()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        save_file(tensors, str(partial), metadata={"fingerprint": key})
        partial.replace(path)
    return result


def _read(
    path: Path, key: str, splits: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != key:
                return None
            names = set(f.keys())
            if not all(f"{s}.features" in names and f"{s}.labels" in names for s in splits):
                return None
            return {s: (f.get_tensor(f"{s}.features"), f.get_tensor(f"{s}.labels")) for s in splits}
    except (OSError, ValueError, SafetensorError) as err:  # damaged or partial: recompute
        logger.warning("Ignoring unreadable feature cache %s (%s)", path, err)
        return None
