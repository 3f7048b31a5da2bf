"""A weightless stand-in tokenizer: each cell is its mean colour, quantised to a fixed RGB palette.

It needs no file, so tests and smoke runs work offline. Tokens carry real image content (the
generator can learn them), but decoding paints flat cells, so restoring the image (ResPix) becomes a
local super-resolution task and teaches the enhancer little; RevDet copes better. For ResPix without
the DALL-E weights, use the fitted patch codebook (``cim_models.tokenizers.codebook``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import ImageTokenizer


class PaletteTokenizer(ImageTokenizer):
    """Quantise each ``cell_size`` x ``cell_size`` cell's mean colour to ``levels`` values each.

    ``vocab_size = levels ** 3`` (512 by default) and ``downsample = cell_size``.
    """

    def __init__(self, cell_size: int = 8, levels: int = 8):
        super().__init__()
        if cell_size < 1 or levels < 2:
            raise ValueError(
                f"PaletteTokenizer needs cell_size >= 1 and levels >= 2, got {cell_size}, {levels}."
            )
        self.downsample = cell_size
        self.levels = levels
        self.vocab_size = levels**3
        self.freeze()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        cells = F.avg_pool2d(images.float(), self.downsample)  # (B, 3, h, w)
        q = (cells.clamp(0, 1) * (self.levels - 1)).round().long()
        return (q[:, 0] * self.levels + q[:, 1]) * self.levels + q[:, 2]  # (B, h, w)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        self.check_ids(ids)
        ids = ids.long()
        rgb = torch.stack(
            (ids // self.levels**2, ids // self.levels % self.levels, ids % self.levels), 1
        )
        cells = rgb.float() / (self.levels - 1)  # (B, 3, h, w)
        return cells.repeat_interleave(self.downsample, 2).repeat_interleave(self.downsample, 3)
