"""The labelled train and validation splits every evaluation command reads.

The data flags of ``cim_models.data`` (image folders with class sub-folders, a Hugging Face dataset,
or the built-in synthetic shapes drawn at the backbone's input size), plus subsets and the name the
results carry. Items are ``{"image", "label"}``; the transforms run in the collators.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..data import (
    SYNTHETIC_TRAIN_SEED,
    SYNTHETIC_VALIDATION_SEED,
    HFImageDataset,
    argument,
    data_source,
    load_split,
)
from ..data import DataArguments as _DataArguments

SYNTHETIC_NAME = "synthetic-shapes"
_SPLIT_FOLDER_NAMES = {"train", "training", "val", "valid", "validation", "test", "eval"}


@dataclass
class DataArguments(_DataArguments):
    """Labelled data: image folders, a Hugging Face dataset, or the built-in synthetic shapes."""

    max_train_samples: int | None = argument(
        None, "Use a random subset of this many training images."
    )
    max_eval_samples: int | None = argument(
        None, "Use a random subset of this many validation images."
    )
    dataset_label: str | None = argument(
        None,
        "The data set's name in results and model cards, e.g. imagenet-1k (default: "
        "--dataset_name, the folders' name, or synthetic-shapes).",
    )


@dataclass
class LabelledData:
    train: Dataset
    validation: Dataset
    classes: list[str]  # class names, index = label
    description: dict[str, Any]  # the results' "dataset" entry

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What identifies the images (for the feature cache)."""
        return {
            **self.description,
            "train_set": _describe(self.train),
            "validation_set": _describe(self.validation),
        }


def load_labelled_data(args: DataArguments, image_size: int) -> LabelledData:
    """The train and validation splits named by ``args``; raises with what to pass when one is
    missing or unlabelled."""
    source = data_source(args)
    if source == "folder" and not (args.train_dir and args.validation_dir):
        raise ValueError(
            "Image folders need both --train_dir and --validation_dir (class sub-folders in "
            f"each); got train_dir={args.train_dir!r}, validation_dir={args.validation_dir!r}."
        )
    if source == "hf" and not args.validation_split:
        raise ValueError(
            f"--validation_split is empty; name the split of {args.dataset_name} to measure on."
        )
    train = load_split(args, "train", image_size)
    validation = load_split(args, "validation", image_size)
    if source == "folder":
        for name, dataset in (("--train_dir", train), ("--validation_dir", validation)):
            if not dataset.labeled:
                raise ValueError(
                    f"{name} {dataset.root} holds images directly, not in class sub-folders, so it "
                    "has no labels; evaluation needs one sub-folder per class."
                )
        if train.classes != validation.classes:
            only_train = sorted(set(train.classes) - set(validation.classes))[:5]
            only_val = sorted(set(validation.classes) - set(train.classes))[:5]
            raise ValueError(
                "--train_dir and --validation_dir have different class folders (only in train: "
                f"{only_train}, only in validation: {only_val}); labels are the sorted folder "
                "names, so they must match."
            )
        classes = list(train.classes)
        source, name = str(Path(args.validation_dir).resolve()), _folder_name(args.validation_dir)
        train_split, split = str(args.train_dir), str(args.validation_dir)
    elif source == "hf":
        for split_name, dataset in ((args.train_split, train), (args.validation_split, validation)):
            if dataset.label_column is None:
                raise ValueError(
                    f"Split {split_name!r} of {args.dataset_name} has no label column (looked for "
                    "'label', 'labels'); pass --label_column_name."
                )
        classes = train.classes or _numbered_classes(train, validation)
        source, name = args.dataset_name, args.dataset_name
        train_split, split = args.train_split, args.validation_split
    else:
        classes = list(train.classes)
        source = (
            f"built-in SyntheticShapes, {image_size} px, train seed {SYNTHETIC_TRAIN_SEED}, "
            f"validation seed {SYNTHETIC_VALIDATION_SEED}"
        )
        name, train_split, split = SYNTHETIC_NAME, "train", "validation"

    train = _subset(train, args.max_train_samples, seed=0)
    validation = _subset(validation, args.max_eval_samples, seed=1)
    description = {
        "name": args.dataset_label or name,
        "source": source,
        "config": args.dataset_config_name,
        "train_split": train_split,
        "split": split,
        "num_classes": len(classes),
    }
    description = {k: v for k, v in description.items() if v is not None}
    return LabelledData(train, validation, classes, description)


def _folder_name(folder: str) -> str:
    """``/data/imagenet/val`` -> ``imagenet``: a folder named like a split goes by its parent."""
    path = Path(folder).resolve()
    if path.name.lower() in _SPLIT_FOLDER_NAMES and path.parent.name:
        return path.parent.name
    return path.name


def _numbered_classes(*datasets: HFImageDataset) -> list[str]:
    """Class names "0".."C-1" for a label column without names (C from the largest label seen)."""
    largest = max(int(np.max(d.dataset[d.label_column])) for d in datasets)
    return [str(i) for i in range(largest + 1)]


def _subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A random (seeded) subset of ``size`` items, so every class stays in; all if it is smaller."""
    if size is None or size >= len(dataset):
        return dataset
    if size < 1:
        raise ValueError(f"max samples must be at least 1, got {size}.")
    index = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return Subset(dataset, sorted(index.tolist()))


def _describe(dataset: Dataset) -> str:
    if isinstance(dataset, Subset):
        indices = np.asarray(dataset.indices, dtype=np.int64)
        digest = hashlib.sha1(indices.tobytes()).hexdigest()[:12]
        return f"{_describe(dataset.dataset)}[subset of {len(dataset)}: {digest}]"
    return repr(dataset)
