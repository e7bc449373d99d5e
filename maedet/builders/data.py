"""Datasets and loaders from configs (images checked before the first iteration)."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from maedet.builders.model import section_dict
from maedet.data.catalog import DatasetCatalog
from maedet.data.coco import CocoInstanceDataset
from maedet.data.image_check import check_images, report_bad_images
from maedet.data.images import ImageFolderDataset
from maedet.data.loaders import build_detection_test_loader, build_detection_train_loader, build_pretrain_loader
from maedet.data.transforms import build_mae_transform
from maedet.utils import distributed as du
from maedet.utils.errors import ConfigError, MaedetError
from maedet.utils.registry import PIPELINES, SAMPLERS

__all__ = [
    "build_pipeline",
    "build_detection_dataset",
    "build_pretrain_dataset",
    "build_train_loader_fn",
    "build_test_loader",
]

logger = logging.getLogger("maedet")


def build_pipeline(section: Any, path: str) -> Callable:
    """The augmentation pipeline a ``{name, **kwargs}`` section selects (:data:`PIPELINES`)."""
    kwargs = section_dict(section)
    name = kwargs.pop("name")
    try:
        return PIPELINES.get(name)(**kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} (pipeline '{name}'): {e}") from e


def _check_coco_images(ds: CocoInstanceDataset, what: str, policy: str, key: str) -> set:
    """Image ids of ``ds`` whose files cannot be used (after applying ``policy``)."""
    infos = [ds.get_image_info(i) for i in range(len(ds))]
    bad = check_images(
        [i["file_path"] for i in infos], [(i["height"], i["width"]) for i in infos], what=what, cache_root=ds.image_root
    )
    bad_paths = set(report_bad_images(bad, len(infos), what, policy, key))
    return {i["id"] for i in infos if i["file_path"] in bad_paths}


def build_detection_dataset(
    data_cfg: Any, split: str, train: bool, check: Optional[bool] = None, with_masks: bool = True
) -> CocoInstanceDataset:
    """The COCO-format dataset of ``data.{split}`` (resolved: ``json`` and ``images`` set).

    Training datasets decode targets and leave out images without instances;
    evaluation datasets keep every image and read no annotation. ``with_masks``
    (the model has a mask head): every annotation needs a segmentation; False:
    box-only data (:class:`~maedet.data.coco.CocoInstanceDataset`). With
    ``data.check_images``, every image is checked first (:mod:`maedet.data.image_check`)
    and the bad ones fail the run or are left out (``data.on_bad_image``).
    """
    s = data_cfg[split]
    name = s.name or os.path.basename(s.json)
    kwargs = dict(
        dataset_name=name,
        strict=s.strict,
        filter_empty=train,
        load_targets=train,
        mask_format=s.mask_format,
        with_masks=with_masks,
    )
    ds = CocoInstanceDataset(s.json, s.images, **kwargs)
    if data_cfg.check_images if check is None else check:
        bad_ids = _check_coco_images(ds, f"{split} images of {name}", data_cfg.on_bad_image, "data.on_bad_image")
        if bad_ids:
            ds.remove_images(bad_ids)
    ds.transforms = build_pipeline(s.pipeline, f"data.{split}.pipeline")
    return ds


def build_pretrain_dataset(d: Any, check: Optional[bool] = None) -> ImageFolderDataset:
    """Unlabeled images from ``data.root`` (folder), ``data.coco_json`` or ``data.dataset`` (catalog)."""
    transform = build_mae_transform(d.input_size, scale=(d.min_scale, d.max_scale), hflip=d.hflip)
    sources = [bool(d.root), bool(d.coco_json), bool(d.dataset)]
    if sum(sources) != 1:
        raise ConfigError("set exactly one of data.root (image folder), data.coco_json or data.dataset")
    if d.root:
        ds = ImageFolderDataset(root=d.root, transform=transform, on_bad_image=d.on_bad_image)
    elif d.coco_json:
        ds = ImageFolderDataset(
            coco_json=d.coco_json, image_root=d.image_root or None, transform=transform, on_bad_image=d.on_bad_image
        )
    else:
        json_file, image_root = DatasetCatalog.get(d.dataset)
        ds = ImageFolderDataset(
            coco_json=json_file, image_root=image_root, transform=transform, on_bad_image=d.on_bad_image
        )
    if d.check_images if check is None else check:
        bad = check_images(ds.paths, what="pretraining images")
        skip = set(report_bad_images(bad, len(ds.paths), "pretraining images", d.on_bad_image, "data.on_bad_image"))
        if skip:
            ds.paths = [p for p in ds.paths if p not in skip]
            if not ds.paths:
                raise MaedetError("no usable pretraining image left after leaving out the bad ones")
    return ds


def build_train_loader_fn(
    dataset: Dataset,
    collate: str,
    batch_size: int,
    train_cfg: Any,
    device: torch.device,
    sampler: Optional[Any] = None,
) -> Callable[[int], Any]:
    """``loader_fn(start_sample)`` for the trainer: the endless, seeded loader from a stream position.

    ``sampler``: a ``{name, **kwargs}`` section (``data.train.sampler``) naming a
    registered training sampler (:data:`SAMPLERS`); None: every image once per epoch.
    """
    build = {"pretrain": build_pretrain_loader, "detection": build_detection_train_loader}[collate]
    section = section_dict(sampler) if sampler is not None else {"name": "infinite"}
    name = section.pop("name")
    make_sampler = SAMPLERS.get(name)

    def loader_fn(start: int):
        supplied = dict(seed=train_cfg.seed, rank=du.get_rank(), world_size=du.get_world_size(), start=start)
        try:
            stream = make_sampler(dataset=dataset, **supplied, **section)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"data.train.sampler (training sampler '{name}'): {e}") from e
        return build(
            dataset,
            sampler=stream,
            batch_size=batch_size,
            num_workers=train_cfg.num_workers,
            seed=train_cfg.seed,
            rank=du.get_rank(),
            world_size=du.get_world_size(),
            start=start,
            pin_memory=train_cfg.pin_memory and device.type == "cuda",
            persistent_workers=train_cfg.persistent_workers,
        )

    return loader_fn


def build_test_loader(dataset: Dataset, test_cfg: Any) -> DataLoader:
    """This process's share of the evaluation set, each image once."""
    return build_detection_test_loader(
        dataset,
        batch_size=test_cfg.batch_size,
        num_workers=test_cfg.num_workers,
        rank=du.get_rank(),
        world_size=du.get_world_size(),
    )
