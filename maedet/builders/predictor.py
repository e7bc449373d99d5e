"""A :class:`~maedet.inference.Predictor` from a config and a detection checkpoint."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import torch

from maedet.builders.config import load_detection_config
from maedet.builders.data import build_pipeline
from maedet.builders.model import build_detection_model, load_detection_weights, resolve_num_classes
from maedet.checkpoint.convert import peek_meta
from maedet.inference.predictor import Predictor
from maedet.utils.errors import ConfigError

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

    The number of classes is the checkpoint's
    (:func:`maedet.builders.model.resolve_num_classes`). COCO category ids come from
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
    num_classes = resolve_num_classes(cfg.model.num_classes, weights=weights, meta=meta)
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
