"""Datasets, transforms, samplers and loaders for MAE pretraining and ViTDet Mask R-CNN.

Names are imported from their submodules on first use, so that light users (e.g.
``datasets/prepare_toy.py``, which needs only :mod:`maedet.data.toy`) do not pay
for importing torch and torchvision.
"""

import importlib
from typing import Any

_EXPORTS = {
    "build_pretrain_loader": "maedet.data.loaders",
    "build_detection_train_loader": "maedet.data.loaders",
    "build_detection_test_loader": "maedet.data.loaders",
    "DatasetCatalog": "maedet.data.catalog",
    "CocoInstanceDataset": "maedet.data.coco",
    "load_coco_json": "maedet.data.coco",
    "ImageFolderDataset": "maedet.data.images",
    "find_images": "maedet.data.images",
    "read_image_rgb": "maedet.data.images",
    "InfiniteSampler": "maedet.data.samplers",
    "InferenceSampler": "maedet.data.samplers",
    "SeededDataset": "maedet.data.samplers",
    "generate_toy_dataset": "maedet.data.toy",
    "IMAGENET_MEAN": "maedet.data.transforms",
    "IMAGENET_STD": "maedet.data.transforms",
    "LargeScaleJitter": "maedet.data.transforms",
    "LSJParams": "maedet.data.transforms",
    "ResizeShortestEdge": "maedet.data.transforms",
    "build_mae_transform": "maedet.data.transforms",
    "lsj": "maedet.data.transforms",
    "resize_shortest_edge": "maedet.data.transforms",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'maedet.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
