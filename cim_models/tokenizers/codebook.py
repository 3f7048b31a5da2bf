"""A k-means codebook of image patches, fitted on the training data, as CIM's frozen tokenizer.

Each ``cell_size`` x ``cell_size`` RGB cell becomes the id of its nearest centroid; decoding pastes
the centroid patches back. Unlike the palette's flat cells, a centroid keeps edges and texture, so
restoring the original image (ResPix) asks the enhancer for more than local super-resolution. It
needs no download: ``fit`` builds it in seconds on CPU from a few thousand images, and its centroids
travel in the model's checkpoint (``weights_in_checkpoint``) because no source can rebuild them.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .base import ImageTokenizer

logger = logging.getLogger(__name__)

CODEBOOK_FILE = "codebook.safetensors"
# Rows of patches per distance matmul: bounds the (rows, vocab_size) distance block (32 MiB at 512).
_CHUNK_ROWS = 16384
# k-means++ seeds on a random subsample of this many patches per centroid: seeding is sequential in
# the number of centroids, and the Lloyd iterations that follow use every patch anyway.
_INIT_PATCHES_PER_CENTROID = 32


class CodebookTokenizer(ImageTokenizer):
    """Nearest-centroid tokens of square RGB patches; ``decode`` pastes the centroid patches.

    Build it, then ``fit(images)`` on training images, or load a saved codebook with ``weights=``.

    Args:
        vocab_size: number of centroids (token ids). Default 512, or read from ``weights``.
        cell_size: side of a patch in pixels, which is also the ``downsample`` factor. Default 8, or
            read from ``weights``.
        weights: a ``.safetensors`` file written by ``save_pretrained`` (tensor ``"centroids"`` of
            shape ``(vocab_size, 3 * cell_size**2)``), or the folder holding it as
            ``codebook.safetensors``.

    The centroids are a persistent buffer in ``(channel, row, column)`` order with pixel values in
    ``[0, 1]``; ``fitted`` is a persistent boolean buffer. Both save in state dicts as safetensors.
    Nothing is computed in ``__init__``, so the tokenizer can be built on the meta device and filled
    by ``load_state_dict(..., assign=True)``, as ``from_pretrained`` does.
    """

    weights_in_checkpoint = True

    def __init__(
        self,
        vocab_size: int | None = None,
        cell_size: int | None = None,
        weights: str | os.PathLike | None = None,
    ):
        super().__init__()
        self.weights = None if weights is None else str(weights)
        if self.weights is not None and (vocab_size is None or cell_size is None):
            saved_vocab_size, saved_cell_size = _read_codebook_shape(self.weights)
            vocab_size = saved_vocab_size if vocab_size is None else vocab_size
            cell_size = saved_cell_size if cell_size is None else cell_size
        vocab_size = 512 if vocab_size is None else vocab_size
        cell_size = 8 if cell_size is None else cell_size
        if vocab_size < 2 or cell_size < 1:
            raise ValueError(
                "CodebookTokenizer needs vocab_size >= 2 and cell_size >= 1, got "
                f"vocab_size={vocab_size}, cell_size={cell_size}."
            )
        self.vocab_size = vocab_size
        self.downsample = cell_size
        self.register_buffer("centroids", torch.zeros(vocab_size, 3 * cell_size**2))  # (K, 3*c*c)
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
        # Reading ``fitted`` is a host sync; once it was seen True, encode/decode skip the check.
        self._known_fitted = False
        self.reload_weights()

    @property
    def cell_size(self) -> int:
        return self.downsample

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, cell_size={self.cell_size}"

    def reload_weights(self) -> None:
        if self.weights is None or self.centroids.is_meta:
            # Nothing to read, or built inside from_pretrained: the checkpoint (or a later call once
            # the tensors are real) fills the centroids.
            self.freeze()
            return
        path = resolve_codebook_weights(self.weights)
        centroids = load_file(path).get("centroids")
        if centroids is None or tuple(centroids.shape) != tuple(self.centroids.shape):
            found = None if centroids is None else tuple(centroids.shape)
            raise ValueError(
                f"{path} holds centroids of shape {found}, but this CodebookTokenizer expects "
                f"{tuple(self.centroids.shape)} (vocab_size={self.vocab_size}, "
                f"cell_size={self.cell_size}). Leave vocab_size and cell_size unset to take them "
                "from the file."
            )
        self.centroids.copy_(centroids)
        self.fitted.fill_(True)
        self._known_fitted = True
        self.freeze()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._known_fitted = False  # the loaded state decides
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike) -> str:
        """Write the centroids to ``save_directory/codebook.safetensors`` (load: ``weights=``)."""
        self._check_fitted()
        folder = Path(save_directory)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / CODEBOOK_FILE
        metadata = {"vocab_size": str(self.vocab_size), "cell_size": str(self.cell_size)}
        save_file(
            {"centroids": self.centroids.detach().float().cpu().contiguous()},
            path,
            metadata=metadata,
        )
        return str(path)

    def _check_fitted(self) -> None:
        if self._known_fitted:
            return
        if self.centroids.is_meta:
            raise RuntimeError(
                "The CodebookTokenizer is still on the meta device; load its state dict "
                "(load_state_dict(..., assign=True)) before using it."
            )
        if not bool(self.fitted):
            raise RuntimeError(
                "The CodebookTokenizer has not been fitted: call tokenizer.fit(images) on training "
                "images in [0, 1] of shape (N, 3, H, W), load a saved codebook with "
                "create_tokenizer('codebook', weights=PATH), or let cim-pretrain fit it at the "
                "start of the run (--tokenizer codebook)."
            )
        self._known_fitted = True

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        b, _, height, width = images.shape
        c = self.cell_size
        h, w = height // c, width // c
        patches = images.reshape(b, 3, h, c, w, c).permute(0, 2, 4, 1, 3, 5)  # (B, h, w, 3, c, c)
        return patches.reshape(b * h * w, 3 * c * c)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        self._check_fitted()
        b, _, height, width = images.shape
        with torch.autocast(images.device.type, enabled=False):  # nearest centroid in fp32
            ids, _ = _nearest(self._patches(images.float()), self.centroids.float())
        return ids.view(b, height // self.cell_size, width // self.cell_size)  # (B, h, w)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        self.check_ids(ids)
        self._check_fitted()
        b, h, w = ids.shape
        c = self.cell_size
        patches = self.centroids.float()[ids.long()]  # (B, h, w, 3*c*c)
        images = patches.view(b, h, w, 3, c, c).permute(0, 3, 1, 4, 2, 5)  # (B, 3, h, c, w, c)
        return images.reshape(b, 3, h * c, w * c).clamp(0, 1)

    @torch.no_grad()
    def fit(
        self,
        images: torch.Tensor,
        num_iterations: int = 15,
        seed: int = 0,
        progress: bool = True,
    ) -> CodebookTokenizer:
        """Fit the centroids by k-means on every cell of ``images`` (N, 3, H, W) in [0, 1].

        Seeding is k-means++ on a random subsample (deterministic given ``seed``), then
        ``num_iterations`` Lloyd iterations over all patches. A centroid left without patches moves
        to the patch farthest from its centroid, so every token id stays in use. Runs on the images'
        device; a few thousand 64px images take seconds on a CPU. Returns the tokenizer.
        """
        self.check_images(images)
        if num_iterations < 0:
            raise ValueError(f"num_iterations must be >= 0, got {num_iterations}.")
        low, high = images.min().item(), images.max().item()
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                "CodebookTokenizer.fit expects pixel values in [0, 1], got "
                f"[{low:.3f}, {high:.3f}]; pass the images before mean/std normalisation."
            )
        start = time.perf_counter()
        patches = self._patches(images.float())  # (P, 3*c*c)
        if patches.shape[0] < self.vocab_size:
            raise ValueError(
                f"Fitting {self.vocab_size} centroids needs at least as many patches, got "
                f"{patches.shape[0]} from {images.shape[0]} images; pass more images or a smaller "
                "vocab_size."
            )
        generator = torch.Generator().manual_seed(seed)
        centroids = _kmeans_plus_plus(patches, self.vocab_size, generator).to(patches.device)

        accumulate = torch.float32 if patches.device.type == "mps" else torch.float64
        bar = tqdm(range(num_iterations), desc="Fitting the patch codebook", disable=not progress)
        for _ in bar:
            ids, distances = _nearest(patches, centroids)
            counts = torch.bincount(ids, minlength=self.vocab_size)  # (K,)
            # Sums of thousands of patches accumulate in float64 (except on MPS, which lacks it), so
            # that a cluster of identical patches averages back to exactly that patch.
            sums = torch.zeros(centroids.shape, dtype=accumulate, device=centroids.device)
            for chunk_ids, chunk in zip(ids.split(_CHUNK_ROWS), patches.split(_CHUNK_ROWS)):
                sums.index_add_(0, chunk_ids, chunk.to(accumulate))
            centroids = (sums / counts.clamp(min=1).unsqueeze(1)).float()
            empty = (counts == 0).nonzero().squeeze(1)
            if len(empty):
                farthest = distances.topk(len(empty)).indices
                centroids[empty] = patches[farthest]
            # Mean squared error per pixel value of the assignment just made.
            bar.set_postfix(
                mse=f"{distances.mean().item() / patches.shape[1]:.5f}", empty=len(empty)
            )

        self.centroids.copy_(centroids.to(self.centroids))
        self.fitted.fill_(True)
        self._known_fitted = True
        logger.info(
            "Fitted a %d-token codebook of %dx%d patches on %d patches (%d images) in %.1f s.",
            self.vocab_size,
            self.cell_size,
            self.cell_size,
            patches.shape[0],
            images.shape[0],
            time.perf_counter() - start,
        )
        return self


def _nearest(patches: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid by squared L2, one matmul per chunk: (P,) ids and (P,) squared distances."""
    centroid_sq = centroids.square().sum(1)  # (K,)
    ids, distances = [], []
    for chunk in patches.split(_CHUNK_ROWS):
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; the argmin needs only the last two terms.
        scores = torch.addmm(centroid_sq, chunk, centroids.t(), alpha=-2)  # (rows, K)
        best, index = scores.min(1)
        ids.append(index)
        distances.append((best + chunk.square().sum(1)).clamp(min=0))
    return torch.cat(ids), torch.cat(distances)


def _kmeans_plus_plus(patches: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007) of a random subsample, on CPU."""
    count = min(patches.shape[0], _INIT_PATCHES_PER_CENTROID * k)
    sample = patches[
        torch.randperm(patches.shape[0], generator=generator)[:count].to(patches.device)
    ]
    sample = sample.cpu()  # (S, D)
    sample_sq = sample.square().sum(1)  # (S,)

    def squared_distance_to(index: int) -> torch.Tensor:  # (S,), one matrix-vector product
        return (sample_sq - 2 * (sample @ sample[index]) + sample_sq[index]).clamp(min=0)

    chosen = [int(torch.randint(count, (1,), generator=generator))]
    closest = squared_distance_to(chosen[0])  # (S,) squared distance to the nearest seed so far
    for _ in range(k - 1):
        # Once every sampled patch coincides with a seed, further seeds are drawn uniformly.
        weights = closest if closest.sum() > 0 else torch.ones_like(closest)
        index = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(index)
        closest = torch.minimum(closest, squared_distance_to(index))
    return sample[chosen].clone()  # (k, D)


def resolve_codebook_weights(weights: str | os.PathLike) -> str:
    """The file behind ``weights``: a ``.safetensors`` file or ``weights/codebook.safetensors``."""
    path = Path(weights)
    if path.is_dir():
        path = path / CODEBOOK_FILE
    elif path.suffix != ".safetensors":
        raise ValueError(
            f"CodebookTokenizer loads safetensors only, got {str(weights)!r}; pass the "
            ".safetensors file written by save_pretrained, or its folder."
        )
    if not path.is_file():
        raise FileNotFoundError(
            f"No codebook at {str(path)!r}; write one with tokenizer.fit(images) then "
            "tokenizer.save_pretrained(folder), and pass that folder or file as weights=."
        )
    return str(path)


def _read_codebook_shape(weights: str) -> tuple[int, int]:
    """(vocab_size, cell_size) of a saved codebook, from the file header alone."""
    path = resolve_codebook_weights(weights)
    with safe_open(path, framework="pt") as file:
        names = set(file.keys())
        if "centroids" not in names:
            raise ValueError(
                f"{path} has no 'centroids' tensor; it was not written by save_pretrained."
            )
        vocab_size, dim = file.get_slice("centroids").get_shape()
    cell_size = math.isqrt(dim // 3)
    if 3 * cell_size**2 != dim:
        raise ValueError(f"{path} holds centroids of width {dim}, which is not 3 * cell_size**2.")
    return vocab_size, cell_size
