"""The data layer: image sources, CIM's two views, block masks, and the collators that batch them.

Sources yield ``{"image": PIL RGB image, "label": int}`` items (no ``"label"`` when unlabeled):
``SyntheticShapes`` (no files, the small-scale default), ``ImageFolderDataset`` (a folder of
files) and ``load_hf_dataset`` (a Hugging Face ``datasets`` dataset). The transforms and masks run
in the collators, so DataLoader workers do the CPU work and draw from torch's global RNG, which the
Trainer saves in checkpoints; a resumed run therefore draws the same crops, flips and masks.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset, Sampler, default_collate
from torchvision.transforms import InterpolationMode, RandomResizedCrop

__all__ = [
    "IMG_EXTENSIONS",
    "SHAPE_CLASSES",
    "CIMDataCollator",
    "ClassificationCollator",
    "EvalTransform",
    "HFImageDataset",
    "ImageFolderDataset",
    "SyntheticShapes",
    "TwoViewTransform",
    "UnreadableImageError",
    "load_hf_dataset",
    "open_image",
    "to_rgb",
]

IMG_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jfif",
    ".png",
    ".bmp",
    ".ppm",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
)

# A draft request: a fixed minimum decode size, or a rule from the stored size to that minimum.
DraftSize = tuple[int, int] | Callable[[int, int], "tuple[int, int] | None"] | None


# --------------------------------------------------------------------------------------------------
# Decoding: every image becomes 8-bit RGB
# --------------------------------------------------------------------------------------------------


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    # PIL's own convert("RGB") clips 16/32-bit values at 255, which turns a 16-bit scan into a white
    # sheet. Scale by the nominal range instead, so brightness means the same in every image.
    values = np.asarray(image).astype(np.float32)
    if image.mode.startswith("I;16"):
        values = values / 257.0  # 0..65535 -> 0..255
    else:
        # "I" (int32) and "F" (float32) carry no nominal range. Take the common ones in order:
        # floats in [0, 1], values already in 8-bit range, 16-bit range; anything else (negative or
        # larger values) is stretched min-max, the only mapping that keeps it visible.
        values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        low, high = float(values.min()), float(values.max())
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            values = values * 255.0
        elif low >= 0.0 and high <= 255.0:
            pass
        elif low >= 0.0 and high <= 65535.0:
            values = values / 257.0
        else:
            values = (values - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL image to 8-bit RGB.

    Transparent images are composited onto ``background`` (white) rather than having their alpha
    dropped: the colour stored under fully transparent pixels is arbitrary (often black, sometimes
    leftovers of an editor), so dropping alpha invents content the picture never showed, while white
    reproduces how such images (logos, icons, web graphics) are seen on a page. 16/32-bit and float
    images are scaled to 8 bits, not clipped (see ``_high_depth_to_l``).
    """
    mode = image.mode
    has_key_transparency = "transparency" in image.info
    if mode == "RGB" and not has_key_transparency:
        return image
    if mode.startswith("I") or mode == "F":
        return _high_depth_to_l(image).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or has_key_transparency:
        if mode == "La":  # premultiplied; PIL converts it to RGBA only via LA
            image = image.convert("LA")
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, background)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return image.convert("RGB")


def open_image(path: str | os.PathLike, draft_size: DraftSize = None) -> Image.Image:
    """Decode ``path`` fully into an RGB image; raises whatever PIL raises for a bad file.

    ``draft_size`` asks JPEG decoding for the strongest power-of-two reduction (1/2, 1/4, 1/8)
    whose result is still at least that size on both sides; the decoder then skips the detail,
    which saves decode time and the resize after it (1.9x images/s for 2400x1800 photos at 224 px).
    A callable gets the stored ``(width, height)`` and returns the size (or ``None`` for full
    resolution); the transforms' ``draft_size`` methods are such rules. Non-JPEG formats ignore it.
    """
    with Image.open(path) as image:
        if draft_size is not None and image.format in ("JPEG", "MPO"):  # MPO: camera JPEGs
            wanted = draft_size(*image.size) if callable(draft_size) else draft_size
            if wanted is not None:
                image.draft("RGB", (max(1, int(wanted[0])), max(1, int(wanted[1]))))
        image.load()  # truncated and corrupt files fail here, inside the caller's error handling
        return to_rgb(image)


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


class UnreadableImageError(RuntimeError):
    """An image file that PIL cannot decode (corrupt, truncated, empty, or not an image)."""


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

    ``draft_size`` (see ``open_image``) lets JPEG decoding skip resolution the transform would throw
    away; pass the transform's ``draft_size`` method so the rule matches the crop it will take.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        strict: bool = False,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        draft_size: DraftSize = None,
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
        self.draft_size = draft_size
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
        item: dict[str, Any] = {"image": open_image(self.paths[index], self.draft_size)}
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
# Transforms
# --------------------------------------------------------------------------------------------------

_INTERPOLATIONS = {
    "bicubic": InterpolationMode.BICUBIC,
    "bilinear": InterpolationMode.BILINEAR,
    "lanczos": InterpolationMode.LANCZOS,
    "nearest": InterpolationMode.NEAREST,
}


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return TF.pil_to_tensor(image).float().div_(255.0)  # (3, H, W) in [0, 1]


def _draft_for_scale(width: int, height: int, factor: float) -> tuple[int, int] | None:
    """The decode size that keeps ``factor`` of the stored resolution; ``None`` for all of it."""
    if factor >= 0.5:  # JPEG can only halve; anything less than a halving would lose needed pixels
        return None
    return math.ceil(width * factor), math.ceil(height * factor)


class TwoViewTransform:
    """CIM's views: one random resized crop and flip, rendered at two sizes.

    ``pixel_values`` (3, S, S): bicubic, normalised with ``mean``/``std``; the generator's input
    and ResPix's target. ``tokenizer_pixel_values`` (3, T, T): Lanczos, in ``[0, 1]``; the
    tokenizer's input. Both come from the same crop box of the same decoded image, so token (i, j)
    describes patch (i, j). The crop and flip are drawn from torch's global RNG (see the module
    docstring). Images smaller than the crop are upsampled; any RGB-convertible mode is accepted.
    """

    def __init__(
        self,
        image_size: int = 224,
        tokenizer_image_size: int = 112,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ):
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1] and 0 <= hflip <= 1):
            raise ValueError(
                "TwoViewTransform needs 0 < scale[0] <= scale[1] <= 1, 0 < ratio[0] <= ratio[1] "
                f"and 0 <= hflip <= 1; got scale={scale}, ratio={ratio}, hflip={hflip}."
            )
        self.image_size = int(image_size)
        self.tokenizer_image_size = int(tokenizer_image_size)
        self.scale = tuple(scale)
        self.ratio = tuple(ratio)
        self.hflip = hflip
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, tokenizer_image_size="
            f"{self.tokenizer_image_size}, scale={self.scale}, ratio={self.ratio}, "
            f"hflip={self.hflip})"
        )

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """The smallest decode size at which every crop this transform can draw still has at
        least ``max(image_size, tokenizer_image_size)`` pixels on each side, so drafting never
        costs the views any detail.

        The crop is not known when the file is decoded, so the rule covers the smallest possible
        one: ``RandomResizedCrop`` keeps ``w = sqrt(A s r)``, ``h = sqrt(A s / r)`` with
        ``s >= scale[0]`` and ``r`` in ``ratio`` (its fallback centre crop is larger), hence each
        side is at least ``sqrt(A * scale[0] * min(ratio[0], 1 / ratio[1]))``, less half a pixel of
        rounding. With the default scale 0.08 this allows a 2x reduction only from about 1830 px
        (geometric-mean side) for 224 px views: ImageNet-size photos are decoded in full, large
        camera photos at half or quarter size.
        """
        shortest = math.sqrt(width * height * self.scale[0] * min(self.ratio[0], 1 / self.ratio[1]))
        needed = max(self.image_size, self.tokenizer_image_size)
        return _draft_for_scale(width, height, needed / max(shortest - 0.5, 1e-6))

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        image = to_rgb(image)
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        flip = bool(
            torch.rand(()) < self.hflip
        )  # always drawn, so RNG use does not depend on hflip
        box = (left, top, left + width, top + height)
        size, tokenizer_size = self.image_size, self.tokenizer_image_size
        # resize(box=) crops and resizes in one pass over the source pixels.
        view = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
        tokenizer_view = image.resize(
            (tokenizer_size, tokenizer_size), Image.Resampling.LANCZOS, box=box
        )
        if flip:  # flipping commutes with the symmetric resampling filters; flip the smaller images
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            tokenizer_view = tokenizer_view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {
            "pixel_values": _to_tensor(view).sub_(self.mean).div_(self.std),  # (3, S, S)
            "tokenizer_pixel_values": _to_tensor(tokenizer_view),  # (3, T, T)
        }


class EvalTransform:
    """timm's evaluation transform: resize the shorter side to ``image_size / crop_pct``, centre
    crop, normalise. Deterministic; used by the kNN monitor and evaluation."""

    def __init__(
        self,
        image_size: int = 224,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        crop_pct: float = 0.875,
        interpolation: str = "bicubic",
    ):
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(
                f"Unknown interpolation {interpolation!r}; choose one of {sorted(_INTERPOLATIONS)}."
            )
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
        self.image_size = int(image_size)
        self.crop_pct = crop_pct
        self.resize_size = math.floor(image_size / crop_pct)  # as timm's transforms_factory
        self.interpolation = interpolation
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, crop_pct={self.crop_pct}, "
            f"interpolation={self.interpolation!r})"
        )

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """Decode no smaller than the resize target: shorter side >= ``image_size / crop_pct``."""
        return _draft_for_scale(width, height, self.resize_size / min(width, height))

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = TF.resize(to_rgb(image), self.resize_size, _INTERPOLATIONS[self.interpolation])
        image = TF.center_crop(image, self.image_size)
        return _to_tensor(image).sub_(self.mean).div_(self.std)  # (3, S, S)


# --------------------------------------------------------------------------------------------------
# Collators
# --------------------------------------------------------------------------------------------------


@contextmanager
def _seeded(seed: int | None) -> Iterator[None]:
    """Draw from ``seed`` (set by SeededRandomSampler) without touching the global RNG; no seed: global RNG."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _labels(examples: Sequence[dict]) -> torch.Tensor | None:
    labels = [example.get("label") for example in examples]
    if any(label is None for label in labels):
        return None  # a batch with some labels missing is unlabeled: no half-filled tensors
    return torch.tensor(labels, dtype=torch.long)  # (B,)


class CIMDataCollator:
    """Turn ``{"image", ["label"]}`` items into a CIM batch: transform and mask every sample.

    Returns ``pixel_values`` (B, 3, S, S), ``tokenizer_pixel_values`` (B, 3, T, T),
    ``bool_masked_pos`` (B, h, w) with one fresh mask per sample, and ``labels`` (B,) only when
    every item has a label.
    Doing the CPU work here rather than in the training step lets DataLoader workers run it.
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
        if not examples:
            raise ValueError("CIMDataCollator got an empty batch; check the dataset is not empty.")
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
    """Batch ``{"image", "label"}`` items through an evaluation transform: ``pixel_values``
    (B, 3, S, S) and ``labels`` (B,). Unlabeled items give ``pixel_values`` only (features)."""

    def __init__(self, transform: Callable[[Image.Image], torch.Tensor]):
        self.transform = transform

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.transform!r})"

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError(
                "ClassificationCollator got an empty batch; check the dataset is not empty."
            )
        batch = {"pixel_values": default_collate([self.transform(ex["image"]) for ex in examples])}
        labels = _labels(examples)
        if labels is not None:
            batch["labels"] = labels
        return batch


# --------------------------------------------------------------------------------------------------
# Per-sample seeds: augmentations that depend on neither worker count nor resume point
# --------------------------------------------------------------------------------------------------


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A deterministic 63-bit seed for one draw of one sample."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index) % (2**63 - 1)


class SeededRandomSampler(Sampler):
    """Shuffles like ``RandomSampler`` (a new permutation per epoch, from ``seed + epoch``), and yields
    ``(index, sample_seed)`` keys, so each draw of a sample carries its own seed.

    The collator draws a sample's crop, flip and mask from that seed. The data a step sees then
    depends only on (seed, epoch, index): not on DataLoader workers, prefetching or where a killed run
    was resumed, which is what makes a resumed run end with the weights of an uninterrupted one.
    The Trainer calls ``set_epoch`` at each epoch.
    """

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for index in order.tolist():
            yield index, sample_seed(self.seed, self.epoch, index)


class SeededDataset(Dataset):
    """Wraps a dataset so that ``dataset[(index, seed)]`` is its item plus ``"seed"``; plain integer
    keys work as before. Attributes (``classes``, ``skipped_files``) come from the wrapped dataset."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):
        if name == "dataset":  # not set yet (e.g. while unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            index, seed = key
            return {**self.dataset[index], "seed": seed}
        return self.dataset[key]
