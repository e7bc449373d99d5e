"""Models from configs: the detector part by part from the registries, the MAE, weights loading."""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from maedet.checkpoint.describe import describe_for_error
from maedet.checkpoint.formats.maedet import num_classes_of
from maedet.checkpoint.io import load_checkpoint_file
from maedet.checkpoint.pretrained import load_pretrained_backbone
from maedet.checkpoint.report import shape_of, unwrap_state_dict
from maedet.models.mae import MaskedAutoencoderViT
from maedet.utils.errors import CheckpointError, ConfigError
from maedet.utils.registry import BACKBONES, DETECTORS, NECKS, PROPOSAL_GENERATORS, ROI_HEADS, Registry

__all__ = [
    "build_component",
    "build_detection_model",
    "detection_layout",
    "predicts_masks",
    "resolve_num_classes",
    "load_detection_weights",
    "build_mae_model",
    "section_dict",
]

logger = logging.getLogger("maedet")


def section_dict(section: Any) -> Dict[str, Any]:
    """A config section (DictConfig or mapping) as a plain dict."""
    if isinstance(section, DictConfig):
        return OmegaConf.to_container(section, resolve=True)
    return dict(section)


def build_component(reg: Registry, section: Any, path: str, builder_keys: Sequence[str] = (), **supplied: Any) -> Any:
    """``reg.get(section.name)(**supplied, **other keys of section)``.

    A ``ValueError`` / ``TypeError`` raised by the constructor (a value it refuses)
    becomes a ConfigError naming the section.
    """
    kwargs = section_dict(section)
    name = kwargs.pop("name")
    for k in builder_keys:
        kwargs.pop(k, None)
    fn = reg.get(name)
    try:
        return fn(**supplied, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} ({reg.kind} '{name}'): {e}") from e


def build_detection_model(model_cfg: Any, num_classes: int, load_pretrained: bool = True) -> nn.Module:
    """The detector described by a resolved ``model`` config section, on the CPU.

    Backbone (``model.backbone``, its ``pretrained`` weights loaded when set and
    ``load_pretrained``), neck (``model.neck`` on top of it), proposal generator
    (``model.rpn``), RoI heads (``model.roi_heads``) and the detector
    (``model.meta_arch``) that puts them together; each part is the registered
    component its ``name`` selects.
    """
    if num_classes < 1:
        raise ConfigError(f"model.num_classes must be >= 1 (foreground classes), got {num_classes}")
    m = model_cfg
    backbone = build_component(BACKBONES, m.backbone, "model.backbone", builder_keys=("pretrained",))
    pretrained = section_dict(m.backbone).get("pretrained")
    if pretrained and load_pretrained:
        load_pretrained_backbone(backbone, pretrained, logger=logger)
    neck = build_component(NECKS, m.neck, "model.neck", net=backbone)
    shape = neck.output_shape()
    parts = {
        "backbone": neck,
        "proposal_generator": build_component(PROPOSAL_GENERATORS, m.rpn, "model.rpn", input_shape=shape),
        "roi_heads": build_component(
            ROI_HEADS, m.roi_heads, "model.roi_heads", input_shape=shape, num_classes=int(num_classes)
        ),
    }
    meta_cls = DETECTORS.get(section_dict(m.meta_arch)["name"])
    wanted = inspect.signature(meta_cls).parameters
    return build_component(DETECTORS, m.meta_arch, "model.meta_arch", **{k: v for k, v in parts.items() if k in wanted})


def resolve_num_classes(
    configured: int,
    *,
    weights: Optional[str] = None,
    meta: Optional[Mapping[str, Any]] = None,
    dataset_classes: Optional[int] = None,
    dataset: str = "the dataset",
) -> int:
    """The number of foreground classes K of a detector: the one rule of every tool.

    A model whose weights are loaded (``--eval-only``, inference) has the classes it was
    trained on: its checkpoint's ``meta["num_classes"]``, else the length of its
    ``class_names``, else the rows of its box predictor. A model trained from scratch
    has its training set's classes (``dataset_classes``). ``model.num_classes``
    (``configured``, 0 = unset) is used only when neither says; set, it must agree.

    Raises:
        ConfigError: ``model.num_classes`` disagrees with the checkpoint or the dataset,
            or nothing tells the number.
    """
    found, source = None, None
    if weights is not None:
        meta = meta or {}
        names = meta.get("class_names")
        found = meta.get("num_classes") or (len(names) if names else None)
        if not found:
            obj = load_checkpoint_file(weights)
            found = num_classes_of(unwrap_state_dict(obj, weights))
            if not found:
                raise CheckpointError(
                    f"{weights} is not a detection checkpoint (no box predictor){describe_for_error(obj, weights)}"
                )
        source = f"the checkpoint {weights}"
    elif dataset_classes is not None:
        found, source = dataset_classes, dataset
    if found and configured and int(configured) != int(found):
        raise ConfigError(f"model.num_classes={configured} but {source} has {found} classes")
    k = int(found or configured or 0)
    if k < 1:
        raise ConfigError(
            f"cannot tell the number of classes: {source or 'no checkpoint or dataset'} does not say "
            "(no meta.num_classes / class_names) and model.num_classes is 0"
        )
    return k


def predicts_masks(model_cfg: Any) -> bool:
    """Whether the detector of a ``model`` config has a mask head: its RoI heads'
    ``mask_on`` (``model.roi_heads.mask_on``, else the registered head's default)."""
    section = section_dict(model_cfg.roi_heads)
    if "mask_on" in section:
        return bool(section["mask_on"])
    param = inspect.signature(ROI_HEADS.get(section["name"])).parameters.get("mask_on")
    return param is not None and bool(param.default)


def detection_layout(model_cfg: Any, num_classes: int) -> OrderedDict[str, torch.Tensor]:
    """The detector's state dict with ``meta`` tensors: its keys and shapes, nothing allocated."""
    with torch.device("meta"):
        model = build_detection_model(model_cfg, num_classes, load_pretrained=False)
    return OrderedDict(model.state_dict())


def load_detection_weights(model: nn.Module, path: str) -> Dict[str, Any]:
    """Load a detection checkpoint (``model_final.pth``, a training checkpoint, or
    ``{"model": state_dict}``) with strict key and shape checks. Returns its ``meta``."""
    state = load_checkpoint_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint dictionary")
    weights = unwrap_state_dict(state, path)
    own = model.state_dict()
    problem = None
    missing = [k for k in own if k not in weights]
    extra = sorted(set(weights) - set(own))
    mask_keys = ("roi_heads.mask_head.", "roi_heads.mask_predictor.")
    if missing and all(k.startswith(mask_keys) for k in missing):
        problem = f"has no mask head (missing '{missing[0]}'): a box-only model needs model.roi_heads.mask_on=false"
    elif missing:
        problem = f"missing key '{missing[0]}' ({len(missing)} in all; is it a detection checkpoint for this model?)"
    elif extra and all(k.startswith(mask_keys) for k in extra):
        problem = f"has a mask head ('{extra[0]}') that this model lacks (model.roi_heads.mask_on=false?)"
    elif extra:
        problem = f"unexpected key '{extra[0]}' ({len(extra)} in all) for this model"
    else:
        k = next((k for k, v in own.items() if shape_of(weights[k]) != shape_of(v)), None)
        if k is not None:
            problem = (
                f"key '{k}' has shape {shape_of(weights[k])}, the model expects "
                f"{shape_of(own[k])} (other model size or number of classes?)"
            )
    if problem is not None:
        raise CheckpointError(f"{path}: {problem}{describe_for_error(state, path)}")
    model.load_state_dict(weights)
    logger.info(f"loaded detection weights from {path}")
    meta = state.get("meta") if isinstance(state.get("meta"), Mapping) else {}
    return dict(meta)


def build_mae_model(model_cfg: Any) -> MaskedAutoencoderViT:
    """The MAE of a pretraining config's ``model`` section (``mask_ratio`` is a loss setting, not a layer)."""
    kwargs = section_dict(model_cfg)
    kwargs.pop("mask_ratio", None)
    return MaskedAutoencoderViT(**kwargs)


def checkpoint_model_config(meta: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The ``model`` config a detection checkpoint was trained with (``meta["model_config"]``), if stored."""
    cfg = meta.get("model_config")
    return dict(cfg) if isinstance(cfg, Mapping) else None
