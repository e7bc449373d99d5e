"""Disjoint training / held-out splits of one COCO-format json, by image.

A held-out split measures how a model generalizes, which a set that is trained
and evaluated on the same images cannot show. The split is a deterministic
function of the arguments: images are ordered by id and every ``every``-th one,
starting at position ``offset``, is held out, with all its annotations. The
category list is kept whole in both files, so labels are the same in both.

Example (what ``datasets/split_coco.py`` runs for the built-in
``fruits_nuts_train`` / ``fruits_nuts_heldout`` names)::

    split_coco_json("../shared/data/fruits_nuts/trainval.json", "datasets/fruits_nuts_split/annotations")
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from maedet.utils.errors import DatasetError
from maedet.utils.fileio import atomic_write_text

__all__ = ["split_coco_json", "split_coco"]


def split_coco(data: Dict[str, Any], every: int = 3, offset: int = 2) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(train, heldout)`` COCO dicts: images at positions ``offset, offset + every, ...``
    of the id-sorted image list go to ``heldout``, the others to ``train``.

    Raises:
        ValueError: ``every < 2`` or ``offset`` outside ``[0, every)``.
        DatasetError: a split would be empty.
    """
    if every < 2 or not 0 <= offset < every:
        raise ValueError(f"need every >= 2 and 0 <= offset < every, got every={every}, offset={offset}")
    images = sorted(data["images"], key=lambda im: im["id"])
    held_ids = {im["id"] for i, im in enumerate(images) if i % every == offset}
    if not held_ids or len(held_ids) == len(images):
        raise DatasetError(f"splitting {len(images)} images with every={every}, offset={offset} leaves a split empty")
    common = {k: v for k, v in data.items() if k not in ("images", "annotations")}

    def part(keep) -> Dict[str, Any]:
        return {
            **common,
            "images": [im for im in images if keep(im["id"])],
            "annotations": [a for a in data["annotations"] if keep(a["image_id"])],
        }

    return part(lambda i: i not in held_ids), part(lambda i: i in held_ids)


def split_coco_json(
    json_file: str, output_dir: str, every: int = 3, offset: int = 2, names: Optional[List[str]] = None
) -> Dict[str, str]:
    """Write ``train.json`` and ``heldout.json`` (or ``names``) under ``output_dir``.

    Returns:
        ``{"train": path, "heldout": path}``; each file is written atomically.
    """
    with open(json_file) as f:
        data = json.load(f)
    train, heldout = split_coco(data, every=every, offset=offset)
    names = names or ["train", "heldout"]
    os.makedirs(output_dir, exist_ok=True)
    out = {}
    for key, name, part in zip(("train", "heldout"), names, (train, heldout)):
        path = os.path.join(output_dir, f"{name}.json")
        atomic_write_text(path, json.dumps(part))
        out[key] = path
    return out


def _main(argv: Optional[List[str]] = None) -> None:  # used by datasets/split_coco.py
    import argparse

    from maedet.data.catalog import test_data_root

    parser = argparse.ArgumentParser(description="Split a COCO json into disjoint training and held-out images.")
    parser.add_argument(
        "--json",
        default=os.path.join(test_data_root(), "fruits_nuts", "trainval.json"),
        help="input COCO json (default: fruits_nuts from $MAEDET_TEST_DATA)",
    )
    parser.add_argument(
        "--output",
        default=os.path.join(os.environ.get("MAEDET_DATASETS", "datasets"), "fruits_nuts_split", "annotations"),
        help="output folder for train.json and heldout.json (default: $MAEDET_DATASETS/fruits_nuts_split/annotations)",
    )
    parser.add_argument("--every", type=int, default=3, help="hold out one image in EVERY (default 3)")
    parser.add_argument("--offset", type=int, default=2, help="position of the first held-out image (default 2)")
    args = parser.parse_args(argv)
    paths = split_coco_json(args.json, args.output, every=args.every, offset=args.offset)
    for key, path in paths.items():
        with open(path) as f:
            d = json.load(f)
        print(f"{key}: {path} ({len(d['images'])} images, {len(d['annotations'])} annotations)")
