"""The labelled train and validation splits every evaluation command reads.

An image folder with class sub-folders (``--train_dir``/``--validation_dir``), a Hugging Face
dataset (``--dataset_name``, needs ``datasets``), or, with neither, the built-in synthetic shapes
(train seed 0, validation seed 1, drawn at the backbone's input size). Items are
``{"image", "label"}``; the transforms run in the collators.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset

from ..training.data import HFImageDataset, ImageFolderDataset, SyntheticShapes, load_hf_dataset

SYNTHETIC_NAME = "synthetic-shapes"
SYNTHETIC_TRAIN_SEED, SYNTHETIC_VALIDATION_SEED = 0, 1
_SPLIT_FOLDER_NAMES = {"train", "training", "val", "valid", "validation", "test", "eval"}


def _arg(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass
class DataArguments:
    """Labelled data: image folders, a Hugging Face dataset, or the built-in synthetic shapes."""

    train_dir: str | None = _arg(None, "Training images in class sub-folders.")
    validation_dir: str | None = _arg(None, "Validation images, the same class sub-folders.")
    dataset_name: str | None = _arg(None, "Hugging Face dataset name or path (needs `datasets`).")
    dataset_config_name: str | None = _arg(None, "Its configuration name.")
    train_split: str = _arg("train", "Split to train on (kNN bank, probe, fine-tuning).")
    validation_split: str = _arg("validation", "Split the metrics are measured on.")
    image_column_name: str | None = _arg(None, "Image column (default: image/img).")
    label_column_name: str | None = _arg(None, "Label column (default: label/labels).")
    synthetic_train_samples: int = _arg(3000, "Built-in data: training images.")
    synthetic_eval_samples: int = _arg(1000, "Built-in data: validation images.")
    max_train_samples: int | None = _arg(None, "Use a random subset of this many training images.")
    max_eval_samples: int | None = _arg(None, "Use a random subset of this many validation images.")
    dataset_label: str | None = _arg(
        None,
        "The data set's name in results and model cards, e.g. imagenet-1k (default: "
        "--dataset_name, the folders' name, or synthetic-shapes).",
    )
    strict_data: bool = _arg(False, "Stop at an unreadable image instead of skipping it.")


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
        return {**self.description, "train_set": _describe(self.train),
                "validation_set": _describe(self.validation)}


def load_labelled_data(args: DataArguments, image_size: int) -> LabelledData:
    """The train and validation splits named by ``args``; raises with what to pass when one is
    missing or unlabelled."""
    if args.train_dir or args.validation_dir:
        if not (args.train_dir and args.validation_dir):
            raise ValueError(
                "Image folders need both --train_dir and --validation_dir (class sub-folders in "
                f"each); got train_dir={args.train_dir!r}, validation_dir={args.validation_dir!r}."
            )
        train = ImageFolderDataset(args.train_dir, strict=args.strict_data)
        validation = ImageFolderDataset(args.validation_dir, strict=args.strict_data)
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
    elif args.dataset_name:
        hf = dict(config_name=args.dataset_config_name, image_column=args.image_column_name,
                  label_column=args.label_column_name)
        train = load_hf_dataset(args.dataset_name, split=args.train_split, **hf)
        validation = load_hf_dataset(args.dataset_name, split=args.validation_split, **hf)
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
        train = SyntheticShapes(
            args.synthetic_train_samples, image_size=image_size, seed=SYNTHETIC_TRAIN_SEED
        )
        validation = SyntheticShapes(
            args.synthetic_eval_samples, image_size=image_size, seed=SYNTHETIC_VALIDATION_SEED
        )
        classes = list(train.classes)
        source = (f"built-in SyntheticShapes, {image_size} px, train seed {SYNTHETIC_TRAIN_SEED}, "
                  f"validation seed {SYNTHETIC_VALIDATION_SEED}")
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
