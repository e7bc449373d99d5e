"""Two-stage detector: backbone (+ neck) -> RPN -> RoI heads (detectron2's ``GeneralizedRCNN``).

Inputs are images as the data pipeline leaves them: (3, h, w) RGB tensors with
values in 0..255 (uint8 or float), already resized (the pipelines in
:mod:`maedet.data.transforms` resize as detectron2's ViTDet mappers do). The
model owns normalization and padding: each image is normalized with
``pixel_mean`` / ``pixel_std`` (0..255 units), then the batch is padded with 0,
bottom/right, to the neck's padding constraints (ViTDet: the 1024 square).

Outputs in inference are in the frame of ``output_sizes`` when given (the
original images; boxes scaled, clipped, empty ones dropped, as detectron2's
``detector_postprocess``) or else of the input images. Masks are returned as
RoI probabilities ``mask_probs`` (N, 1, M, M); :func:`maedet.models.detectors.mask_ops.paste_masks_in_image`
pastes them into an image of any size, so that large images never hold N
full-size float masks.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from maedet.models.backbones.base import Backbone
from maedet.utils.registry import DETECTORS

from .boxes import clip_boxes, nonempty

__all__ = ["GeneralizedRCNN", "IMAGENET_PIXEL_MEAN", "IMAGENET_PIXEL_STD"]

# ImageNet statistics in 0..255 RGB units (detectron2's imagenet_rgb256_mean / _std).
IMAGENET_PIXEL_MEAN = (123.675, 116.28, 103.53)
IMAGENET_PIXEL_STD = (58.395, 57.12, 57.375)


@DETECTORS.register("generalized_rcnn")
class GeneralizedRCNN(nn.Module):
    """Mask R-CNN / Cascade Mask R-CNN, depending on the RoI heads.

    Args:
        backbone: the neck over the backbone (e.g. ``SimpleFeaturePyramid(ViT)``):
            named feature maps and ``padding_constraints``.
        proposal_generator: the RPN.
        roi_heads: box (and mask) heads, e.g. ``StandardRoIHeads`` or ``CascadeRoIHeads``.
        pixel_mean, pixel_std: RGB normalization in 0..255 units.
    """

    def __init__(
        self,
        *,
        backbone: Backbone,
        proposal_generator: nn.Module,
        roi_heads: nn.Module,
        pixel_mean: Sequence[float] = IMAGENET_PIXEL_MEAN,
        pixel_std: Sequence[float] = IMAGENET_PIXEL_STD,
    ):
        super().__init__()
        if len(pixel_mean) != 3 or len(pixel_std) != 3:
            raise ValueError("pixel_mean and pixel_std need one value per RGB channel")
        self.backbone = backbone
        self.rpn = proposal_generator
        self.roi_heads = roi_heads
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32).view(3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32).view(3, 1, 1), False)

    @property
    def num_classes(self) -> int:
        return self.roi_heads.num_classes

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay index of a parameter: the backbone's rule inside ``backbone.``,
        ``num_layers + 1`` for everything after it."""
        if name.startswith("backbone."):
            return self.backbone.layer_id(name[len("backbone.") :])
        return self.backbone.num_layers + 1

    def preprocess(self, images: List[torch.Tensor]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """Normalize each (3, h, w) image and pad the batch (0 after normalization, bottom/right).

        Returns:
            (B, 3, H, W) float32 batch and the (h, w) of each image inside it.
        """
        if not images:
            raise ValueError("no images")
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        constraints = getattr(self.backbone, "padding_constraints", {})
        div = int(constraints.get("size_divisibility", 1) or 1)
        square = int(constraints.get("square_size", 0) or 0)
        H = max(max(h for h, _ in sizes), square)
        W = max(max(w for _, w in sizes), square)
        H, W = -(-H // div) * div, -(-W // div) * div
        batch = self.pixel_mean.new_zeros((len(images), 3, H, W))
        for i, im in enumerate(images):
            if im.dim() != 3 or im.shape[0] != 3:
                raise ValueError(f"images must be (3, H, W) RGB tensors, got shape {tuple(im.shape)}")
            h, w = sizes[i]
            batch[i, :, :h, :w] = (im.to(batch.device, torch.float32) - self.pixel_mean) / self.pixel_std
        return batch, sizes

    def forward(
        self,
        images: List[torch.Tensor],
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
        output_sizes: Optional[List[Tuple[int, int]]] = None,
    ):
        """
        Args:
            images: (3, h, w) RGB images, values 0..255.
            targets (training): per image ``boxes`` (G, 4) XYXY, ``labels`` (G,) in 1..K,
                ``masks`` (G, h, w) uint8, in the image's frame.
            output_sizes (inference): per image the (H, W) to map the results to.
        Returns:
            training: a dict of scalar losses; inference: per image a dict with ``boxes``
            (N, 4) float32, ``scores`` (N,), ``labels`` (N,) in 1..K and ``mask_probs``
            (N, 1, M, M), best first.
        """
        batch, sizes = self.preprocess(images)
        features = self.backbone(batch)
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            targets = [
                {k: v.to(batch.device) if isinstance(v, torch.Tensor) else v for k, v in t.items()} for t in targets
            ]
            proposals, _, losses = self.rpn(features, sizes, [t["boxes"] for t in targets])
            losses.update(self.roi_heads(features, proposals, sizes, targets))
            return losses
        proposals, _, _ = self.rpn(features, sizes)
        results = self.roi_heads(features, proposals, sizes)
        if output_sizes is None:
            return results
        return [rescale_detections(r, s, o) for r, s, o in zip(results, sizes, output_sizes)]


def rescale_detections(
    result: Dict[str, torch.Tensor], from_size: Tuple[int, int], to_size: Tuple[int, int]
) -> Dict[str, torch.Tensor]:
    """Detections of an image of ``from_size`` mapped to ``to_size`` (detectron2's
    ``detector_postprocess``): boxes scaled per axis, clipped, empty boxes dropped."""
    out_h, out_w = int(to_size[0]), int(to_size[1])
    boxes = result["boxes"].float().clone()
    boxes[:, 0::2] *= out_w / from_size[1]
    boxes[:, 1::2] *= out_h / from_size[0]
    boxes = clip_boxes(boxes, (out_h, out_w))
    keep = nonempty(boxes)
    out = {k: v[keep] for k, v in result.items() if k != "boxes"}
    out["boxes"] = boxes[keep]
    return out
