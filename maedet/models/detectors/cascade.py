"""Cascade R-CNN RoI heads (Cai & Vasconcelos 2018) as detectron2's ``CascadeROIHeads`` defines them.

Stage k has its own box head (4conv1fc with LayerNorm in ViTDet) and a
class-agnostic box predictor with weights ``bbox_reg_weights[k]``:

- training: stage 0 takes the RPN proposals with the ground-truth boxes appended,
  matched at ``stage_iou_thresholds[0]`` and sampled; stage k > 0 takes stage
  k - 1's refined boxes (detached, clipped, empty ones dropped), matched at its own
  threshold, all of them kept. Each stage adds its classification and box losses
  (``loss_cls_stage{k}``, ``loss_box_reg_stage{k}``); the gradient into the
  pooled features is scaled by 1 / number of stages. The mask head trains on
  stage 0's foreground RoIs, as in detectron2. (The ground truth is appended once,
  at stage 0; later stages refine those boxes like any other.)
- inference: every stage scores the boxes refined by the stage before; the class
  probabilities are averaged over the stages and the last stage's boxes kept,
  then per-class NMS as in Mask R-CNN; the mask head runs on the final boxes.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch
from torch import nn
from torchvision.models.detection import _utils as det_utils

from maedet.models.layers import ShapeSpec
from maedet.utils.registry import ROI_HEADS

from .boxes import BoxTransform, clip_boxes, nonempty, pairwise_iou
from .roi_heads import BoxPredictor, Detections, Features, Losses, Sizes, StandardRoIHeads, Target, build_box_head

__all__ = ["CascadeRoIHeads", "scale_gradient"]


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass."""
    return _ScaleGradient.apply(x, scale)


@ROI_HEADS.register("cascade")
class CascadeRoIHeads(StandardRoIHeads):
    """Three-stage Cascade R-CNN box heads + the Mask R-CNN mask head.

    Args: as :class:`StandardRoIHeads`, plus
        stage_iou_thresholds: foreground IoU threshold of each stage (0.5, 0.6, 0.7).
        stage_bbox_reg_weights: box coder weights of each stage
            ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)).
    ``fg_iou_thresh`` and ``bbox_reg_weights`` are replaced by the per-stage values.
    """

    config_exclude = ("fg_iou_thresh", "bbox_reg_weights")

    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        num_classes: int,
        *,
        stage_iou_thresholds: Sequence[float] = (0.5, 0.6, 0.7),
        stage_bbox_reg_weights: Sequence[Sequence[float]] = (
            (10.0, 10.0, 5.0, 5.0),
            (20.0, 20.0, 10.0, 10.0),
            (30.0, 30.0, 15.0, 15.0),
        ),
        **kwargs,
    ):
        if len(stage_iou_thresholds) != len(stage_bbox_reg_weights) or not stage_iou_thresholds:
            raise ValueError(
                f"one IoU threshold and one set of box weights per stage, got {len(stage_iou_thresholds)} "
                f"and {len(stage_bbox_reg_weights)}"
            )
        if any(len(w) != 4 for w in stage_bbox_reg_weights):
            raise ValueError(f"stage_bbox_reg_weights needs 4 weights per stage, got {list(stage_bbox_reg_weights)}")
        if "fg_iou_thresh" in kwargs or "bbox_reg_weights" in kwargs:
            raise ValueError(
                "cascade heads take stage_iou_thresholds and stage_bbox_reg_weights instead of "
                "fg_iou_thresh and bbox_reg_weights"
            )
        self.stage_weights = [tuple(float(v) for v in w) for w in stage_bbox_reg_weights]
        super().__init__(
            input_shape,
            num_classes,
            fg_iou_thresh=stage_iou_thresholds[0],
            bbox_reg_weights=self.stage_weights[0],
            **kwargs,
        )
        self.stage_matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in stage_iou_thresholds]

    @property
    def num_stages(self) -> int:
        return len(self.stage_weights)

    def _build_box_layers(self, bbox_reg_weights: Sequence[float]) -> None:
        convs, fcs = self.box_head_dims
        dim = fcs[-1] if fcs else convs[-1] * self.box_resolution**2
        self.box_head = nn.ModuleList(
            [build_box_head(self.channels, self.box_resolution, convs, fcs, self.conv_norm) for _ in self.stage_weights]
        )
        self.box_predictor = nn.ModuleList(
            [BoxPredictor(dim, self.num_classes, cls_agnostic=True) for _ in self.stage_weights]
        )
        self.box_transforms = [BoxTransform(w) for w in self.stage_weights]

    def _run_stage(self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor], stage: int):
        pooled = self.box_pooler(features, boxes)
        if self.training:
            pooled = scale_gradient(pooled, 1.0 / self.num_stages)
        return self.box_predictor[stage](self.box_head[stage](pooled))

    def _refine(self, deltas: torch.Tensor, boxes: List[torch.Tensor], stage: int) -> List[torch.Tensor]:
        """Stage ``stage``'s class-agnostic boxes, per image (float32)."""
        return list(self.box_transforms[stage].apply_deltas(deltas, torch.cat(boxes)).split([len(b) for b in boxes]))

    @torch.no_grad()
    def _match(self, boxes: List[torch.Tensor], targets: List[Target], stage: int):
        """Labels (0..K) and matched gt boxes of each box at ``stage``'s IoU threshold (no sampling)."""
        labels, gts = [], []
        matcher = self.stage_matchers[stage]
        for b, t in zip(boxes, targets):
            gt = t["boxes"].float()
            if gt.numel() == 0:
                labels.append(torch.zeros(len(b), dtype=torch.int64, device=b.device))
                gts.append(torch.zeros(len(b), 4, device=b.device))
                continue
            idx = matcher(pairwise_iou(gt, b))
            lab = t["labels"][idx.clamp(min=0)].to(torch.int64)
            lab[idx < 0] = 0
            labels.append(lab)
            gts.append(gt[idx.clamp(min=0)])
        return labels, gts

    def inference_forward(self, features: Features, proposals: List[torch.Tensor], image_sizes: Sizes) -> Detections:
        """Every stage refines the boxes; scores are the mean of the stages' probabilities
        and the boxes the last stage's (detectron2's cascade inference)."""
        boxes = [p.float() for p in proposals]
        n = [len(b) for b in boxes]
        stage_scores = []
        for k in range(self.num_stages):
            if k > 0:
                boxes = [clip_boxes(b, size) for b, size in zip(boxes, image_sizes)]
            logits, deltas = self._run_stage(features, boxes, k)
            stage_scores.append(self.class_probs(logits))
            refined = self._refine(deltas, boxes, k)
            if k < self.num_stages - 1:
                boxes = refined
        scores = (sum(stage_scores) * (1.0 / self.num_stages)).split(n)
        return self.detections(features, refined, scores, image_sizes)

    def train_forward(
        self, features: Features, proposals: List[torch.Tensor], sizes: Sizes, targets: List[Target]
    ) -> Losses:
        """Losses of every stage; stage k > 0 trains on stage k - 1's refined boxes,
        matched at its own IoU threshold (no sampling), and the mask head on stage 0's RoIs."""
        boxes, labels, matched = self.label_and_sample_proposals(proposals, targets)
        first = (boxes, labels, matched)
        gts = self.matched_gt_boxes(targets, matched)
        losses: Dict[str, torch.Tensor] = {}
        refined: List[torch.Tensor] = []
        for k in range(self.num_stages):
            if k > 0:
                boxes = [clip_boxes(b.detach(), size) for b, size in zip(refined, sizes)]
                boxes = [b[nonempty(b)] for b in boxes]
                labels, gts = self._match(boxes, targets, k)
            logits, deltas = self._run_stage(features, boxes, k)
            loss_cls, loss_box = self.box_losses(
                logits, deltas, torch.cat(boxes), torch.cat(labels), torch.cat(gts), self.box_transforms[k]
            )
            losses[f"loss_cls_stage{k}"] = loss_cls
            losses[f"loss_box_reg_stage{k}"] = loss_box
            refined = self._refine(deltas.detach(), boxes, k)
        if self.mask_on:
            losses["loss_mask"] = self.mask_losses(features, *first, targets)
        return losses
