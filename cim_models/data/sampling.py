"""Per-sample seeds: augmentations that depend on neither worker count, process count nor resume
point.

``SeededRandomSampler`` shuffles like ``RandomSampler`` and yields ``(index, seed)`` keys;
``SeededDataset`` hands the seed to the collator with the item, and the collator draws that sample's
crop, flip and mask from it. What a step sees then depends only on (seed, epoch, index), which is
what makes a resumed run end with the weights of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

__all__ = ["SeededDataset", "SeededRandomSampler", "derive_seed", "sample_seed"]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that depends on every key (numpy's ``SeedSequence`` hash): nearby keys give
    unrelated streams, so (run seed, rank, step) never collide the way ``seed + rank`` can."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one draw: sample ``index`` in ``epoch`` of a run seeded ``seed``."""
    return derive_seed(seed, epoch, index)


class SeededRandomSampler(Sampler):
    """Shuffles like ``RandomSampler`` (a new permutation per epoch, from ``(seed, epoch)``) and
    yields ``(index, sample_seed)`` keys, so each draw of a sample carries its own seed.

    Every process draws the same permutation (a distributed loader then gives each its share).
    ``set_epoch`` must be called before each epoch; ``CIMTrainer`` does it from the Trainer's
    state, so a resumed run shuffles exactly as the uninterrupted one.
    """

    def __init__(self, num_samples: int, seed: int = 0):
        if num_samples < 1:
            raise ValueError(f"SeededRandomSampler needs at least one sample, got {num_samples}.")
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        for index in torch.randperm(self.num_samples, generator=generator).tolist():
            yield index, sample_seed(self.seed, self.epoch, index)


class SeededDataset(Dataset):
    """Wraps a dataset so that ``dataset[(index, seed)]`` is its item plus ``"seed"``; plain
    integer keys work as before. Attributes (``classes``, ``skipped_files``) come from the wrapped
    dataset."""

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
