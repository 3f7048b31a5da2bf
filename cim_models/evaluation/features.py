"""Pooled features of a frozen backbone, computed once per split and cached in the output folder.

The kNN classifier and the linear probe both read the cache (``features.safetensors``): the first of
them to run pays for the forward passes, the other reuses them. A cache is reused only when its
fingerprint (weights, data, transform) matches this run's exactly; otherwise it is recomputed.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

CACHE_FILE = "features.safetensors"


@torch.no_grad()
def pooled_features(
    enhancer: nn.Module,
    loader: DataLoader,
    device: torch.device | str,
    desc: str = "features",
    disable_tqdm: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw pooled features (N, D) in float32 and labels (N,) of every batch of ``loader``.

    ``enhancer(pixel_values)`` is timm's pooled pre-logits feature (it has ``num_classes=0``).
    Unlike ``cim_models.knn.extract_features`` the features are not L2-normalised: the linear
    probe standardises them with its BatchNorm, the kNN classifier normalises them itself.
    """
    enhancer.eval()
    features, labels = [], []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=disable_tqdm):
        output = enhancer(batch["pixel_values"].to(device, non_blocking=True))
        features.append(output.float().flatten(1).cpu())  # (B, D)
        labels.append(batch["labels"])
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
            dataset, batch_size=batch_size, shuffle=False, collate_fn=collator,
            num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
        )
        desc = f"{split} features"
        result[split] = pooled_features(enhancer, loader, device, desc, disable_tqdm)
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
    except Exception as err:  # a damaged or partial file: recompute rather than fail
        logger.warning("Ignoring unreadable feature cache %s (%s)", path, err)
        return None
