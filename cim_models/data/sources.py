"""Where the images come from: the built-in synthetic shapes, a folder of files, or a Hugging Face
dataset; and ``load_split``, the one dispatch from the data flags that every command uses.

Sources yield ``{"image": PIL RGB image, "label": int}`` items (no ``"label"`` when unlabeled). The
transforms run in the collators (``cim_models.data.collators``), so DataLoader workers do that work.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .arguments import DataArguments
from .images import IMG_EXTENSIONS, UnreadableImageError, open_image, to_rgb

__all__ = [
    "SHAPE_CLASSES",
    "SYNTHETIC_TRAIN_SEED",
    "SYNTHETIC_VALIDATION_SEED",
    "HFImageDataset",
    "ImageFolderDataset",
    "SyntheticShapes",
    "data_source",
    "load_hf_dataset",
    "load_split",
]

# --------------------------------------------------------------------------------------------------
# Synthetic shapes: the file-free default data set
# --------------------------------------------------------------------------------------------------

SHAPE_CLASSES = (
    "disc",
    "square",
    "triangle",
    "cross",
    "ring",
    "horizontal_stripes",
    "vertical_stripes",
    "checker",
    "dots",
    "diamond",
)


class SyntheticShapes(Dataset):
    """Procedurally drawn shapes and textures with class labels; needs no files or downloads.

    Image ``i`` depends only on ``(seed, i)``, so two processes (DataLoader workers, a resumed run,
    a test) see the same pixels without sharing state. Classes are balanced (a seeded permutation
    of ``i % num_classes``) so small subsets still hold every class. Each image has a random
    foreground and background colour with a minimum contrast, a random centre and size, and
    Gaussian pixel noise (sigma 8/255) so no two images of a class are identical and the tokenizer
    sees texture. Drawing is vectorised numpy on a precomputed pixel grid: thousands of 64x64
    images per second.
    """

    def __init__(
        self, num_samples: int = 3000, image_size: int = 64, num_classes: int = 10, seed: int = 0
    ):
        if not 1 <= num_classes <= len(SHAPE_CLASSES):
            raise ValueError(
                f"SyntheticShapes draws at most {len(SHAPE_CLASSES)} classes "
                f"({', '.join(SHAPE_CLASSES)}), got num_classes={num_classes}."
            )
        if num_samples < 1 or image_size < 8:
            raise ValueError(
                f"SyntheticShapes needs num_samples >= 1 and image_size >= 8, got {num_samples} "
                f"and {image_size}."
            )
        self.num_samples = num_samples
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.classes = list(SHAPE_CLASSES[:num_classes])
        order = np.random.default_rng(seed).permutation(num_samples)
        self.labels = (order % num_classes).astype(np.int64)
        centres = np.arange(image_size, dtype=np.float32) + 0.5
        self._y, self._x = np.meshgrid(centres, centres, indexing="ij")  # (S, S) each

    def __len__(self) -> int:
        return self.num_samples

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_samples={self.num_samples}, image_size={self.image_size}, "
            f"num_classes={self.num_classes}, seed={self.seed})"
        )

    def _mask(self, name: str, rng: np.random.Generator) -> np.ndarray:
        size = self.image_size
        radius = rng.uniform(0.18, 0.32) * size
        cx, cy = rng.uniform(radius, size - radius, size=2)
        dx, dy = self._x - cx, self._y - cy
        adx, ady = np.abs(dx), np.abs(dy)
        if name == "disc":
            return dx * dx + dy * dy <= radius * radius
        if name == "ring":
            d2 = dx * dx + dy * dy
            return (d2 <= radius * radius) & (d2 >= (0.55 * radius) ** 2)
        if name == "square":
            return np.maximum(adx, ady) <= 0.85 * radius
        if name == "diamond":
            return adx + ady <= 1.2 * radius
        if name == "triangle":  # apex up, base at cy + r/2
            return (dy <= 0.5 * radius) & (adx <= (dy + radius) / math.sqrt(3.0))
        if name == "cross":
            arm = 0.3 * radius
            return ((adx <= radius) & (ady <= arm)) | ((adx <= arm) & (ady <= radius))
        # Textures fill a square patch; the period stays >= ~5 px so a 64 px image resolves it.
        region = np.maximum(adx, ady) <= radius
        period = rng.uniform(0.08, 0.14) * size
        px, py = dx + rng.uniform(0, period), dy + rng.uniform(0, period)
        if name == "horizontal_stripes":
            pattern = np.floor(py / (period / 2)) % 2 == 0
        elif name == "vertical_stripes":
            pattern = np.floor(px / (period / 2)) % 2 == 0
        elif name == "checker":
            pattern = (np.floor(px / (period / 2)) + np.floor(py / (period / 2))) % 2 == 0
        elif name == "dots":
            ox, oy = px % period - period / 2, py % period - period / 2
            pattern = ox * ox + oy * oy <= (0.3 * period) ** 2
        else:
            raise AssertionError(f"no drawing for class {name!r}")
        return region & pattern

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += self.num_samples
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} samples")
        rng = np.random.default_rng((self.seed, index))
        label = int(self.labels[index])
        foreground, background = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
        while np.abs(foreground - background).sum() < 160:  # keep every shape visible
            foreground, background = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
        mask = self._mask(self.classes[label], rng)
        pixels = np.where(mask[..., None], foreground, background)  # (S, S, 3)
        pixels += rng.normal(0.0, 8.0, size=pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
        return {"image": image, "label": label}


# --------------------------------------------------------------------------------------------------
# A folder of image files
# --------------------------------------------------------------------------------------------------


def _scan(root: Path, extensions: tuple[str, ...]) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        # Hidden folders and files (.ipynb_checkpoints, macOS "._x.jpg" resource forks) are never
        # images of the data set; a resource fork would pass the extension test and fail to decode.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(
            Path(dirpath, name)
            for name in filenames
            if not name.startswith(".") and name.lower().endswith(extensions)
        )
    return sorted(files)


class ImageFolderDataset(Dataset):
    """Every image file under ``root`` (recursively), with labels when ``root`` holds class folders.

    Labelled when every image lies inside a first-level sub-folder: the sub-folder names, sorted,
    are ``classes`` and items are ``{"image", "label"}``, as in torchvision's ``ImageFolder``.
    Otherwise (images directly in ``root``) the set is unlabeled, items are ``{"image"}`` and
    ``classes`` is empty.

    Unreadable files (corrupt, truncated, zero bytes): with ``strict=False`` the file is named in a
    warning, added to ``skipped_files`` and the next readable file is returned in its place, so a
    batch stays full and one bad file among a million does not stop a long run; a file once skipped
    is not decoded again. With ``strict=True`` the first one raises ``UnreadableImageError``. With
    DataLoader workers each worker keeps its own ``skipped_files``; the warnings show them all.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        strict: bool = False,
        extensions: Sequence[str] = IMG_EXTENSIONS,
    ):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"Image folder {str(self.root)!r} does not exist or is not a folder; pass the "
                "folder that holds the images (or their class sub-folders)."
            )
        self.extensions = tuple(
            ext.lower() if ext.startswith(".") else f".{ext.lower()}" for ext in extensions
        )
        self.strict = strict
        files = _scan(self.root, self.extensions)
        if not files:
            raise ValueError(
                f"No image files found under {str(self.root)!r} (looked recursively for "
                f"{', '.join(self.extensions)}); check the path, or pass extensions= for other "
                "file types."
            )
        relative = [f.relative_to(self.root).parts for f in files]
        self.labeled = all(len(parts) > 1 for parts in relative)
        self.classes = sorted({parts[0] for parts in relative}) if self.labeled else []
        index = {name: i for i, name in enumerate(self.classes)}
        # numpy arrays instead of lists of Python objects: forked DataLoader workers then share
        # the pages instead of copying them as reference counts change (memory grows per worker).
        self.paths = np.array([str(f) for f in files])
        self.labels = (
            np.array([index[p[0]] for p in relative], dtype=np.int64) if self.labeled else None
        )
        self.skipped_files: set[str] = set()

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        kind = f"{len(self.classes)} classes" if self.labeled else "unlabeled"
        return f"{type(self).__name__}({str(self.root)!r}, {len(self)} images, {kind})"

    def _item(self, index: int) -> dict[str, Any]:
        item: dict[str, Any] = {"image": open_image(self.paths[index])}
        if self.labels is not None:
            item["label"] = int(self.labels[index])
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        last_error: Exception | None = None
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            path = str(self.paths[candidate])
            if path in self.skipped_files:
                continue
            try:
                return self._item(candidate)
            # PIL signals a malformed file with many exception types (OSError, SyntaxError,
            # ValueError, struct.error, EOFError, DecompressionBombError, ...); all mean "unusable".
            except Exception as error:
                if self.strict:
                    raise UnreadableImageError(
                        f"Cannot read image file {path!r} ({type(error).__name__}: {error}). "
                        "Remove or replace the file, or drop --strict_data to skip unreadable "
                        "files with a warning."
                    ) from error
                last_error = error
                self.skipped_files.add(path)
                warnings.warn(
                    f"Skipping unreadable image file {path!r} ({type(error).__name__}: {error}); "
                    "using the next readable file instead. Remove the file to silence this "
                    "warning.",
                    stacklevel=2,
                )
        raise UnreadableImageError(
            f"None of the {len(self)} image files under {str(self.root)!r} could be read (last "
            f"error: {type(last_error).__name__}: {last_error}); check that they are images PIL "
            "can open."
        )


# --------------------------------------------------------------------------------------------------
# Hugging Face datasets (optional dependency)
# --------------------------------------------------------------------------------------------------


class HFImageDataset(Dataset):
    """A map-style Hugging Face dataset seen as ``{"image", ["label"]}`` items with RGB images."""

    def __init__(self, dataset: Any, image_column: str, label_column: str | None = None):
        self.dataset = dataset
        self.image_column = image_column
        self.label_column = label_column
        feature = getattr(dataset, "features", {}).get(label_column) if label_column else None
        self.classes = list(getattr(feature, "names", None) or [])

    def __len__(self) -> int:
        return len(self.dataset)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({len(self)} rows, image={self.image_column!r}, "
            f"label={self.label_column!r})"
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.dataset[int(index)]
        image = row[self.image_column]
        if isinstance(image, dict):  # an Image feature stored with decode=False
            image = Image.open(
                image["path"] if image.get("bytes") is None else io.BytesIO(image["bytes"])
            )
        elif isinstance(image, np.ndarray):
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise TypeError(
                f"Column {self.image_column!r} holds {type(image).__name__}, not an image; pass "
                "the column that holds the images as image_column=."
            )
        item: dict[str, Any] = {"image": to_rgb(image)}
        if self.label_column is not None:
            item["label"] = int(row[self.label_column])
        return item


def _pick_column(
    columns: Sequence[str], wanted: str | None, candidates: tuple[str, ...], what: str
) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise ValueError(
                f"The dataset has no {what} column {wanted!r}; its columns are {list(columns)}."
            )
        return wanted
    return next((name for name in candidates if name in columns), None)


def load_hf_dataset(
    name_or_path: str,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    config_name: str | None = None,
) -> HFImageDataset:
    """Load a Hub data set or a local one (``save_to_disk`` folder or image folder) for CIM.

    Columns are found unless given: images in ``image``, ``img`` or any ``Image`` feature, labels
    in ``label`` or ``labels`` (optional: without one, items carry no label). Only these columns
    are kept, so other columns (captions, metadata) are never decoded. Needs the optional
    ``datasets`` library.
    """
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "Loading a Hugging Face dataset needs the `datasets` library, which is not installed; "
            'run `pip install "cim-models[datasets]"`, or use an image folder instead.'
        ) from error

    is_saved = os.path.isdir(name_or_path) and any(
        os.path.exists(os.path.join(name_or_path, f)) for f in ("dataset_dict.json", "state.json")
    )
    if is_saved:
        dataset = datasets.load_from_disk(name_or_path)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(
                    f"{name_or_path!r} has no split {split!r}; its splits are {list(dataset)}."
                )
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(name_or_path, config_name, split=split)

    columns = list(dataset.column_names)
    image_column = _pick_column(columns, image_column, ("image", "img"), "image")
    if image_column is None:  # any other name, as long as it holds an ``Image`` feature
        features = getattr(dataset, "features", None) or {}
        image_column = next((n for n, f in features.items() if type(f).__name__ == "Image"), None)
    if image_column is None:
        raise ValueError(
            f"Cannot tell which column of {name_or_path!r} holds the images (looked for 'image', "
            f"'img'); its columns are {columns}. Pass image_column=."
        )
    label_column = _pick_column(columns, label_column, ("label", "labels"), "label")
    keep = [c for c in (image_column, label_column) if c is not None]
    if len(keep) < len(columns) and hasattr(dataset, "select_columns"):
        dataset = dataset.select_columns(keep)
    return HFImageDataset(dataset, image_column, label_column)


# --------------------------------------------------------------------------------------------------
# The dispatch from the data flags
# --------------------------------------------------------------------------------------------------

# The built-in data of every command: pre-training, its kNN monitor and the evaluation commands all
# see the same training and validation images.
SYNTHETIC_TRAIN_SEED, SYNTHETIC_VALIDATION_SEED = 0, 1


def data_source(args: DataArguments) -> str:
    """``"folder"``, ``"hf"`` or ``"synthetic"``: which kind of data the flags name."""
    if args.train_dir or args.validation_dir:
        return "folder"
    if args.dataset_name:
        return "hf"
    return "synthetic"


def load_split(args: DataArguments, split: str, image_size: int) -> Dataset | None:
    """The ``"train"`` or ``"validation"`` split named by the data flags; ``None`` for a validation
    split the flags do not name.

    Image folders (``--train_dir``, ``--validation_dir``), a Hugging Face dataset
    (``--dataset_name`` with ``--train_split``/``--validation_split``), or with neither the
    built-in ``SyntheticShapes`` drawn at ``image_size`` (train seed 0, validation seed 1).
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}.")
    source = data_source(args)
    if source == "folder":
        folder = args.train_dir if split == "train" else args.validation_dir
        if folder is None and split == "train":
            raise ValueError(
                f"--validation_dir {args.validation_dir} was given without --train_dir; pass the "
                "folder of training images too."
            )
        return None if folder is None else ImageFolderDataset(folder, strict=args.strict_data)
    if source == "hf":
        name = args.train_split if split == "train" else args.validation_split
        if name is None:
            return None
        return load_hf_dataset(
            args.dataset_name,
            split=name,
            image_column=args.image_column_name,
            label_column=args.label_column_name,
            config_name=args.dataset_config_name,
        )
    if split == "train":
        return SyntheticShapes(args.synthetic_train_samples, image_size, seed=SYNTHETIC_TRAIN_SEED)
    return SyntheticShapes(args.synthetic_eval_samples, image_size, seed=SYNTHETIC_VALIDATION_SEED)
