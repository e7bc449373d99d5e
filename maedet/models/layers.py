"""Small layers shared by the detection parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn

from maedet.kernels.layer_norm import channel_layer_norm

__all__ = [
    "ShapeSpec",
    "LayerNorm2d",
    "ConvNorm2d",
    "get_norm",
    "shared_channels",
    "check_fractions",
    "check_positive",
]


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
    Computed by :func:`maedet.kernels.layer_norm.channel_layer_norm`; the output keeps
    the input's memory layout.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_layer_norm(x, self.weight, self.bias, self.eps)


def check_fractions(**values: float) -> None:
    """Raise ValueError naming the first value outside [0, 1] (thresholds, fractions)."""
    for name, v in values.items():
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name}={v} is outside the allowed range [0, 1]")


def check_positive(**values: int) -> None:
    """Raise ValueError naming the first count below 1 (top-k, batch sizes)."""
    for name, v in values.items():
        if int(v) < 1:
            raise ValueError(f"{name}={v} must be >= 1")


def shared_channels(input_shape: Dict[str, ShapeSpec], in_features: Sequence[str], what: str) -> int:
    """The channel count of the ``in_features`` maps a head reads (they must exist and agree).

    Raises:
        ValueError: a feature the neck does not output, or levels of different widths
            (``what`` names the head in the message).
    """
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(f"{what} in_features {missing} are not among the neck's outputs {list(input_shape)}")
    channels = {input_shape[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(f"{what} levels must have equal channels, got {sorted(channels)}")
    return channels.pop()


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
