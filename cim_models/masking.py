"""BEiT block-wise masking: one mask per sample, built from rectangular blocks, exact count."""

from __future__ import annotations

import math
import random

import torch


class BlockMaskingGenerator:
    """Draw block-wise masks over a ``(height, width)`` patch grid, as BEiT does.

    Blocks cover at least ``min_num_patches`` patches (capped at the target), with an aspect ratio
    log-uniform in ``[min_aspect, 1 / min_aspect]``, up to ``max_tries`` placements per block, until
    ``num_masking_patches`` are masked. When no block fits the remaining count, BEiT's version
    stops short; this one then grows the mask from its border, one patch at a time, where a free
    patch has the most masked neighbours: the top-up fills notches and extends blocks row by row
    instead of scattering single patches. Every mask has exactly ``num_masking_patches`` (CIM's
    generator loss and corruption ratio then do not vary between samples) and stays block-shaped.

    Randomness comes from ``generator`` (a seeded ``torch.Generator``) or, by default, torch's
    global RNG, which the Trainer saves in checkpoints, so a resumed run draws the same masks.
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
        self.height, self.width = (
            (input_size, input_size) if isinstance(input_size, int) else input_size
        )
        num_patches = self.height * self.width
        if not 0 <= num_masking_patches <= num_patches:
            raise ValueError(
                f"num_masking_patches must be between 0 and {num_patches} for a "
                f"{self.height}x{self.width} grid, got {num_masking_patches}."
            )
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min(min_num_patches, max(num_masking_patches, 1))
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.max_tries = max_tries
        # The 4-neighbours of each patch, row-major: where _grow may extend the mask.
        self._adjacent = [
            [
                r * self.width + c
                for r, c in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1))
                if 0 <= r < self.height and 0 <= c < self.width
            ]
            for y in range(self.height)
            for x in range(self.width)
        ]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.height}x{self.width}, masked={self.num_masking_patches}, "
            f"block>={self.min_num_patches})"
        )

    def _place_block(self, mask: list[bool], max_mask_patches: int, rng: random.Random) -> int:
        for _ in range(self.max_tries):
            # Never below the minimum: a small block dropped anywhere would be a scattered patch.
            # When fewer patches remain, only a block that mostly overlaps the mask fits, else
            # _grow tops up.
            target_area = rng.uniform(
                self.min_num_patches, max(max_mask_patches, self.min_num_patches)
            )
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = round(math.sqrt(target_area * aspect_ratio))
            w = round(math.sqrt(target_area / aspect_ratio))
            if 0 < h < self.height and 0 < w < self.width:
                top = rng.randint(0, self.height - h)
                left = rng.randint(0, self.width - w)
                rows = range(top * self.width, (top + h) * self.width, self.width)
                block = [row + col for row in rows for col in range(left, left + w)]
                newly_masked = sum(not mask[i] for i in block)
                if 0 < newly_masked <= max_mask_patches:
                    for i in block:
                        mask[i] = True
                    return newly_masked
        return 0

    def _grow(self, mask: list[bool], count: int, rng: random.Random) -> None:
        """Mask ``count`` more patches, each next to the mask, most masked neighbours first."""
        if count == 0:
            return
        masked_neighbours = [sum(mask[j] for j in adjacent) for adjacent in self._adjacent]
        for _ in range(count):
            free = [i for i, masked in enumerate(mask) if not masked]
            most = max(masked_neighbours[i] for i in free)  # 0 only while the mask is empty
            i = rng.choice([i for i in free if masked_neighbours[i] == most])
            mask[i] = True
            for j in self._adjacent[i]:
                masked_neighbours[j] += 1

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One mask, a bool tensor of shape ``(height, width)`` with exactly ``num_masking_patches``
        set."""
        # One draw from torch's RNG seeds Python's, which is far cheaper per scalar draw.
        rng = random.Random(int(torch.randint(2**62, (), generator=generator)))
        mask = [False] * (self.height * self.width)  # row-major
        count = 0
        while count < self.num_masking_patches:
            max_mask_patches = min(self.num_masking_patches - count, self.max_num_patches)
            placed = self._place_block(mask, max_mask_patches, rng)
            if placed == 0:
                break
            count += placed
        self._grow(mask, self.num_masking_patches - count, rng)
        return torch.tensor(mask, dtype=torch.bool).view(self.height, self.width)


def masked_indices(bool_masked_pos: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Positions of the masked patches, (B, num_masked), in ascending order, for masks that each
    hold exactly ``num_masked`` patches (as :class:`BlockMaskingGenerator` draws them).

    A fixed count gives every tensor after it a static shape: gathers replace boolean indexing,
    which would wait for the device to count the masked patches (a host sync that also breaks
    torch.compile).
    """
    mask = bool_masked_pos.flatten(1)  # (B, N)
    torch._assert_async(
        (mask.sum(1) == num_masked).all(),
        f"every bool_masked_pos must mask exactly num_mask_patches={num_masked} patches",
    )
    # A stable sort puts the masked positions first, in their original (row-major) order.
    return mask.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :num_masked]
