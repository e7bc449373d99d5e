"""torchvision's ResNet as a single-scale backbone (its stride-16 ``res4`` map).

A second backbone next to the ViT, and the worked example of docs/EXTENDING.md:
one file and the registration line below make ``model.backbone.name: resnet``
available to every config, with the simple feature pyramid on top as for ViTDet.
Parameter names are torchvision's (``conv1.weight``, ``layer3.1.bn2.weight`` ...),
so torchvision ImageNet weights load by name (``model.backbone.pretrained``).
Batch norm is frozen (statistics and affine fixed), as detection backbones
trained with a few images per GPU use it.
"""

from __future__ import annotations

from typing import Dict, Literal

import torch
import torchvision
from torchvision.ops.misc import FrozenBatchNorm2d

from maedet.models.layers import ShapeSpec
from maedet.utils.registry import BACKBONES

from .base import Backbone

__all__ = ["ResNet"]


@BACKBONES.register("resnet")
class ResNet(Backbone):
    """The stem and the first three stages of a torchvision ResNet.

    Args:
        variant: which ResNet (``resnet18`` .. ``resnet101``).
        freeze_at: freeze the stem (1) and stages 1..freeze_at-1 as well (2..4); 0 trains all.
        out_feature: name of the output (stride 16).
    """

    def __init__(
        self,
        *,
        variant: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet18",
        freeze_at: int = 0,
        out_feature: str = "res4",
    ):
        super().__init__()
        if not 0 <= freeze_at <= 4:
            raise ValueError(f"freeze_at must be in [0, 4], got {freeze_at}")
        net = getattr(torchvision.models, variant)(weights=None, norm_layer=FrozenBatchNorm2d)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3 = net.layer1, net.layer2, net.layer3
        self.out_feature = out_feature
        last = self.layer3[-1]
        self._channels = (last.conv3 if hasattr(last, "conv3") else last.conv2).out_channels
        stages = [self.conv1, self.layer1, self.layer2, self.layer3]
        for m in stages[:freeze_at]:
            m.requires_grad_(False)

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {self.out_feature: ShapeSpec(channels=self._channels, stride=16)}

    @property
    def num_layers(self) -> int:
        return 3

    def layer_id(self, name: str) -> int:
        """Stem -> 0, stage ``layer{i}`` -> i, anything else -> 4."""
        if name.startswith(("conv1.", "bn1.")):
            return 0
        for i in (1, 2, 3):
            if name.startswith(f"layer{i}."):
                return i
        return self.num_layers + 1

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return {self.out_feature: self.layer3(self.layer2(self.layer1(x)))}
