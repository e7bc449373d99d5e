"""The architecture a checkpoint conversion checks against, from a config or the file's own metadata."""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional

from omegaconf import OmegaConf

from maedet.builders.config import load_detection_config, load_pretrain_config
from maedet.builders.model import detection_layout
from maedet.checkpoint.convert import ConversionOptions
from maedet.checkpoint.formats.maedet import num_classes_of
from maedet.checkpoint.report import meta_of, unwrap_state_dict
from maedet.config.loader import load_yaml_with_bases
from maedet.utils.errors import ConfigError

__all__ = ["conversion_options"]

_DETECTION = ("maedet-det", "d2-vitdet")


def _is_detection_config(path: str) -> bool:
    chain = load_yaml_with_bases(path)
    return any(isinstance(data.get("model"), dict) and "backbone" in data["model"] for _, data in chain) or any(
        "data" in data and isinstance(data["data"], dict) and "train" in data["data"] for _, data in chain
    )


def _embedded_model_config(obj: Any) -> Optional[Dict[str, Any]]:
    meta = meta_of(obj)
    if not meta and isinstance(obj, Mapping) and isinstance(obj.get("maedet"), Mapping):
        meta = dict(obj["maedet"].get("meta") or {})
    cfg = meta.get("model_config")
    return dict(cfg) if isinstance(cfg, Mapping) else None


def conversion_options(
    obj: Any, source: str, src_format: str, dst_format: str, config: Optional[str] = None, **encoder: Any
) -> ConversionOptions:
    """:class:`ConversionOptions` for converting the loaded checkpoint ``obj``.

    Detection: the layout of the model described by ``config`` (a detection YAML)
    or, without one, by the ``model_config`` the checkpoint stores; the number of
    classes is read off the box predictor. Encoders: ``config`` (a pretraining or
    detection YAML), when given, is the architecture every tensor is checked against.
    ``encoder``: ``img_size``, ``patch_size``, ``patch_resize``, ``class_names``, ``allow_missing``.
    """
    opt = ConversionOptions(**{k: v for k, v in encoder.items() if v is not None})
    detection = src_format in _DETECTION or dst_format in _DETECTION
    if config is not None and not os.path.isfile(config):
        raise ConfigError(f"--config {config}: file not found")
    if detection:
        if config is not None:
            if not _is_detection_config(config):
                raise ConfigError(f"--config {config} is not a detection config (no model.backbone)")
            model_cfg = OmegaConf.to_container(load_detection_config(config, splits=()).model, resolve=True)
        else:
            model_cfg = _embedded_model_config(obj)
        if model_cfg is None:
            return opt  # maedet -> detectron2 without a config: the source keys define the model
        num_classes = num_classes_of(unwrap_state_dict(obj, source))
        if not num_classes:
            raise ConfigError(
                f"checkpoint {source}: no box predictor (roi_heads.box_predictor...cls_score) "
                "to read the number of classes from"
            )
        opt.layout = detection_layout(OmegaConf.create(model_cfg), num_classes)
        opt.model_config = model_cfg
        return opt
    if config is not None:
        if _is_detection_config(config):
            b = load_detection_config(config, splits=()).model.backbone
            expected = {k: b[k] for k in ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio") if k in b}
        else:
            m = load_pretrain_config(config).model
            expected = {k: m[k] for k in ("embed_dim", "depth", "num_heads", "patch_size", "mlp_ratio")}
        expected["name"] = f"--config {config}"
        opt.expected = expected
    return opt
