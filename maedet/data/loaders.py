"""DataLoaders for MAE pretraining, detection training and detection evaluation.

Training loaders draw ``(index, seed)`` pairs from :class:`InfiniteSampler` and
produce each sample under its own seed (:class:`SeededDataset`), so the batch of a
given iteration is the same for any number of processes or workers and after a
resume (pass ``start = iteration * global_batch_size``).
"""

import signal
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from maedet.data.samplers import InferenceSampler, InfiniteSampler, SeededDataset

__all__ = [
    "build_train_loader",
    "build_pretrain_loader",
    "build_detection_train_loader",
    "build_detection_test_loader",
    "collate_pretrain",
    "collate_detection_train",
    "collate_detection_test",
]


def _plain(x: Any) -> Any:
    """Unwrap a ``tv_tensors`` subclass to a plain ``torch.Tensor``; other values unchanged."""
    if isinstance(x, torch.Tensor) and type(x) is not torch.Tensor:
        return x.as_subclass(torch.Tensor)
    return x


def _plain_target(target: Dict[str, Any]) -> Dict[str, Any]:
    out = {k: _plain(v) for k, v in target.items()}
    if "boxes" in out:
        out["boxes"] = out["boxes"].to(torch.float32).reshape(-1, 4)
    if "labels" in out:
        out["labels"] = out["labels"].to(torch.int64)
    if isinstance(out.get("masks"), torch.Tensor):
        out["masks"] = out["masks"].to(torch.uint8)
    return out


def collate_pretrain(batch: List[Tuple[torch.Tensor, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``[(image (3, S, S), seed), ...]`` -> ``(images (B, 3, S, S), seeds int64 (B,))``."""
    images = torch.stack([_plain(img) for img, _ in batch])
    seeds = torch.tensor([s for _, s in batch], dtype=torch.int64)
    return images, seeds


def collate_detection_train(
    batch: List[Tuple[Tuple[Any, Dict[str, Any]], int]],
) -> Tuple[List[torch.Tensor], List[Dict[str, Any]], torch.Tensor]:
    """``[((image, target), seed), ...]`` -> ``(images, targets, seeds int64 (B,))``.

    Images are plain tensors as the transform produced them (uint8 ``(3, S, S)`` with
    LSJ); targets hold ``boxes`` float32 ``(N, 4)``, ``labels`` int64 ``(N,)``, ``masks``
    (:class:`~maedet.structures.PolygonMasks` or uint8 ``(N, S, S)``), plus ``image_id``
    and ``orig_size``.
    """
    images = [_plain(sample[0]) for sample, _ in batch]
    targets = [_plain_target(sample[1]) for sample, _ in batch]
    seeds = torch.tensor([s for _, s in batch], dtype=torch.int64)
    return images, targets, seeds


def collate_detection_test(batch: List[Tuple[Any, Dict[str, Any]]]) -> Tuple[List[torch.Tensor], List[Dict[str, Any]]]:
    """``[(image, target), ...]`` -> ``(images, targets)`` with plain tensors."""
    return [_plain(img) for img, _ in batch], [_plain_target(t) for _, t in batch]


def _loader_kwargs(
    num_workers: int = 0,
    pin_memory: bool = False,
    persistent_workers: bool = True,
    prefetch_factor: Optional[int] = None,
) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = dict(num_workers=int(num_workers), pin_memory=bool(pin_memory))
    if num_workers > 0:
        kwargs["worker_init_fn"] = _ignore_interrupt
        kwargs["persistent_workers"] = bool(persistent_workers)
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = int(prefetch_factor)
    return kwargs


def _ignore_interrupt(worker_id: int) -> None:
    """Workers leave Ctrl-C (which a terminal sends to the whole process group) to the main
    process, which saves a checkpoint and stops them; they would otherwise die mid-batch."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    collate_fn: Callable,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
    sampler: Optional[torch.utils.data.Sampler] = None,
    **loader_options: Any,
) -> DataLoader:
    """Endless, seeded, resumable training loader (pretraining and detection).

    Args:
        dataset: the samples; each is produced under its own seed.
        batch_size: samples per batch on this process.
        collate_fn: makes a batch of ``[(sample, seed), ...]``.
        seed: run seed (order and augmentations).
        rank, world_size: this process among the data-parallel group.
        start: first global stream position (``iteration * batch_size * world_size``).
        sampler: the ``(index, sample_seed)`` stream of this process, built for the same
            ``seed``, ``rank``, ``world_size`` and ``start``; default :class:`InfiniteSampler`.
        loader_options: ``num_workers``, ``pin_memory``, ``persistent_workers``,
            ``prefetch_factor`` of the DataLoader (the last two only with workers).
    """
    if sampler is None:
        sampler = InfiniteSampler(len(dataset), shuffle=True, seed=seed, rank=rank, world_size=world_size, start=start)
    return torch.utils.data.DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=True,
        **_loader_kwargs(**loader_options),
    )


def build_pretrain_loader(dataset: Dataset, batch_size: int, **options: Any) -> DataLoader:
    """Endless loader of MAE pretraining batches ``(images float (B, 3, S, S), seeds int64 (B,))``.

    ``dataset``: e.g. :class:`maedet.data.images.ImageFolderDataset` whose transform
    returns float ``(3, S, S)`` tensors; ``options``: see :func:`build_train_loader`.
    """
    return build_train_loader(dataset, batch_size, collate_fn=collate_pretrain, **options)


def build_detection_train_loader(dataset: Dataset, batch_size: int, **options: Any) -> DataLoader:
    """Endless loader of detection training batches ``(images, targets, seeds)``: lists of
    ``B`` image tensors and target dicts (:func:`collate_detection_train`), int64 ``(B,)`` seeds.

    ``dataset``: a :class:`maedet.data.coco.CocoInstanceDataset` with training
    transforms; ``options``: see :func:`build_train_loader`.
    """
    return build_train_loader(dataset, batch_size, collate_fn=collate_detection_train, **options)


def build_detection_test_loader(
    dataset: Dataset,
    batch_size: int = 1,
    num_workers: int = 0,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> torch.utils.data.DataLoader:
    """Loader over this process's contiguous shard of ``dataset`` (each image once).

    Yields:
        ``(images, targets)``: lists of image tensors and target dicts (see
        :func:`collate_detection_test`); ``target["image_id"]`` and
        ``target["orig_size"]`` identify the image and its file size.
    """
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InferenceSampler(len(dataset), rank, world_size),
        collate_fn=collate_detection_test,
        drop_last=False,
        **_loader_kwargs(num_workers, pin_memory, False, None),
    )
