"""Frozen image tokenizers behind one interface, and the factory that builds them by name."""

from __future__ import annotations

from .base import ImageTokenizer
from .codebook import CodebookTokenizer
from .dall_e import DallETokenizer, map_pixels, unmap_pixels
from .palette import PaletteTokenizer

_TOKENIZERS = {"dall-e": DallETokenizer, "palette": PaletteTokenizer, "codebook": CodebookTokenizer}


def create_tokenizer(name: str, weights: str | None = None, **kwargs) -> ImageTokenizer:
    """Build a frozen tokenizer by name.

    - ``"dall-e"``: the DALL-E dVAE; needs ``weights`` (converted folder or Hub repo) or
      ``random_init=True``.
    - ``"palette"``: weightless, flat-colour cells; takes no ``weights``.
    - ``"codebook"``: a k-means patch codebook; ``weights`` loads a saved one, otherwise call
      ``.fit(images)`` before use.
    """
    if name not in _TOKENIZERS:
        raise ValueError(f"Unknown tokenizer {name!r}; choose one of {sorted(_TOKENIZERS)}.")
    if name == "palette":
        if weights is not None:
            raise ValueError("The palette tokenizer has no weights; do not pass weights=.")
        return PaletteTokenizer(**kwargs)
    return _TOKENIZERS[name](weights=weights, **kwargs)


__all__ = [
    "CodebookTokenizer",
    "DallETokenizer",
    "ImageTokenizer",
    "PaletteTokenizer",
    "create_tokenizer",
    "map_pixels",
    "unmap_pixels",
]
