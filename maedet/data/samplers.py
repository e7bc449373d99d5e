"""Samplers that make the data a training step sees independent of the run layout.

Training draws from one conceptually infinite stream of *global positions*
``p = 0, 1, 2, ...``. Position ``p`` decides both the image (through a per-epoch
permutation) and the augmentation randomness (through a per-position seed), so
the stream is the same for any number of processes, any number of DataLoader
workers and any resume point: process ``r`` of ``W`` simply takes positions
``start + r, start + r + W, ...``.
"""

import hashlib
import random
from typing import Iterator, Tuple

import numpy as np
import torch

from maedet.utils.registry import SAMPLERS

__all__ = ["InfiniteSampler", "InferenceSampler", "SeededDataset", "position_seed", "infinite"]

_SEED_MASK = (1 << 63) - 1


def _hash63(*parts) -> int:
    """A deterministic non-negative 63-bit integer from ``parts`` (ints and strings)."""
    text = ":".join(str(p) for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & _SEED_MASK


def position_seed(seed: int, position: int) -> int:
    """The augmentation seed of global stream position ``position`` for run seed ``seed``."""
    return _hash63("sample", int(seed), int(position))


def epoch_permutation(size: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """Order of the dataset indices in epoch ``epoch``: int64 tensor of shape ``(size,)``."""
    if not shuffle:
        return torch.arange(size, dtype=torch.int64)
    g = torch.Generator()
    g.manual_seed(_hash63("epoch", int(seed), int(epoch)))
    return torch.randperm(size, generator=g)


class InfiniteSampler(torch.utils.data.Sampler):
    """Endless stream of ``(index, sample_seed)`` for one process of a (distributed) run.

    Global position ``p`` belongs to epoch ``e = p // size`` and maps to dataset
    index ``perm_e[p % size]`` where ``perm_e`` is a permutation seeded by
    ``(seed, e)`` (the identity when ``shuffle`` is false); its sample seed is a
    63-bit hash of ``(seed, p)``. This process yields positions
    ``start + rank + k * world_size`` for ``k = 0, 1, ...``.

    Args:
        size: number of items in the dataset (> 0).
        shuffle: permute the indices in every epoch.
        seed: run seed; the whole stream is a function of it.
        rank: index of this process among ``world_size``.
        world_size: number of processes sharing the stream.
        start: first global position of the stream (``iteration * global_batch_size``
            when resuming), so a resumed run continues exactly where it stopped.

    Yields:
        ``(index, sample_seed)``: ``int`` dataset index and ``int`` seed in ``[0, 2**63)``,
        meant for :class:`SeededDataset`.
    """

    def __init__(
        self, size: int, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0
    ):
        if size <= 0:
            raise ValueError(f"InfiniteSampler needs a non-empty dataset, got size={size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.size = int(size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.start = int(start)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        position = self.start + self.rank
        epoch, perm = -1, None
        while True:
            e = position // self.size
            if e != epoch:
                epoch = e
                perm = epoch_permutation(self.size, self.seed, epoch, self.shuffle).tolist()
            yield perm[position % self.size], position_seed(self.seed, position)
            position += self.world_size


@SAMPLERS.register("infinite")
def infinite(
    dataset: torch.utils.data.Dataset, seed: int, rank: int, world_size: int, start: int, shuffle: bool = True
) -> InfiniteSampler:
    """Every image once per epoch, in a seeded order (the default training sampler)."""
    return InfiniteSampler(len(dataset), shuffle=shuffle, seed=seed, rank=rank, world_size=world_size, start=start)


class InferenceSampler(torch.utils.data.Sampler):
    """Contiguous shard of ``range(size)`` for one process; shard sizes differ by at most 1.

    Args:
        size: number of items in the dataset.
        rank: index of this process.
        world_size: number of processes.

    Yields plain ``int`` indices, each exactly once over all ranks.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        base, extra = divmod(int(size), int(world_size))
        self.begin = rank * base + min(rank, extra)
        self.end = self.begin + base + (1 if rank < extra else 0)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.begin, self.end))

    def __len__(self) -> int:
        return self.end - self.begin


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that each item is produced under its own RNG seed.

    ``wrapped[(index, seed)]`` calls ``dataset[index]`` with torch's, Python's and
    NumPy's global generators seeded from ``seed``, then restores the caller's
    generator states. Augmentations that draw from the global generators (all of
    ``torchvision.transforms.v2`` does) therefore give the same output for the same
    ``(index, seed)`` in any process or worker.

    Args:
        dataset: map-style dataset indexed by ``int``.

    Returns (per item): ``(sample, seed)``.
    """

    def __init__(self, dataset: torch.utils.data.Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        seed = int(seed)
        py_state = random.getstate()
        np_state = np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                np.random.seed(seed % (1 << 32))
                sample = self.dataset[int(index)]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return sample, seed
