"""Load pretrained weights into a backbone (``model.backbone.pretrained``).

Accepted files: an MAE encoder written by ``tools/pretrain.py``
(``encoder_final.pth``), an official MAE release checkpoint (with or without its
decoder), a timm state dict, a torchvision state dict for the ResNet backbone,
or a detection checkpoint (its ``backbone.net.*`` part). The backbone itself says
how the tensors fit it (:meth:`maedet.models.backbones.base.Backbone.filter_pretrained`:
the ViT drops the class token, final norm and decoder and resizes the position
table); everything is checked before anything is loaded, so a failed load leaves
the model untouched. A one-table :class:`~maedet.checkpoint.report.Report` is logged.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Union

import torch

from maedet.checkpoint.describe import describe_for_error
from maedet.checkpoint.io import load_checkpoint_file
from maedet.checkpoint.report import Report, shape_of, unwrap_state_dict
from maedet.utils.errors import CheckpointError

__all__ = ["load_pretrained_backbone"]


def load_pretrained_backbone(
    backbone: torch.nn.Module,
    path_or_state: Union[str, Mapping[str, Any]],
    logger: Optional[logging.Logger] = None,
) -> Report:
    """Load a pretrained checkpoint into ``backbone`` (a :class:`~maedet.models.backbones.base.Backbone`).

    Raises:
        CheckpointError: unreadable file, no usable keys, or tensors that do not fit
            (the message names the file and the first offending key).
    """
    logger = logger or logging.getLogger("maedet")
    if isinstance(path_or_state, (str, bytes)) or hasattr(path_or_state, "__fspath__"):
        source = str(path_or_state)
        obj = load_checkpoint_file(source, map_location="cpu")
    else:
        source, obj = "<state dict>", path_or_state
    state = unwrap_state_dict(obj, source)
    if any(k.startswith("backbone.net.") for k in state):  # a detection checkpoint
        state = unwrap_state_dict(state, source, strip_prefix="backbone.net.")
    own = backbone.state_dict()
    if not any(k in own for k in state) and not any(k.startswith(("patch_embed.", "blocks.")) for k in state):
        sample = ", ".join(list(state)[:5])
        raise CheckpointError(
            f"checkpoint {source} has no recognizable keys for this backbone "
            f"(no recognizable ViT keys, e.g. patch_embed.proj.weight, blocks.0.*; found: {sample})"
            + describe_for_error(obj, source)
        )
    try:
        fitted = backbone.filter_pretrained(state)
    except CheckpointError as e:
        raise CheckpointError(f"checkpoint {source}: {e}{describe_for_error(obj, source)}") from e
    report = Report(source, "pretrained backbone")
    for k, v in state.items():
        if k in fitted:
            report.loaded.append((k, k))
            if shape_of(v) != shape_of(fitted[k]):
                report.changed[k] = f"{shape_of(v)} -> {shape_of(fitted[k])} (resized)"
        elif k in own:
            report.unexpected.append(k)
        else:
            report.dropped.append(k)
    missing, unexpected = backbone.load_state_dict(fitted, strict=False)
    if unexpected:
        raise CheckpointError(f"checkpoint {source}: keys {unexpected[:3]} do not fit the backbone")
    report.missing = list(missing)
    logger.info(report.table())
    return report
