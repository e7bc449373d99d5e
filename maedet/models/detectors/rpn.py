"""Region proposal network, following detectron2's ``RPN`` (the ViTDet recipe's).

The head is torchvision's ``RPNHead`` (two 3x3 convs + ReLU, then 1x1 objectness
and box-delta convs); anchors are detectron2's (:mod:`.anchors`); matching and
sampling use torchvision's ``Matcher`` and ``BalancedPositiveNegativeSampler``
with detectron2's settings. Proposals are selected as in detectron2's
``find_top_rpn_proposals``: per level the ``pre_nms_topk`` anchors with the
highest objectness logit, their deltas decoded in float32, clipped to the image,
empty boxes dropped, NMS per level on the logits, the ``post_nms_topk`` best kept.
Both losses are sums divided by ``batch_size_per_image x images``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import batched_nms

from maedet.kernels.conv import pointwise_convs
from maedet.models.layers import ShapeSpec, check_fractions, check_positive, shared_channels
from maedet.utils.registry import PROPOSAL_GENERATORS

from .anchors import DefaultAnchorGenerator
from .boxes import BoxTransform, clip_boxes, nonempty, pairwise_iou

__all__ = ["RPN", "box_regression_loss"]


def box_regression_loss(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Summed smooth-L1 loss in float32; ``beta < 1e-5`` is plain L1 (as detectron2)."""
    pred, target = pred.float(), target.float()
    if beta < 1e-5:
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")


class _RPNHead(RPNHead):
    """torchvision's ``RPNHead`` (same modules, parameter names and numbers) with its
    two 1 x 1 predictors run as one matrix product (:func:`pointwise_convs`)."""

    def forward(self, x: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        logits, deltas = [], []
        for feature in x:
            o, d = pointwise_convs(self.conv(feature), (self.cls_logits, self.bbox_pred))
            logits.append(o)
            deltas.append(d)
        return logits, deltas


@PROPOSAL_GENERATORS.register("rpn")
class RPN(nn.Module):
    """Region proposal network over several pyramid levels.

    Args:
        input_shape: the neck's outputs (name -> channels, stride).
        in_features: levels used, finest first (one anchor size each).
        anchor_sizes: anchor side per level.
        aspect_ratios: anchor height / width ratios.
        anchor_offset: anchor centre offset in strides (ViTDet: 0).
        conv_depth: 3x3 convs in the head (ViTDet: 2).
        pre_nms_topk_train, pre_nms_topk_test: proposals per level before NMS.
        post_nms_topk_train, post_nms_topk_test: proposals per image after NMS.
        nms_thresh: NMS IoU threshold.
        fg_iou_thresh, bg_iou_thresh: anchors with IoU >= fg are positive, < bg
            negative (every gt also claims its best anchors); others are ignored.
        batch_size_per_image: anchors sampled per image for the losses.
        positive_fraction: at most this fraction of them positive.
        smooth_l1_beta: box loss; 0 = L1 (ViTDet).
    """

    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        in_features: Sequence[str] = ("p2", "p3", "p4", "p5", "p6"),
        anchor_sizes: Sequence[float] = (32, 64, 128, 256, 512),
        aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
        anchor_offset: float = 0.0,
        conv_depth: int = 2,
        pre_nms_topk_train: int = 2000,
        pre_nms_topk_test: int = 1000,
        post_nms_topk_train: int = 1000,
        post_nms_topk_test: int = 1000,
        nms_thresh: float = 0.7,
        fg_iou_thresh: float = 0.7,
        bg_iou_thresh: float = 0.3,
        batch_size_per_image: int = 256,
        positive_fraction: float = 0.5,
        smooth_l1_beta: float = 0.0,
    ):
        super().__init__()
        channels = shared_channels(input_shape, in_features, "RPN")
        check_fractions(
            nms_thresh=nms_thresh,
            fg_iou_thresh=fg_iou_thresh,
            bg_iou_thresh=bg_iou_thresh,
            positive_fraction=positive_fraction,
        )
        if bg_iou_thresh > fg_iou_thresh:
            raise ValueError(f"bg_iou_thresh={bg_iou_thresh} must be <= fg_iou_thresh={fg_iou_thresh}")
        check_positive(
            pre_nms_topk_train=pre_nms_topk_train,
            pre_nms_topk_test=pre_nms_topk_test,
            post_nms_topk_train=post_nms_topk_train,
            post_nms_topk_test=post_nms_topk_test,
            batch_size_per_image=batch_size_per_image,
        )
        self.in_features = list(in_features)
        self.anchor_generator = DefaultAnchorGenerator(
            anchor_sizes, aspect_ratios, [input_shape[f].stride for f in in_features], anchor_offset
        )
        self.head = _RPNHead(channels, self.anchor_generator.num_anchors_per_location, conv_depth=conv_depth)
        self.box_transform = BoxTransform((1.0, 1.0, 1.0, 1.0))
        self.matcher = det_utils.Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.pre_nms_topk = {True: int(pre_nms_topk_train), False: int(pre_nms_topk_test)}
        self.post_nms_topk = {True: int(post_nms_topk_train), False: int(post_nms_topk_test)}
        self.nms_thresh = float(nms_thresh)
        self.batch_size_per_image = int(batch_size_per_image)
        self.smooth_l1_beta = float(smooth_l1_beta)

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        image_sizes: List[Tuple[int, int]],
        gt_boxes: Optional[List[torch.Tensor]] = None,
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], Dict[str, torch.Tensor]]:
        """
        Args:
            features: the neck's maps by name, (B, C, H_l, W_l).
            image_sizes: per image (h, w) of the image inside the padded batch.
            gt_boxes: per image (G_i, 4) ground-truth boxes (training).
        Returns:
            proposals: per image (P_i, 4) float32 XYXY boxes, best first;
            logits: per image (P_i,) their objectness logits;
            losses: ``loss_rpn_cls`` and ``loss_rpn_loc`` in training, else empty.
        """
        feats = [features[f] for f in self.in_features]
        anchors = self.anchor_generator(feats)
        objectness, deltas = self.head(feats)
        B = feats[0].shape[0]
        # (B, A, H, W) -> (B, H*W*A); (B, A*4, H, W) -> (B, H*W*A, 4): the anchors' order
        logits = [o.permute(0, 2, 3, 1).reshape(B, -1) for o in objectness]
        deltas = [d.view(B, -1, 4, d.shape[-2], d.shape[-1]).permute(0, 3, 4, 1, 2).reshape(B, -1, 4) for d in deltas]
        losses: Dict[str, torch.Tensor] = {}
        if self.training:
            if gt_boxes is None:
                raise ValueError("the RPN needs gt_boxes in training")
            losses = self.losses(torch.cat(anchors), torch.cat(logits, 1), torch.cat(deltas, 1), gt_boxes)
        with torch.no_grad():
            proposals, scores = self.find_top_proposals(anchors, logits, deltas, image_sizes)
        return proposals, scores, losses

    # ------------------------------------------------------------------ inference
    def find_top_proposals(
        self,
        anchors: List[torch.Tensor],
        logits: List[torch.Tensor],
        deltas: List[torch.Tensor],
        image_sizes: List[Tuple[int, int]],
    ):
        """detectron2's ``find_top_rpn_proposals`` (see the module docstring)."""
        pre_k, post_k = self.pre_nms_topk[self.training], self.post_nms_topk[self.training]
        B = logits[0].shape[0]
        top_boxes, top_scores, top_levels = [], [], []
        batch_idx = torch.arange(B, device=logits[0].device)[:, None]
        for level, (anc, lg, dl) in enumerate(zip(anchors, logits, deltas)):
            lg = lg.detach().float()
            k = min(pre_k, lg.shape[1])
            scores, idx = lg.topk(k, dim=1)
            boxes = self.box_transform.apply_deltas(
                dl.detach()[batch_idx, idx].reshape(-1, 4), anc[idx.reshape(-1)]
            ).view(B, k, 4)
            top_boxes.append(boxes)
            top_scores.append(scores)
            top_levels.append(torch.full((k,), level, dtype=torch.int64, device=lg.device))
        top_boxes, top_scores, top_levels = torch.cat(top_boxes, 1), torch.cat(top_scores, 1), torch.cat(top_levels)
        proposals, proposal_scores = [], []
        for n, size in enumerate(image_sizes):
            boxes, scores, levels = top_boxes[n], top_scores[n], top_levels
            valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
            if not bool(valid.all()):
                if self.training:
                    raise FloatingPointError("predicted boxes or scores contain Inf/NaN; training has diverged")
                boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
            boxes = clip_boxes(boxes, size)
            keep = nonempty(boxes)
            boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
            keep = batched_nms(boxes, scores, levels, self.nms_thresh)[:post_k]
            proposals.append(boxes[keep])
            proposal_scores.append(scores[keep])
        return proposals, proposal_scores

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def label_anchors(self, anchors: torch.Tensor, gt_boxes: List[torch.Tensor]):
        """Per image: labels (A,) in {1, 0, -1} (positive, negative, not sampled) and matched gt boxes (A, 4)."""
        labels, matched = [], []
        for gt in gt_boxes:
            if gt.numel() == 0:
                lab = torch.zeros(anchors.shape[0], dtype=torch.float32, device=anchors.device)
                boxes = torch.zeros_like(anchors)
            else:
                idx = self.matcher(pairwise_iou(gt, anchors))
                lab = (idx >= 0).to(torch.float32)
                lab[idx == self.matcher.BETWEEN_THRESHOLDS] = -1.0
                boxes = gt.float()[idx.clamp(min=0)]
            labels.append(lab)
            matched.append(boxes)
        pos, neg = self.sampler(labels)
        for lab, p, ng in zip(labels, pos, neg):
            lab[~(p.bool() | ng.bool())] = -1.0
        return labels, matched

    def losses(
        self, anchors: torch.Tensor, logits: torch.Tensor, deltas: torch.Tensor, gt_boxes: List[torch.Tensor]
    ) -> Dict[str, torch.Tensor]:
        """Objectness BCE over the sampled anchors and L1 box loss over the positive ones,
        both summed and divided by ``batch_size_per_image x images`` (detectron2)."""
        labels, matched = self.label_anchors(anchors, gt_boxes)
        labels = torch.stack(labels)  # (B, A)
        pos = labels == 1
        targets = torch.stack([self.box_transform.get_deltas(anchors, m) for m in matched])  # (B, A, 4)
        normalizer = float(self.batch_size_per_image * len(gt_boxes))
        box_loss = box_regression_loss(deltas[pos], targets[pos], self.smooth_l1_beta) / normalizer
        valid = labels >= 0
        obj_loss = F.binary_cross_entropy_with_logits(logits[valid].float(), labels[valid], reduction="sum")
        return {"loss_rpn_cls": obj_loss / normalizer, "loss_rpn_loc": box_loss}
