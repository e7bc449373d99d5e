"""Parameter groups (weight decay, layer-wise lr decay) and optimizers.

Weight decay follows the reference recipes exactly (tested parameter by parameter):

- ViTDet B/L (detectron2 ``get_default_optimizer_params(weight_decay_norm=0)`` with
  ``overrides={"pos_embed": {"weight_decay": 0}}``): 0 for the parameters of
  ``torch.nn`` normalization layers (the ViT's LayerNorms) and for ``pos_embed``;
  everything else, biases and rel-pos tables included, decays;
- ViTDet H: everything decays;
- MAE pretraining (the release's ``add_weight_decay``): 0 for 1-D parameters and
  biases; ``cls_token`` and ``mask_token`` decay.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["NORM_TYPES", "param_groups", "build_optimizer"]

# The normalization layers detectron2's weight_decay_norm applies to (torch.nn's own).
NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    *,
    weight_decay_norm: Optional[float] = None,
    no_decay_1d: bool = False,
    no_weight_decay: Sequence[str] = (),
    layer_decay: float = 1.0,
    num_layers: int = 0,
    layer_id_fn: Optional[Callable[[str], int]] = None,
) -> List[Dict]:
    """Split the trainable parameters of ``model`` into optimizer groups.

    Weight decay of a parameter, first rule that applies:

    1. 0 if its leaf name (``pos_embed`` of ``backbone.net.pos_embed``) is in ``no_weight_decay``;
    2. 0 if ``no_decay_1d`` and it is 1-D or named ``*.bias``;
    3. ``weight_decay_norm`` if that is set and it belongs to a ``torch.nn``
       normalization layer (:data:`NORM_TYPES`);
    4. ``weight_decay``.

    With ``layer_decay < 1`` each parameter's lr is scaled by
    ``layer_decay ** (num_layers + 1 - layer_id_fn(name))`` (layer-wise lr decay:
    embeddings id 0, block i id i + 1, everything after the backbone ``num_layers + 1``).

    Returns:
        groups with ``params``, ``weight_decay``, ``lr_scale`` and ``names`` (for
        inspection); frozen parameters are left out.
    """
    if layer_decay != 1.0 and layer_id_fn is None:
        raise ValueError("layer_decay != 1 needs layer_id_fn")
    norm_params = set()
    if weight_decay_norm is not None:
        for module in model.modules():
            if isinstance(module, NORM_TYPES):
                norm_params.update(id(p) for p in module.parameters(recurse=False))
    exempt = set(no_weight_decay)
    groups: Dict[tuple, Dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.rsplit(".", 1)[-1] in exempt or (no_decay_1d and (p.ndim <= 1 or name.endswith(".bias"))):
            wd = 0.0
        elif id(p) in norm_params:
            wd = float(weight_decay_norm)
        else:
            wd = float(weight_decay)
        if layer_decay != 1.0:
            layer_id = layer_id_fn(name)
            scale = layer_decay ** (num_layers + 1 - layer_id)
        else:
            layer_id, scale = -1, 1.0
        key = (layer_id, wd)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "weight_decay": wd, "lr_scale": scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# Devices with a fused AdamW kernel among those maedet runs on.
_FUSED_ADAMW_DEVICES = ("cuda", "cpu")


def build_optimizer(
    groups: List[Dict],
    name: str = "adamw",
    lr: float = 1e-4,
    betas: Sequence[float] = (0.9, 0.999),
    momentum: float = 0.9,
    fused: str = "auto",
    device: Optional[torch.device] = None,
) -> torch.optim.Optimizer:
    """AdamW or SGD over ``groups``; each group's starting lr is ``lr * lr_scale``.

    ``fused``: ``auto`` uses the fused AdamW kernel on CUDA and CPU (measured in
    docs/BENCHMARKS.md), the foreach one without a device; ``on``/``off`` force it.
    """
    if fused not in ("auto", "on", "off"):
        raise ValueError(f"fused must be auto, on or off, got '{fused}'")
    for g in groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    name = name.lower()
    if name == "adamw":
        use_fused = fused == "on" or (fused == "auto" and device is not None and device.type in _FUSED_ADAMW_DEVICES)
        kwargs = {"fused": True} if use_fused else {}
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), **kwargs)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    raise ValueError(f"unknown optimizer '{name}' (expected adamw or sgd)")
