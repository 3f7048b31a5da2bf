"""Frozen image tokenizers behind one interface, and the factory that builds them by name."""

from __future__ import annotations

from .base import ImageTokenizer
from .dall_e import DallETokenizer, map_pixels, unmap_pixels
from .palette import PaletteTokenizer

_TOKENIZERS = {"dall-e": DallETokenizer, "palette": PaletteTokenizer}


def create_tokenizer(name: str, weights: str | None = None, **kwargs) -> ImageTokenizer:
    """Build a frozen tokenizer: ``"dall-e"`` (needs ``weights`` or ``random_init=True``) or ``"palette"``."""
    if name not in _TOKENIZERS:
        raise ValueError(f"Unknown tokenizer {name!r}; choose one of {sorted(_TOKENIZERS)}.")
    if name == "palette":
        if weights is not None:
            raise ValueError("The palette tokenizer has no weights; do not pass weights=.")
        return PaletteTokenizer(**kwargs)
    return DallETokenizer(weights=weights, **kwargs)


__all__ = [
    "DallETokenizer",
    "ImageTokenizer",
    "PaletteTokenizer",
    "create_tokenizer",
    "map_pixels",
    "unmap_pixels",
]
