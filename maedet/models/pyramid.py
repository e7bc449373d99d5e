"""Simple feature pyramid of ViTDet: one stride-16 ViT map -> strides 4, 8, 16, 32 (+64).

The module structure mirrors detectron2's ``SimpleFeaturePyramid`` exactly
(``simfp_{stage}.{index}``, conv + norm modules with a ``.norm`` child), so a
detectron2 ViTDet checkpoint maps by stripping the ``backbone.`` prefix:
``backbone.simfp_2.4.norm.weight`` -> ``simfp_2.4.norm.weight``.

It is a torchvision detection backbone: ``out_channels`` is set and
``forward`` returns an ``OrderedDict`` of maps named "p2" ... "p6".
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import LayerNorm2d

from .vit import ViT

__all__ = ["LayerNorm2d", "ConvNorm2d", "SimpleFeaturePyramid", "get_norm"]


def get_norm(norm: str, channels: int) -> Optional[nn.Module]:
    """Normalization of NCHW maps by name: "LN" (over channels, eps 1e-6, as
    detectron2's ``LayerNorm``) or "" (none)."""
    if norm == "LN":
        return LayerNorm2d(channels, eps=1e-6)
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


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid on top of a plain ViT (``self.net``)."""

    def __init__(
        self,
        net: ViT,
        in_feature: str = "last_feat",
        out_channels: int = 256,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        top_block: bool = True,
        norm: str = "LN",
        square_pad: int = 0,
    ):
        """
        Args:
            net: the ViT; its ``forward`` returns {in_feature: (B, C, H/s, W/s)}.
            in_feature: name of the ViT output used.
            out_channels: channels of every pyramid level.
            scale_factors: resampling of the stride-s map per level; 4 and 2 use
                transposed convs, 1 is the identity, 0.5 a 2x2 max pool.
            top_block: add a stride-64 level ("p6") by max-pooling the last level
                with kernel 1, stride 2 (detectron2's ``LastLevelMaxPool``).
            norm: "LN" (channels-first LayerNorm) or "" (none; convs get a bias).
            square_pad: if > 0, the input is zero-padded at the bottom/right to a
                square of side ``max(square_pad, H, W)`` before the ViT (as
                ViTDet's square padding to 1024), and the outputs are cropped
                back to the input's extent (H / stride, W / stride), so that the
                returned maps still match the input size (torchvision derives
                anchor strides from image size / feature size).
        """
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError("net must be a backbone module")
        self.net = net
        self.in_feature = in_feature
        dim = net._out_feature_channels[in_feature]
        in_stride = net._out_feature_strides[in_feature]
        self.scale_factors = tuple(float(s) for s in scale_factors)
        strides = [int(in_stride / scale) for scale in self.scale_factors]
        use_bias = norm in ("", None)

        self.stages = []
        for scale in self.scale_factors:
            out_dim = dim
            if scale == 4.0:
                layers = [
                    nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
                    get_norm(norm, dim // 2) or nn.Identity(),
                    nn.GELU(),
                    nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
                ]
                out_dim = dim // 4
            elif scale == 2.0:
                layers = [nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2)]
                out_dim = dim // 2
            elif scale == 1.0:
                layers = []
            elif scale == 0.5:
                layers = [nn.MaxPool2d(kernel_size=2, stride=2)]
            else:
                raise ValueError(f"scale_factor={scale} is not supported (use 4, 2, 1 or 0.5)")
            layers.extend(
                [
                    ConvNorm2d(out_dim, out_channels, kernel_size=1, bias=use_bias, norm=get_norm(norm, out_channels)),
                    ConvNorm2d(
                        out_channels,
                        out_channels,
                        kernel_size=3,
                        padding=1,
                        bias=use_bias,
                        norm=get_norm(norm, out_channels),
                    ),
                ]
            )
            stage_module = nn.Sequential(*layers)
            stage = int(math.log2(strides[len(self.stages)]))
            self.add_module(f"simfp_{stage}", stage_module)
            self.stages.append(stage_module)

        self.top_block = bool(top_block)
        self._out_feature_strides: Dict[str, int] = {f"p{int(math.log2(s))}": s for s in strides}
        if self.top_block:
            last = int(math.log2(strides[-1]))
            self._out_feature_strides[f"p{last + 1}"] = 2 ** (last + 1)
        self._out_features = list(self._out_feature_strides.keys())
        self._out_feature_channels = {k: out_channels for k in self._out_features}
        self.out_channels = out_channels  # torchvision backbone contract
        # Inputs must be divisible by the coarsest stride so every level is exact.
        self.size_divisibility = max(max(self._out_feature_strides.values()), in_stride)
        if square_pad and square_pad % self.size_divisibility:
            raise ValueError(f"square_pad={square_pad} must be a multiple of {self.size_divisibility}")
        self.square_pad = int(square_pad)

    @property
    def padding_constraints(self) -> Dict[str, int]:
        return {"size_divisibility": self.size_divisibility, "square_size": self.square_pad}

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """
        Args:
            x: (B, C_in, H, W) normalized images; H and W must be multiples of
                ``size_divisibility`` (64 with the default levels; torchvision's
                ``GeneralizedRCNNTransform(size_divisible=64)`` pads batches so).
        Returns:
            OrderedDict "p2" .. "p6" -> (B, out_channels, H / stride, W / stride).
        """
        H, W = x.shape[-2:]
        d = self.size_divisibility
        if H % d or W % d:
            raise ValueError(
                f"SimpleFeaturePyramid input {H}x{W} must have sides divisible by {d} "
                f"(pad images, e.g. GeneralizedRCNNTransform(size_divisible={d}))"
            )
        crop = False
        if self.square_pad > 0:
            side = max(self.square_pad, H, W)
            if side != H or side != W:
                x = F.pad(x, (0, side - W, 0, side - H))
                crop = True
        features = self.net(x)[self.in_feature]
        results = [stage(features) for stage in self.stages]
        if self.top_block:
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for name, feat in zip(self._out_features, results):
            if crop:
                s = self._out_feature_strides[name]
                feat = feat[:, :, : H // s, : W // s]
            out[name] = feat
        return out
