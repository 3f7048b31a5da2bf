"""The images' transforms: CIM's two views for pre-training, timm's transform for evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision.transforms import RandomResizedCrop

from .images import to_rgb

__all__ = ["TwoViewTransform", "create_eval_transform"]


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return TF.pil_to_tensor(image).float().div_(255.0)  # (3, H, W) in [0, 1]


class TwoViewTransform:
    """CIM's views: one random resized crop and flip, rendered at two sizes.

    ``pixel_values`` (3, S, S): bicubic, normalised with ``mean``/``std``; the generator's input
    and ResPix's target. ``tokenizer_pixel_values`` (3, T, T): Lanczos, in ``[0, 1]``; the
    tokenizer's input. Both come from the same crop box of the same decoded image, so token (i, j)
    describes patch (i, j). The crop and flip are drawn from torch's global RNG, which the collator
    seeds per sample (``cim_models.data.collators``). Images smaller than the crop are upsampled;
    any RGB-convertible mode is accepted.
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

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        image = to_rgb(image)
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, self.ratio)
        flip = bool(torch.rand(()) < self.hflip)  # always drawn: RNG use is the same for any hflip
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


def create_eval_transform(
    image_size: int = 224,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
) -> Callable[[Image.Image], torch.Tensor]:
    """timm's evaluation transform: resize the shorter side to ``image_size / crop_pct``, centre
    crop, normalise; ``(3, S, S)`` tensors. Deterministic; the kNN monitor and every evaluation
    command use it."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}; timm's default is 0.875.")
    return create_transform(
        image_size,
        is_training=False,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=tuple(mean),
        std=tuple(std),
    )
