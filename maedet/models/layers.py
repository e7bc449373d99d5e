"""Small layers shared by the detection parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ShapeSpec", "LayerNorm2d", "ConvNorm2d", "get_norm"]


@dataclass(frozen=True)
class ShapeSpec:
    """What a feature map is: its channels and its stride (input pixels per cell)."""

    channels: int
    stride: int


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (detectron2's ``LayerNorm``, eps 1e-6).

    Deliberately not a ``torch.nn.LayerNorm`` subclass: detectron2's ViTDet recipe
    exempts ``torch.nn`` normalization layers from weight decay, and its
    channels-first LayerNorm (pyramid, heads) is not one of them, so this layer
    keeps weight decay under the same rule (:func:`maedet.engine.optim.param_groups`).
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.weight.shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


def get_norm(norm: str, channels: int) -> Optional[nn.Module]:
    """Normalization of NCHW maps by name: "LN" (:class:`LayerNorm2d`) or "" (none)."""
    if norm == "LN":
        return LayerNorm2d(channels)
    if norm in ("", None):
        return None
    raise ValueError(f"unsupported norm {norm!r}; use 'LN' or ''")


class ConvNorm2d(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional norm stored as ``.norm`` (detectron2's
    ``layers.Conv2d``), so parameters are named ``weight``, ``bias``, ``norm.weight``."""

    def __init__(self, *args, norm: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv_forward(x, self.weight, self.bias)
        if self.norm is not None:
            x = self.norm(x)
        return x
