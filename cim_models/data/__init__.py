"""The data layer shared by pre-training and evaluation: image sources and the one dispatch from the
data flags, decoding to RGB with the bad-image policy, transforms, per-sample seeds, collators."""

from .arguments import DataArguments, argument
from .collators import CIMDataCollator, ClassificationCollator
from .images import IMG_EXTENSIONS, UnreadableImageError, open_image, to_rgb
from .sampling import SeededDataset, SeededRandomSampler, derive_seed, sample_seed
from .sources import (
    SHAPE_CLASSES,
    SYNTHETIC_TRAIN_SEED,
    SYNTHETIC_VALIDATION_SEED,
    HFImageDataset,
    ImageFolderDataset,
    SyntheticShapes,
    data_source,
    load_hf_dataset,
    load_split,
)
from .transforms import TwoViewTransform, create_eval_transform

__all__ = [
    "IMG_EXTENSIONS",
    "SHAPE_CLASSES",
    "SYNTHETIC_TRAIN_SEED",
    "SYNTHETIC_VALIDATION_SEED",
    "CIMDataCollator",
    "ClassificationCollator",
    "DataArguments",
    "HFImageDataset",
    "ImageFolderDataset",
    "SeededDataset",
    "SeededRandomSampler",
    "SyntheticShapes",
    "TwoViewTransform",
    "UnreadableImageError",
    "argument",
    "create_eval_transform",
    "data_source",
    "derive_seed",
    "load_hf_dataset",
    "load_split",
    "open_image",
    "sample_seed",
    "to_rgb",
]
