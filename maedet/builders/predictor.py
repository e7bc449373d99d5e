"""A :class:`~maedet.inference.Predictor` from a config and a detection checkpoint."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import torch

from maedet.builders.config import load_detection_config
from maedet.builders.data import build_pipeline
from maedet.builders.model import build_detection_model, load_detection_weights
from maedet.checkpoint.convert import peek_meta
from maedet.checkpoint.formats.maedet import num_classes_of
from maedet.checkpoint.io import load_checkpoint_file
from maedet.checkpoint.report import unwrap_state_dict
from maedet.inference.predictor import Predictor
from maedet.utils.errors import CheckpointError, ConfigError

__all__ = ["build_predictor"]


def build_predictor(
    config: Any,
    weights: str,
    *,
    device: Union[str, torch.device] = "cpu",
    amp: str = "off",
    score_thresh: Optional[float] = None,
    class_names: Optional[Sequence[str]] = None,
    overrides: Optional[Sequence[str]] = None,
) -> Predictor:
    """Build the config's detector, load ``weights`` (strict keys and shapes) and wrap it.

    Args:
        config: a detection YAML path (``_base_`` and ``overrides`` applied) or a
            config resolved by :func:`maedet.builders.config.load_detection_config`.
        weights: a detection checkpoint (``model_final.pth``, a training
            checkpoint, or ``{"model": state_dict, "meta": {...}}``).
        device, amp, score_thresh: see :class:`~maedet.inference.Predictor`. A
            ``score_thresh`` below the model's own threshold lowers that threshold too.
        class_names: names of labels 1..K; default: the checkpoint's ``meta["class_names"]``.

    The number of classes is the checkpoint's ``meta["num_classes"]``, else the
    length of its class names, else ``class_names``', else ``model.num_classes``,
    else read off the box predictor's weights. COCO category ids come from
    ``meta["label_to_cat_id"]`` (identity when absent). The test-time resize is
    the config's ``data.test.pipeline``.
    """
    if isinstance(config, (str, os.PathLike)):
        cfg = load_detection_config(os.fspath(config), list(overrides or []), splits=())
    else:
        if overrides:
            raise ConfigError("overrides are only applied when config is a path; edit the loaded config instead")
        cfg = config
    weights = os.fspath(weights)
    meta = peek_meta(weights)
    names = meta.get("class_names")
    num_classes = (
        meta.get("num_classes")
        or (len(names) if names else None)
        or (len(class_names) if class_names else None)
        or cfg.model.num_classes
    )
    if not num_classes:
        num_classes = num_classes_of(unwrap_state_dict(load_checkpoint_file(weights), weights))
    if not num_classes:
        raise CheckpointError(
            f"{weights}: cannot tell the number of classes (no meta.num_classes / class_names "
            "in the checkpoint and model.num_classes=0 in the config)"
        )
    if class_names is not None and len(class_names) != int(num_classes):
        raise ConfigError(f"{len(class_names)} class_names given, but the model has {num_classes} classes")
    model = build_detection_model(cfg.model, int(num_classes), load_pretrained=False)
    load_detection_weights(model, weights)
    heads = model.roi_heads
    if score_thresh is not None and hasattr(heads, "score_thresh"):
        # the model drops boxes below its own threshold before the Predictor sees them
        heads.score_thresh = min(float(heads.score_thresh), float(score_thresh))
    predictor = Predictor(
        model,
        transform=build_pipeline(cfg.data.test.pipeline, "data.test.pipeline"),
        class_names=list(class_names) if class_names is not None else names,
        label_to_cat_id=meta.get("label_to_cat_id"),
        device=device,
        amp=amp,
        score_thresh=score_thresh,
    )
    predictor.cfg, predictor.meta = cfg, meta
    return predictor
