"""maedet's own detection checkpoints: ``{"model": state, "meta": {...}}``.

``meta`` makes a checkpoint self-describing: ``format``, ``num_classes``,
``class_names`` and ``label_to_cat_id`` (the training set's categories, checked
against the evaluation set), ``model_config`` (the resolved ``model`` section of
the config it was trained with, so that tools can rebuild the architecture) and
the iteration. Training checkpoints (``model_XXXXXXX.pth``) hold the same model
state plus the optimizer, scaler and RNG states.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from maedet.checkpoint.report import meta_of, unwrap_state_dict
from maedet.utils.errors import CheckpointError, ConfigError

__all__ = ["DETECTION_FORMAT", "COCO_CATEGORIES", "read_detection", "class_meta"]

DETECTION_FORMAT = "maedet-vitdet"

# COCO 2017 detection categories (id, name), sorted by id: contiguous label i + 1 is the i-th entry.
COCO_CATEGORIES: Tuple[Tuple[int, str], ...] = (
    (1, "person"),
    (2, "bicycle"),
    (3, "car"),
    (4, "motorcycle"),
    (5, "airplane"),
    (6, "bus"),
    (7, "train"),
    (8, "truck"),
    (9, "boat"),
    (10, "traffic light"),
    (11, "fire hydrant"),
    (13, "stop sign"),
    (14, "parking meter"),
    (15, "bench"),
    (16, "bird"),
    (17, "cat"),
    (18, "dog"),
    (19, "horse"),
    (20, "sheep"),
    (21, "cow"),
    (22, "elephant"),
    (23, "bear"),
    (24, "zebra"),
    (25, "giraffe"),
    (27, "backpack"),
    (28, "umbrella"),
    (31, "handbag"),
    (32, "tie"),
    (33, "suitcase"),
    (34, "frisbee"),
    (35, "skis"),
    (36, "snowboard"),
    (37, "sports ball"),
    (38, "kite"),
    (39, "baseball bat"),
    (40, "baseball glove"),
    (41, "skateboard"),
    (42, "surfboard"),
    (43, "tennis racket"),
    (44, "bottle"),
    (46, "wine glass"),
    (47, "cup"),
    (48, "fork"),
    (49, "knife"),
    (50, "spoon"),
    (51, "bowl"),
    (52, "banana"),
    (53, "apple"),
    (54, "sandwich"),
    (55, "orange"),
    (56, "broccoli"),
    (57, "carrot"),
    (58, "hot dog"),
    (59, "pizza"),
    (60, "donut"),
    (61, "cake"),
    (62, "chair"),
    (63, "couch"),
    (64, "potted plant"),
    (65, "bed"),
    (67, "dining table"),
    (70, "toilet"),
    (72, "tv"),
    (73, "laptop"),
    (74, "mouse"),
    (75, "remote"),
    (76, "keyboard"),
    (77, "cell phone"),
    (78, "microwave"),
    (79, "oven"),
    (80, "toaster"),
    (81, "sink"),
    (82, "refrigerator"),
    (84, "book"),
    (85, "clock"),
    (86, "vase"),
    (87, "scissors"),
    (88, "teddy bear"),
    (89, "hair drier"),
    (90, "toothbrush"),
)


def read_detection(obj: Any, source: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(model state, meta) of a maedet detection checkpoint object."""
    state = unwrap_state_dict(obj, source)
    if not any(k.startswith(("rpn.", "roi_heads.")) for k in state):
        raise CheckpointError(f"checkpoint {source} is not a detection checkpoint (no 'rpn.' / 'roi_heads.' keys)")
    return dict(state), meta_of(obj)


def class_meta(class_names: Union[str, Sequence[str], None], num_classes: int) -> Dict[str, Any]:
    """``class_names`` and ``label_to_cat_id`` for a checkpoint's meta from ``"coco"``, a COCO
    json path or a list of names (ids 1..K)."""
    if class_names is None:
        return {}
    if isinstance(class_names, str):
        if class_names.lower() == "coco":
            cats: List[Tuple[int, str]] = list(COCO_CATEGORIES)
        else:
            try:
                with open(class_names, encoding="utf-8") as f:
                    data = json.load(f)
                cats = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(
                    f"--class-names {class_names}: not 'coco' nor a readable COCO json with 'categories' ({e})"
                ) from e
    else:
        cats = [(i + 1, str(n)) for i, n in enumerate(class_names)]
    if len(cats) != num_classes:
        raise ConfigError(f"--class-names gives {len(cats)} classes, the checkpoint has {num_classes}")
    return {"class_names": [n for _, n in cats], "label_to_cat_id": {i + 1: c for i, (c, _) in enumerate(cats)}}


def num_classes_of(state: Mapping[str, torch.Tensor]) -> Optional[int]:
    """K read off the box predictor (K + 1 scores), or None."""
    for k, v in state.items():
        if k.startswith("roi_heads.box_predictor.") and k.endswith("cls_score.weight"):
            return int(v.shape[0]) - 1
    return None
