"""Box operations of the detectors, always in float32.

Box deltas come out of the heads in the autocast dtype (bfloat16 under
``train.amp=bf16``), where coordinates above 512 px would land on a 4 px grid.
As detectron2 does (``deltas.float()``), every decode, clip and filter here runs
in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

__all__ = ["BoxTransform", "clip_boxes", "nonempty", "pairwise_iou"]


class BoxTransform:
    """Box <-> delta coding with weights ``(wx, wy, ww, wh)`` (detectron2's ``Box2BoxTransform``).

    Encoding and decoding use torchvision's :class:`BoxCoder` arithmetic (the same
    as detectron2's), on float32 inputs; log-scale deltas are clamped at
    ``log(1000 / 16)`` before ``exp``.
    """

    def __init__(self, weights: Sequence[float], scale_clamp: float = math.log(1000.0 / 16)):
        self.weights = tuple(float(w) for w in weights)
        self._coder = BoxCoder(self.weights, bbox_xform_clip=scale_clamp)

    def get_deltas(self, boxes: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """(N, 4) deltas that turn ``boxes`` into ``targets`` (both (N, 4) XYXY)."""
        return self._coder.encode_single(targets.float(), boxes.float())

    def apply_deltas(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Decode (N, 4k) deltas against (N, 4) boxes: (N, 4k) float32 XYXY boxes."""
        deltas = deltas.float()
        if deltas.shape[0] == 0:
            return deltas.new_zeros(deltas.shape)
        return self._coder.decode_single(deltas, boxes.float())


def clip_boxes(boxes: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """Clamp (..., 4) XYXY boxes to an image of ``size`` = (height, width)."""
    h, w = size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x[..., 0], y[..., 0], x[..., 1], y[..., 1]), dim=-1)


def nonempty(boxes: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Boolean mask of (N, 4) boxes whose width and height are both > ``threshold``."""
    return ((boxes[:, 2] - boxes[:, 0]) > threshold) & ((boxes[:, 3] - boxes[:, 1]) > threshold)


def pairwise_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M) IoU of XYXY boxes in float32."""
    return box_iou(a.float(), b.float())
