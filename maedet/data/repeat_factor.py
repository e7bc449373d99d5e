"""Repeat-factor sampling for long-tailed data (LVIS; Gupta et al. 2019, detectron2's
``RepeatFactorTrainingSampler``), on maedet's seeded, resumable position stream.

Each image gets a repeat factor from the rarest category it shows:
``r_c = max(1, sqrt(t / f_c))`` for a category seen in a fraction ``f_c`` of the
training images, and ``r_i = max(r_c for c in image i)`` (1 for an image without
categories). Every epoch, image ``i`` appears ``floor(r_i)`` times plus once more with
probability ``frac(r_i)`` (stochastic rounding), and the epoch's list is shuffled.

As for :class:`~maedet.data.samplers.InfiniteSampler`, the stream is a function of the
run seed alone: epoch ``e``'s rounding and order come from a generator seeded by
``(seed, e)``, global position ``p`` is read off the concatenated epochs, its
augmentation seed is :func:`~maedet.data.samplers.position_seed`, and process ``r`` of
``W`` takes positions ``start + r, start + r + W, ...``. So the images a step sees do
not depend on the number of processes or workers, and a resumed run continues exactly.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Dict, Iterable, Iterator, List, Sequence, Set, Tuple

import torch

from maedet.data.samplers import _hash63, position_seed
from maedet.utils.registry import SAMPLERS

__all__ = ["repeat_factors_from_category_frequency", "RepeatFactorSampler", "repeat_factor"]


def repeat_factors_from_category_frequency(
    image_categories: Sequence[Iterable[int]], repeat_thresh: float
) -> torch.Tensor:
    """Repeat factor of each image (float32 ``(N,)``), detectron2's formula.

    Args:
        image_categories: per training image, the category ids of its annotations.
        repeat_thresh: ``t``; categories seen in a larger fraction of the images are not
            oversampled (LVIS recipe: 0.001).
    """
    if repeat_thresh <= 0:
        raise ValueError(f"repeat_thresh must be > 0, got {repeat_thresh}")
    cats: List[Set[int]] = [set(c) for c in image_categories]
    if not cats:
        raise ValueError("repeat-factor sampling needs at least one training image")
    freq: Dict[int, int] = defaultdict(int)
    for c in cats:
        for cat in c:
            freq[cat] += 1
    rep = {cat: max(1.0, math.sqrt(repeat_thresh / (n / len(cats)))) for cat, n in freq.items()}
    return torch.tensor([max((rep[c] for c in image), default=1.0) for image in cats], dtype=torch.float32)


class RepeatFactorSampler(torch.utils.data.Sampler):
    """Endless ``(index, sample_seed)`` stream with images repeated by their factors (module docstring).

    Args:
        repeat_factors: float ``(N,)``, each >= 0 (e.g. from
            :func:`repeat_factors_from_category_frequency`).
        seed, rank, world_size, start: as for :class:`~maedet.data.samplers.InfiniteSampler`.
    """

    def __init__(self, repeat_factors: torch.Tensor, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        factors = torch.as_tensor(repeat_factors, dtype=torch.float32)
        if factors.dim() != 1 or factors.numel() == 0 or bool((factors < 0).any()):
            raise ValueError("repeat_factors must be a non-empty 1-D tensor of values >= 0")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        if not bool((factors > 0).any()):
            raise ValueError("every repeat factor is 0: the stream would be empty")
        self.int_part = torch.trunc(factors)
        self.frac_part = factors - self.int_part
        self.seed, self.rank, self.world_size, self.start = int(seed), int(rank), int(world_size), int(start)

    def epoch_indices(self, epoch: int) -> torch.Tensor:
        """The shuffled image indices of epoch ``epoch`` (int64), detectron2's ``_get_epoch_indices``
        with the generator seeded by ``(seed, epoch)``."""
        g = torch.Generator()
        g.manual_seed(_hash63("repeat factor epoch", self.seed, int(epoch)))
        reps = (self.int_part + (torch.rand(len(self.frac_part), generator=g) < self.frac_part).float()).long()
        indices = torch.repeat_interleave(torch.arange(len(reps)), reps)
        return indices[torch.randperm(len(indices), generator=g)]

    def _locate(self, position: int) -> Tuple[int, int, torch.Tensor]:
        """(epoch, offset in it, its indices) of a global position (a resumed run replays the
        epochs' lengths, each one draw of N numbers)."""
        epoch = 0
        while True:
            indices = self.epoch_indices(epoch)
            if position < len(indices):
                return epoch, position, indices
            position -= len(indices)
            epoch += 1

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        position = self.start + self.rank
        epoch, offset, indices = self._locate(position)
        order = indices.tolist()
        while True:
            while offset >= len(order):
                offset -= len(order)
                epoch += 1
                order = self.epoch_indices(epoch).tolist()
            yield order[offset], position_seed(self.seed, position)
            position += self.world_size
            offset += self.world_size


@SAMPLERS.register("repeat_factor")
def repeat_factor(
    dataset: torch.utils.data.Dataset, seed: int, rank: int, world_size: int, start: int, repeat_thresh: float = 0.001
) -> RepeatFactorSampler:
    """Images with rare categories repeated (LVIS recipe: ``repeat_thresh`` 0.001). The dataset
    must say which categories each image shows (``image_categories(index)``, as
    :class:`~maedet.data.coco.CocoInstanceDataset` does)."""
    if not hasattr(dataset, "image_categories"):
        raise ValueError(f"repeat_factor sampling needs per-image categories; {type(dataset).__name__} has none")
    cats = [dataset.image_categories(i) for i in range(len(dataset))]
    factors = repeat_factors_from_category_frequency(cats, repeat_thresh)
    return RepeatFactorSampler(factors, seed=seed, rank=rank, world_size=world_size, start=start)
