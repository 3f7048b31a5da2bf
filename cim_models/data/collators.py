"""Collators: ``{"image", ["label"], ["seed"]}`` items to batches, running the transforms (so
DataLoader workers do the CPU work).

An item with a ``"seed"`` (``cim_models.data.sampling``) has its random crop, flip and mask drawn
from that seed alone, on a forked CPU generator: the global RNG streams are left exactly as they
were, CUDA's included.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image
from timm.data.mixup import mixup_target
from torch.utils.data import default_collate

__all__ = ["CIMDataCollator", "ClassificationCollator"]


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Draw from ``seed`` inside the block, then put the CPU RNG back; no seed: the global RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        # Only the CPU generator: torch.manual_seed would also reseed every CUDA device.
        torch.random.default_generator.manual_seed(seed)
        yield


def _labels(examples: Sequence[dict]) -> torch.Tensor | None:
    labels = [example.get("label") for example in examples]
    if any(label is None for label in labels):
        return None  # a batch with some labels missing is unlabeled: no half-filled tensors
    return torch.tensor(labels, dtype=torch.long)  # (B,)


def _check_not_empty(examples: Sequence, collator: object) -> None:
    if not examples:
        raise ValueError(
            f"{type(collator).__name__} got an empty batch; check the dataset is not empty."
        )


class CIMDataCollator:
    """Turn items into a CIM batch: two views and one fresh block mask per sample.

    Returns ``pixel_values`` (B, 3, S, S), ``tokenizer_pixel_values`` (B, 3, T, T),
    ``bool_masked_pos`` (B, h, w), and ``labels`` (B,) only when every item has a label.
    """

    def __init__(
        self,
        transform: Callable[[Image.Image], dict[str, torch.Tensor]],
        mask_generator: Callable[[], torch.Tensor],
    ):
        self.transform = transform
        self.mask_generator = mask_generator

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r}, {self.mask_generator!r})"

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        _check_not_empty(examples, self)
        views, masks = [], []
        for example in examples:
            with _seeded(example.get("seed")):
                views.append(self.transform(example["image"]))
                masks.append(self.mask_generator())
        # default_collate stacks straight into shared memory inside a DataLoader worker, which
        # saves copying every batch once more on its way to the main process.
        batch = default_collate(views)  # (B, 3, S, S) and (B, 3, T, T)
        batch["bool_masked_pos"] = default_collate(masks).bool()  # (B, h, w)
        labels = _labels(examples)
        if labels is not None:
            batch["labels"] = labels
        return batch


class ClassificationCollator:
    """Batch items through an image transform: ``pixel_values`` (B, 3, S, S) and ``labels``.

    Labels are (B,) class ids; unlabeled items give ``pixel_values`` only (features). With
    ``mixup`` (timm's ``Mixup``, fine-tuning) every item needs a label and ``labels`` become (B, C)
    soft targets: mixed pairs, smoothed. timm mixes pairs, so an odd batch keeps its images and only
    smooths its targets.
    """

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor], mixup: Any = None):
        self.transform = transform
        self.mixup = mixup

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r}, mixup={self.mixup is not None})"

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        _check_not_empty(examples, self)
        pixel_values = default_collate([self.transform(ex["image"]) for ex in examples])
        batch = {"pixel_values": pixel_values}  # (B, 3, S, S)
        labels = _labels(examples)
        if self.mixup is not None:
            if labels is None:
                raise ValueError(
                    "Mixup needs labelled images; an item without 'label' reached the collator."
                )
            if len(labels) % 2 == 0:
                batch["pixel_values"], labels = self.mixup(pixel_values, labels)  # (B, C)
            else:
                mixup = self.mixup
                labels = mixup_target(labels, mixup.num_classes, 1.0, mixup.label_smoothing)
        if labels is not None:
            batch["labels"] = labels
        return batch
