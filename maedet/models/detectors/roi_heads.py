"""Box and mask heads on RoIs (detectron2's ``StandardROIHeads`` with ViTDet's heads).

The layers are torchvision's: ``FastRCNNConvFCHead`` (convs + LayerNorm + ReLU,
then fc + ReLU), ``MaskRCNNHeads`` and ``MaskRCNNPredictor``, re-initialized as
detectron2 initializes them. Labels are ``1..K`` (0 is background, torchvision's
convention; a detectron2 checkpoint converts by moving its last class to the
front). Training follows detectron2: ground-truth boxes appended to the
proposals, IoU matching, ``batch_size_per_image`` sampled RoIs with a positive
fraction, softmax cross-entropy and an L1 box loss summed over the foreground
and divided by the number of sampled RoIs; mask targets are the gt polygons
rasterized inside each foreground RoI (bitmap masks: cropped with aligned RoIAlign
and binarized at 0.5). Losses carry detectron2's names (``loss_cls``,
``loss_box_reg``, ``loss_mask``). Inference follows
``fast_rcnn_inference``: softmax scores, boxes decoded in float32 per class and
clipped, ``score > score_thresh``, per-class NMS, the ``detections_per_img`` best.
"""

from __future__ import annotations

from typing import Dict, List, Literal, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import batched_nms, roi_align

from maedet.models.layers import LayerNorm2d, ShapeSpec, check_fractions, check_positive, shared_channels
from maedet.structures import PolygonMasks
from maedet.utils.registry import ROI_HEADS

from .boxes import BoxTransform, clip_boxes, pairwise_iou
from .poolers import MultiLevelRoIAlign
from .rpn import box_regression_loss

__all__ = [
    "BoxPredictor",
    "StandardRoIHeads",
    "mask_targets",
    "fast_rcnn_inference",
    "federated_loss_classes",
    "sigmoid_cross_entropy",
]

Target = Dict[str, torch.Tensor]
Features = Dict[str, torch.Tensor]  # pyramid level name -> (B, C, H, W)
Sizes = List[Tuple[int, int]]  # (h, w) of each image in the batch
Losses = Dict[str, torch.Tensor]
Detections = List[Dict[str, torch.Tensor]]


class BoxPredictor(nn.Module):
    """Class scores (K + 1, background first) and box deltas ((K + 1) x 4, or 4 when
    class-agnostic) from RoI features (torchvision's ``FastRCNNPredictor`` names)."""

    def __init__(self, in_channels: int, num_classes: int, cls_agnostic: bool = False):
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(in_channels, 4 if cls_agnostic else 4 * (num_classes + 1))
        self.cls_agnostic = cls_agnostic
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


def build_box_head(
    channels: int, resolution: int, conv_dims: Sequence[int], fc_dims: Sequence[int], conv_norm: str
) -> FastRCNNConvFCHead:
    """detectron2's 4conv1fc head: 3x3 convs (norm, ReLU) then fc layers (ReLU); c2 inits."""
    norm = LayerNorm2d if conv_norm == "LN" else None
    head = FastRCNNConvFCHead((channels, resolution, resolution), list(conv_dims), list(fc_dims), norm_layer=norm)
    for m in head.modules():
        if isinstance(m, nn.Linear):  # c2_xavier_fill; the convs already have c2_msra_fill
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)
    return head


def mask_targets(
    gt_masks: Union[PolygonMasks, torch.Tensor], boxes: torch.Tensor, matched_idxs: torch.Tensor, size: int
) -> torch.Tensor:
    """The (size, size) target of each RoI: its matched instance's mask inside its box.

    Polygons are rasterized inside each box (detectron2 ``PolygonMasks.crop_and_resize``);
    bitmaps are cropped with aligned RoIAlign and binarized at 0.5 (``BitMasks.crop_and_resize``).
    Returns (P, size, size) float32 of 0 / 1.
    """
    if isinstance(gt_masks, PolygonMasks):
        return gt_masks.crop_and_resize(boxes, matched_idxs, size)
    if boxes.shape[0] == 0:
        return boxes.new_zeros((0, size, size))
    used, local = torch.unique(matched_idxs, return_inverse=True)  # convert only the masks in use
    rois = torch.cat([local[:, None].to(torch.float32), boxes.float()], dim=1)
    out = roi_align(gt_masks[used][:, None].to(torch.float32), rois, (size, size), 1.0, 0, True)[:, 0]
    return (out >= 0.5).to(torch.float32)


def federated_loss_classes(
    labels: torch.Tensor, num_fed_loss_classes: int, num_classes: int, weight: torch.Tensor
) -> torch.Tensor:
    """The classes a federated loss scores: every class among ``labels`` plus negatives drawn
    with probability ``weight`` (detectron2's ``get_fed_loss_classes``, Zhou et al. 2021).

    Computed in detectron2's class order (foreground ``0..K-1``, background ``K``, so that
    the draws are detectron2's for the same RNG state). Args: ``labels`` (R,) in 0..K
    (0 = background); ``weight`` (K,) per-class sampling weights. Returns the classes in
    detectron2's order: foreground class ``c`` (label ``c + 1``) or ``K`` (background).
    With fewer classes left to draw than asked for (a dataset of fewer than
    ``num_fed_loss_classes`` classes), all are scored; detectron2 raises there.
    """
    d2_classes = torch.where(labels > 0, labels - 1, torch.full_like(labels, num_classes))
    unique = torch.unique(d2_classes)
    prob = unique.new_ones(num_classes + 1).float()
    prob[-1] = 0
    if len(unique) < num_fed_loss_classes:
        prob[:num_classes] = weight.float().clone()
        prob[unique] = 0
        wanted = num_fed_loss_classes - len(unique)
        if wanted > int((prob > 0).sum()):  # fewer classes left than asked for: all of them
            return torch.cat([unique, torch.nonzero(prob > 0).flatten()])
        negatives = torch.multinomial(prob, wanted, replacement=False)
        return torch.cat([unique, negatives])
    return unique


def sigmoid_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    fed_loss_weight: Optional[torch.Tensor] = None,
    fed_loss_classes: int = 50,
) -> torch.Tensor:
    """detectron2's ``sigmoid_cross_entropy_loss``: one binary cross-entropy per foreground
    class (the background logit is not used), summed and divided by the number of RoIs;
    with ``fed_loss_weight`` (K,) only the classes :func:`federated_loss_classes` draws count.

    Args: ``logits`` (R, K + 1) background first; ``labels`` (R,) in 0..K.
    """
    if logits.numel() == 0:
        return logits.sum() * 0
    n, k = logits.shape[0], logits.shape[1] - 1
    dtype = torch.promote_types(logits.dtype, torch.float32)  # float32 at least (autocast)
    target = torch.zeros_like(logits, dtype=dtype)
    target[torch.arange(n, device=logits.device), labels] = 1
    loss = F.binary_cross_entropy_with_logits(logits[:, 1:].to(dtype), target[:, 1:], reduction="none")
    if fed_loss_weight is not None:
        classes = federated_loss_classes(labels, fed_loss_classes, k, fed_loss_weight)
        mask = loss.new_zeros(k + 1)
        mask[classes] = 1
        loss = loss * mask[:k].view(1, k)
    return loss.sum() / n


def fast_rcnn_inference(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image_size: Tuple[int, int],
    score_thresh: float,
    nms_thresh: float,
    topk: int,
) -> Dict[str, torch.Tensor]:
    """detectron2's ``fast_rcnn_inference_single_image`` with background at column 0.

    Args:
        boxes: (R, 4 * C) decoded boxes, C = K + 1 class-specific or 1 class-agnostic.
        scores: (R, K + 1) class probabilities, background first.
    Returns:
        ``boxes`` (N, 4) float32, ``scores`` (N,), ``labels`` (N,) in 1..K, best first.
    """
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if not bool(valid.all()):
        boxes, scores = boxes[valid], scores[valid]
    scores = scores[:, 1:]
    per_class = boxes.shape[1] // 4
    boxes = clip_boxes(boxes.reshape(boxes.shape[0], per_class, 4), image_size)
    if per_class > 1:
        boxes = boxes[:, 1:]
    keep_mask = scores > score_thresh
    inds = keep_mask.nonzero()
    boxes = boxes[inds[:, 0], 0] if per_class == 1 else boxes[keep_mask]
    scores = scores[keep_mask]
    keep = batched_nms(boxes, scores, inds[:, 1], nms_thresh)
    if topk >= 0:
        keep = keep[:topk]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": inds[keep, 1] + 1}


@ROI_HEADS.register("standard")
class StandardRoIHeads(nn.Module):
    """Box head + mask head on the pooled RoIs of a feature pyramid.

    Args:
        input_shape: the neck's outputs (name -> channels, stride).
        num_classes: K foreground classes.
        in_features: levels RoIs are pooled from (ViTDet: p2..p5).
        box_pooler_resolution, mask_pooler_resolution: RoIAlign output sides (7, 14).
        pooler_sampling_ratio: RoIAlign sampling points per bin (0 = adaptive).
        box_head_conv_dims, box_head_fc_dims: widths of the box head's layers.
        mask_head_conv_dims: widths of the mask head's 3x3 convs (the deconv keeps the last).
        conv_norm: "LN" (ViTDet) or "" (no norm) in the head convs.
        bbox_reg_weights: box coder weights (10, 10, 5, 5).
        fg_iou_thresh: RoIs with IoU >= this to a gt are foreground.
        batch_size_per_image, positive_fraction: RoI sampling.
        score_thresh, nms_thresh, detections_per_img: inference.
        smooth_l1_beta: box loss; 0 = L1 (ViTDet).
        mask_on: predict masks.
        use_sigmoid_ce: classify with one sigmoid per class (binary cross-entropy) instead of
            the softmax; scores are then sigmoids (detectron2's ``use_sigmoid_ce``, LVIS).
        use_fed_loss: the federated loss (needs ``use_sigmoid_ce``): each step scores the
            classes present and ``fed_loss_num_classes`` in all, the others drawn with
            weights the training set's per-class image counts to the power
            ``fed_loss_freq_weight_power`` (:meth:`set_class_image_counts`).
    """

    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        num_classes: int,
        *,
        in_features: Sequence[str] = ("p2", "p3", "p4", "p5"),
        box_pooler_resolution: int = 7,
        mask_pooler_resolution: int = 14,
        pooler_sampling_ratio: int = 0,
        box_head_conv_dims: Sequence[int] = (256, 256, 256, 256),
        box_head_fc_dims: Sequence[int] = (1024,),
        mask_head_conv_dims: Sequence[int] = (256, 256, 256, 256),
        conv_norm: Literal["LN", ""] = "LN",
        bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        fg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        smooth_l1_beta: float = 0.0,
        mask_on: bool = True,
        use_sigmoid_ce: bool = False,
        use_fed_loss: bool = False,
        fed_loss_num_classes: int = 50,
        fed_loss_freq_weight_power: float = 0.5,
    ):
        super().__init__()
        if use_fed_loss and not use_sigmoid_ce:
            raise ValueError("use_fed_loss=True needs use_sigmoid_ce=True (the federated loss is a sigmoid loss)")
        check_positive(fed_loss_num_classes=fed_loss_num_classes)
        self.use_sigmoid_ce, self.use_fed_loss = bool(use_sigmoid_ce), bool(use_fed_loss)
        self.fed_loss_num_classes = int(fed_loss_num_classes)
        self.fed_loss_freq_weight_power = float(fed_loss_freq_weight_power)
        self.fed_loss_weight: Optional[torch.Tensor] = None
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
        check_fractions(
            score_thresh=score_thresh,
            nms_thresh=nms_thresh,
            fg_iou_thresh=fg_iou_thresh,
            positive_fraction=positive_fraction,
        )
        check_positive(batch_size_per_image=batch_size_per_image, detections_per_img=detections_per_img)
        self.channels = shared_channels(input_shape, in_features, "RoI heads")
        self.num_classes = int(num_classes)
        strides = [input_shape[f].stride for f in in_features]
        self.box_pooler = MultiLevelRoIAlign(in_features, strides, box_pooler_resolution, pooler_sampling_ratio)
        self.box_resolution = box_pooler_resolution
        self.conv_norm = conv_norm
        self.box_head_dims = (tuple(box_head_conv_dims), tuple(box_head_fc_dims))
        self._build_box_layers(bbox_reg_weights)
        self.proposal_matcher = det_utils.Matcher(fg_iou_thresh, fg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.score_thresh = float(score_thresh)
        self.nms_thresh = float(nms_thresh)
        self.detections_per_img = int(detections_per_img)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.mask_on = bool(mask_on)
        if self.mask_on:
            self.mask_pooler = MultiLevelRoIAlign(in_features, strides, mask_pooler_resolution, pooler_sampling_ratio)
            norm = LayerNorm2d if conv_norm == "LN" else None
            self.mask_head = MaskRCNNHeads(self.channels, list(mask_head_conv_dims), 1, norm_layer=norm)
            dim = list(mask_head_conv_dims)[-1]
            self.mask_predictor = MaskRCNNPredictor(dim, dim, self.num_classes + 1)
            nn.init.zeros_(self.mask_predictor.conv5_mask.bias)  # weight: c2_msra_fill already
            nn.init.normal_(self.mask_predictor.mask_fcn_logits.weight, std=0.001)
            nn.init.zeros_(self.mask_predictor.mask_fcn_logits.bias)

    def set_class_image_counts(self, counts: Sequence[int]) -> None:
        """The training set's number of images per class (labels 1..K), which weight the
        federated loss's draws (detectron2's ``get_fed_loss_cls_weights``)."""
        if len(counts) != self.num_classes:
            raise ValueError(f"{len(counts)} class image counts for {self.num_classes} classes")
        self.fed_loss_weight = torch.tensor([float(c) for c in counts]) ** self.fed_loss_freq_weight_power

    def class_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(R, K + 1) class probabilities, background first: softmax, or per-class sigmoids."""
        return logits.float().sigmoid() if self.use_sigmoid_ce else F.softmax(logits.float(), dim=-1)

    def _build_box_layers(self, bbox_reg_weights: Sequence[float]) -> None:
        convs, fcs = self.box_head_dims
        self.box_head = build_box_head(self.channels, self.box_resolution, convs, fcs, self.conv_norm)
        self.box_predictor = BoxPredictor(fcs[-1] if fcs else convs[-1] * self.box_resolution**2, self.num_classes)
        self.box_transform = BoxTransform(bbox_reg_weights)

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: List[torch.Tensor], targets: List[Target]):
        """Append the gt boxes to each image's proposals, match (IoU) and sample RoIs.

        Returns per image: sampled boxes (S, 4), their labels (S,) in 0..K, and the
        index of their matched gt (S,) (meaningful where the label is > 0).
        """
        boxes_out, labels_out, matched_out = [], [], []
        all_labels, all_matched, all_boxes = [], [], []
        for props, t in zip(proposals, targets):
            gt = t["boxes"].float()
            boxes = torch.cat([props.float(), gt])
            if gt.numel() == 0:
                matched = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
                labels = torch.zeros(boxes.shape[0], dtype=torch.int64, device=boxes.device)
            else:
                idx = self.proposal_matcher(pairwise_iou(gt, boxes))
                matched = idx.clamp(min=0)
                labels = t["labels"][matched].to(torch.int64)
                labels[idx == self.proposal_matcher.BELOW_LOW_THRESHOLD] = 0
                labels[idx == self.proposal_matcher.BETWEEN_THRESHOLDS] = -1
            all_boxes.append(boxes)
            all_labels.append(labels)
            all_matched.append(matched)
        pos, neg = self.sampler(all_labels)
        for boxes, labels, matched, p, n in zip(all_boxes, all_labels, all_matched, pos, neg):
            keep = torch.where(p.bool() | n.bool())[0]
            boxes_out.append(boxes[keep])
            labels_out.append(labels[keep])
            matched_out.append(matched[keep])
        return boxes_out, labels_out, matched_out

    def box_losses(
        self,
        logits: torch.Tensor,
        deltas: torch.Tensor,
        boxes: torch.Tensor,
        labels: torch.Tensor,
        gt_boxes: torch.Tensor,
        box_transform: BoxTransform,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy over all RoIs (softmax, or sigmoid / federated, see the class); L1 on
        the foreground's deltas (its class's, or the class-agnostic ones), summed and divided
        by the number of RoIs."""
        if self.use_sigmoid_ce:
            if self.use_fed_loss and self.fed_loss_weight is None:
                raise RuntimeError("use_fed_loss needs the class image counts: call set_class_image_counts first")
            weight = self.fed_loss_weight.to(logits.device) if self.use_fed_loss else None
            loss_cls = sigmoid_cross_entropy(logits, labels, weight, self.fed_loss_num_classes)
        else:
            loss_cls = F.cross_entropy(logits.float(), labels)
        fg = torch.where(labels > 0)[0]
        deltas = deltas.reshape(deltas.shape[0], -1, 4)
        cols = labels[fg] if deltas.shape[1] > 1 else torch.zeros_like(fg)
        target = box_transform.get_deltas(boxes[fg], gt_boxes[fg])
        loss_box = box_regression_loss(deltas[fg, cols], target, self.smooth_l1_beta) / max(labels.numel(), 1)
        return loss_cls, loss_box

    def mask_losses(
        self,
        features: Dict[str, torch.Tensor],
        boxes: List[torch.Tensor],
        labels: List[torch.Tensor],
        matched: List[torch.Tensor],
        targets: List[Target],
    ) -> torch.Tensor:
        """Per-pixel BCE of the foreground RoIs' gt-class mask logits against their targets."""
        fg_boxes, fg_targets, fg_labels = [], [], []
        size = None
        for b, lab, m, t in zip(boxes, labels, matched, targets):
            fg = torch.where(lab > 0)[0]
            fg_boxes.append(b[fg])
            fg_labels.append(lab[fg])
            fg_targets.append((t["masks"], m[fg]))
        logits = self.mask_predictor(self.mask_head(self.mask_pooler(features, fg_boxes)))
        size = logits.shape[-1]
        tgt = torch.cat([mask_targets(masks, b, m, size) for (masks, m), b in zip(fg_targets, fg_boxes)])
        labels_cat = torch.cat(fg_labels)
        if tgt.numel() == 0:
            return logits.sum() * 0
        logits = logits[torch.arange(labels_cat.shape[0], device=logits.device), labels_cat]
        return F.binary_cross_entropy_with_logits(logits.float(), tgt)

    # ------------------------------------------------------------------ inference
    def predict_masks(self, features: Dict[str, torch.Tensor], results: List[Dict[str, torch.Tensor]]) -> None:
        """Add ``mask_probs`` (N, 1, M, M): sigmoid of each detection's class channel."""
        boxes = [r["boxes"] for r in results]
        logits = self.mask_predictor(self.mask_head(self.mask_pooler(features, boxes)))
        labels = torch.cat([r["labels"] for r in results])
        probs = logits[torch.arange(labels.shape[0], device=logits.device), labels][:, None].float().sigmoid()
        for r, p in zip(results, probs.split([len(b) for b in boxes])):
            r["mask_probs"] = p

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        proposals: List[torch.Tensor],
        image_sizes: List[Tuple[int, int]],
        targets: Optional[List[Target]] = None,
    ):
        """Training: a dict of losses. Inference: per image a dict with ``boxes`` (N, 4),
        ``scores``, ``labels`` (1..K) and, with masks, ``mask_probs`` (N, 1, M, M),
        in the frame of the (unpadded) input image."""
        if self.training:
            if targets is None:
                raise ValueError("RoI heads need targets in training")
            return self.train_forward(features, proposals, image_sizes, targets)
        return self.inference_forward(features, proposals, image_sizes)

    def train_forward(
        self, features: Features, proposals: List[torch.Tensor], sizes: Sizes, targets: List[Target]
    ) -> Losses:
        """The losses (subclasses with other box stages override this and :meth:`inference_forward`)."""
        boxes, labels, matched = self.label_and_sample_proposals(proposals, targets)
        logits, deltas = self.box_predictor(self.box_head(self.box_pooler(features, boxes)))
        gt = torch.cat(self.matched_gt_boxes(targets, matched))
        loss_cls, loss_box = self.box_losses(
            logits, deltas, torch.cat(boxes), torch.cat(labels), gt, self.box_transform
        )
        losses = {"loss_cls": loss_cls, "loss_box_reg": loss_box}
        if self.mask_on:
            losses["loss_mask"] = self.mask_losses(features, boxes, labels, matched, targets)
        return losses

    def inference_forward(self, features: Features, proposals: List[torch.Tensor], image_sizes: Sizes) -> Detections:
        """Per-image detections (see :meth:`forward`)."""
        logits, deltas = self.box_predictor(self.box_head(self.box_pooler(features, proposals)))
        n = [len(p) for p in proposals]
        scores = self.class_probs(logits).split(n)
        boxes = self.box_transform.apply_deltas(deltas, torch.cat(proposals)).split(n)
        return self.detections(features, boxes, scores, image_sizes)

    # ------------------------------------------------------------------ shared by subclasses
    @staticmethod
    def matched_gt_boxes(targets: List[Target], matched: List[torch.Tensor]) -> List[torch.Tensor]:
        """Per image, the gt box each sampled RoI was matched to (zeros for an image without gt)."""
        return [
            t["boxes"].float()[m] if t["boxes"].numel() else torch.zeros(len(m), 4, device=m.device)
            for t, m in zip(targets, matched)
        ]

    def detections(
        self,
        features: Dict[str, torch.Tensor],
        boxes: Sequence[torch.Tensor],
        scores: Sequence[torch.Tensor],
        image_sizes: List[Tuple[int, int]],
    ) -> List[Dict[str, torch.Tensor]]:
        """Per-image detections from class-specific boxes and probabilities (score
        threshold, NMS, top-k), with mask probabilities when the head predicts masks."""
        results = [
            fast_rcnn_inference(b, s, size, self.score_thresh, self.nms_thresh, self.detections_per_img)
            for b, s, size in zip(boxes, scores, image_sizes)
        ]
        if self.mask_on:
            self.predict_masks(features, results)
        return results
