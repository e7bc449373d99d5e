"""Simple feature pyramid of ViTDet: one stride-16 backbone map -> strides 4, 8, 16, 32 (+64).

The module structure mirrors detectron2's ``SimpleFeaturePyramid`` exactly
(``simfp_{stage}.{index}``, conv + norm modules with a ``.norm`` child), so a
detectron2 ViTDet checkpoint maps by stripping the ``backbone.`` prefix:
``backbone.simfp_2.4.norm.weight`` -> ``simfp_2.4.norm.weight``.

Like every neck, it is itself a :class:`~maedet.models.backbones.base.Backbone`
(``output_shape``, ``layer_id``) and says how its input must be padded
(:attr:`SimpleFeaturePyramid.padding_constraints`): the detector pads each batch
to a ``square_pad`` square, bottom/right, as detectron2 does.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Dict, Literal, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from maedet.kernels.conv import conv_layout
from maedet.models.backbones.base import Backbone
from maedet.models.layers import ConvNorm2d, ShapeSpec, get_norm
from maedet.utils.registry import NECKS

__all__ = ["SimpleFeaturePyramid"]


@NECKS.register("simple_feature_pyramid")
class SimpleFeaturePyramid(Backbone):
    """ViTDet's simple feature pyramid on top of a plain ViT (``self.net``)."""

    def __init__(
        self,
        net: Backbone,
        in_feature: Optional[str] = None,
        out_channels: int = 256,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        top_block: bool = True,
        norm: Literal["LN", ""] = "LN",
        square_pad: int = 0,
    ):
        """
        Args:
            net: the backbone (a ViT); its ``forward`` returns {in_feature: (B, C, H/s, W/s)}.
            in_feature: name of the backbone output used (default: its only output).
            out_channels: channels of every pyramid level.
            scale_factors: resampling of the stride-s map per level; 4 and 2 use
                transposed convs, 1 is the identity, 0.5 a 2x2 max pool.
            top_block: add a stride-64 level ("p6") by max-pooling the last level
                with kernel 1, stride 2 (detectron2's ``LastLevelMaxPool``).
            norm: "LN" (channels-first LayerNorm) or "" (none; convs get a bias).
            square_pad: if > 0, batches are padded (bottom/right, after
                normalization, with 0) to a square of this side before the
                backbone (ViTDet: 1024); see :attr:`padding_constraints`.
        """
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError("net must be a backbone module")
        self.net = net
        outputs = net.output_shape()
        if in_feature is None and len(outputs) == 1:
            in_feature = next(iter(outputs))
        if in_feature not in outputs:
            raise ValueError(f"in_feature {in_feature!r} is not an output of the backbone (outputs: {list(outputs)})")
        self.in_feature = in_feature
        shape = outputs[in_feature]
        dim, in_stride = shape.channels, shape.stride
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
        self._strides: Dict[str, int] = {f"p{int(math.log2(s))}": s for s in strides}
        if self.top_block:
            last = int(math.log2(strides[-1]))
            self._strides[f"p{last + 1}"] = 2 ** (last + 1)
        self.out_channels = out_channels
        # Inputs must be divisible by the coarsest stride so every level is exact.
        self._size_divisibility = max(max(self._strides.values()), in_stride)
        if square_pad and square_pad % self._size_divisibility:
            raise ValueError(f"square_pad={square_pad} must be a multiple of {self._size_divisibility}")
        self.square_pad = int(square_pad)

    # ------------------------------------------------------------ Backbone API
    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(self.out_channels, s) for name, s in self._strides.items()}

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    @property
    def padding_constraints(self) -> Dict[str, int]:
        """How the detector pads a batch: sides multiple of ``size_divisibility``, and
        a ``square_size`` square when it is > 0 (detectron2's padding constraints)."""
        return {"size_divisibility": self._size_divisibility, "square_size": self.square_pad}

    @property
    def num_layers(self) -> int:
        return self.net.num_layers

    def layer_id(self, name: str) -> int:
        """The backbone's own rule for ``net.*``; the pyramid layers come after it."""
        if name.startswith("net."):
            return self.net.layer_id(name[len("net.") :])
        return self.net.num_layers + 1

    def filter_pretrained(self, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return self.net.filter_pretrained(state)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """
        Args:
            x: (B, C_in, H, W) normalized images; H and W must be multiples of
                :attr:`size_divisibility` (64 with the default levels).
        Returns:
            OrderedDict "p2" .. "p6" -> (B, out_channels, H / stride, W / stride).
        """
        H, W = x.shape[-2:]
        d = self._size_divisibility
        if H % d or W % d:
            raise ValueError(
                f"SimpleFeaturePyramid input {H}x{W} must have sides divisible by {d} "
                "(the detector pads batches to padding_constraints)"
            )
        features = conv_layout(self.net(x)[self.in_feature], self.training)
        results = [stage(features) for stage in self.stages]
        if self.top_block:
            results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return OrderedDict(zip(self._strides, results))
