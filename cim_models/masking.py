"""BEiT block-wise masking: one mask per sample, built from rectangular blocks, with an exact count."""

from __future__ import annotations

import math

import torch


class BlockMaskingGenerator:
    """Draw block-wise masks over a ``(height, width)`` patch grid, as BEiT does.

    Blocks cover at least ``min_num_patches`` patches (capped at the target), with an aspect ratio
    log-uniform in ``[min_aspect, 1 / min_aspect]``, up to ``max_tries`` placements per block, until
    ``num_masking_patches`` are masked. BEiT's version can stop a few patches short; this one tops up
    with single patches so every mask has exactly ``num_masking_patches`` (CIM's generator loss and the
    corruption ratio then do not vary between samples).

    Randomness comes from ``generator`` (a seeded ``torch.Generator``) or, by default, torch's global RNG,
    which the Trainer saves in checkpoints, so a resumed run draws the same masks.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int],
        num_masking_patches: int,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_tries: int = 10,
    ):
        self.height, self.width = (input_size, input_size) if isinstance(input_size, int) else input_size
        num_patches = self.height * self.width
        if not 0 <= num_masking_patches <= num_patches:
            raise ValueError(
                f"num_masking_patches must be between 0 and {num_patches} for a {self.height}x{self.width} "
                f"grid, got {num_masking_patches}."
            )
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min(min_num_patches, max(num_masking_patches, 1))
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.max_tries = max_tries

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.height}x{self.width}, masked={self.num_masking_patches}, "
            f"block>={self.min_num_patches})"
        )

    def _uniform(self, low: float, high: float, generator: torch.Generator | None) -> float:
        return low + (high - low) * torch.rand((), generator=generator).item()

    def _randint(self, high: int, generator: torch.Generator | None) -> int:
        return int(torch.randint(high, (), generator=generator))

    def _place_block(self, mask: torch.Tensor, max_mask_patches: int, generator) -> int:
        for _ in range(self.max_tries):
            target_area = self._uniform(self.min_num_patches, max_mask_patches, generator)
            aspect_ratio = math.exp(self._uniform(*self.log_aspect_ratio, generator))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < h < self.height and 0 < w < self.width:
                top = self._randint(self.height - h + 1, generator)
                left = self._randint(self.width - w + 1, generator)
                block = mask[top : top + h, left : left + w]
                newly_masked = h * w - int(block.sum())
                if 0 < newly_masked <= max_mask_patches:
                    block.fill_(True)
                    return newly_masked
        return 0

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One mask, a bool tensor of shape ``(height, width)`` with exactly ``num_masking_patches`` set."""
        mask = torch.zeros(self.height, self.width, dtype=torch.bool)
        count = 0
        while count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - count, self.max_num_patches)
            placed = self._place_block(mask, max_mask_patches, generator)
            if placed == 0:
                break
            count += placed
        if count < self.num_masking_patches:
            free = (~mask).flatten().nonzero().squeeze(1)
            pick = free[torch.randperm(free.numel(), generator=generator)[: self.num_masking_patches - count]]
            mask.view(-1)[pick] = True
        return mask


def masked_indices(bool_masked_pos: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Positions of the masked patches, (B, num_masked), in ascending order, for masks that each hold
    exactly ``num_masked`` patches (as :class:`BlockMaskingGenerator` draws them).

    A fixed count gives every tensor after it a static shape: gathers replace boolean indexing, which
    would wait for the device to count the masked patches (a host sync that also breaks torch.compile).
    """
    mask = bool_masked_pos.flatten(1)  # (B, N)
    torch._assert_async(
        (mask.sum(1) == num_masked).all(),
        f"every bool_masked_pos must mask exactly num_mask_patches={num_masked} patches",
    )
    # A stable sort puts the masked positions first, in their original (row-major) order.
    return mask.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :num_masked]
