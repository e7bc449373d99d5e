"""ViTDet Mask R-CNN assembled from torchvision's detection components.

``build_vitdet_mask_rcnn`` returns a ``torchvision.models.detection.MaskRCNN``
whose backbone is ``SimpleFeaturePyramid(ViT(...))`` (so ``model.backbone.net``
is the ViT) and whose heads follow detectron2's ViTDet COCO recipe
(``projects/ViTDet/configs/COCO/mask_rcnn_vitdet_*``):

- RPN on p2..p6, one anchor size per level (32 .. 512), ratios 0.5/1/2, a head
  with two 3x3 convs, L1 box loss (detectron2 ``smooth_l1_beta=0``),
  pre-NMS top-k 2000/1000 per level, post-NMS top-k 1000 per image.
- RoIAlign with ``aligned=True`` (detectron2 ``ROIAlignV2``), adaptive sampling,
  box RoIs 7x7 and mask RoIs 14x14 over p2..p5.
- Box head: 4 conv (LN) + 1 fc 1024; L1 box loss; Mask head: 4 conv (LN) +
  deconv + 1x1 predictor; mask targets cropped with aligned RoIAlign and
  binarized at 0.5.
- detectron2 initializations of the predictors and fc layers.

Differences that remain are listed in ``docs/VITDET_DIFFERENCES.md``.

Inputs follow torchvision's convention: a list of float RGB images in [0, 1]
(3, H, W), normalized inside the model with ImageNet mean / std (the same
normalization as ViTDet's pixel mean/std on 0-255 images). Targets: dicts with
``boxes`` (N, 4) xyxy float, ``labels`` (N,) int64 in 1..K (0 is background),
``masks`` (N, H, W) uint8.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import MultiScaleRoIAlign, roi_align
from torchvision.ops.poolers import LevelMapper

from maedet.data.transforms import IMAGENET_MEAN, IMAGENET_STD

from .pyramid import LayerNorm2d, SimpleFeaturePyramid
from .vit import ViT

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "AlignedMultiScaleRoIAlign",
    "Float32AnchorGenerator",
    "ViTDetRPN",
    "ViTDetRoIHeads",
    "box_regression_loss",
    "build_vitdet_mask_rcnn",
]


class Float32AnchorGenerator(AnchorGenerator):
    """torchvision's anchor generator, with anchors always built in float32.

    torchvision builds (and caches) the anchors in the dtype of the feature maps.
    Under bf16 autocast that dtype is bfloat16, whose 8-bit mantissa puts anchor
    corners several pixels off at 1024 px, and the cached cell anchors stay
    bfloat16 for later float32 calls. Box coordinates stay float32 here.
    """

    def set_cell_anchors(self, dtype: torch.dtype, device: torch.device):
        super().set_cell_anchors(torch.float32, device)


def _layer_norm_2d(channels: int) -> nn.Module:
    """detectron2's "LN" for NCHW maps (normalize over channels, eps 1e-6)."""
    return LayerNorm2d(channels, eps=1e-6)


def box_regression_loss(pred: torch.Tensor, target: torch.Tensor, beta: float) -> torch.Tensor:
    """Summed smooth-L1 loss; ``beta < 1e-5`` is plain L1 (as detectron2).

    Args:
        pred, target: (N, 4) box deltas.
        beta: smooth-L1 transition point.
    Returns:
        scalar sum over all elements.
    """
    if beta < 1e-5:
        return F.l1_loss(pred, target, reduction="sum")
    return F.smooth_l1_loss(pred, target, beta=beta, reduction="sum")


class AlignedMultiScaleRoIAlign(MultiScaleRoIAlign):
    """Multi-level RoIAlign with ``aligned=True`` (pixel-model half-pixel shift).

    torchvision's ``MultiScaleRoIAlign`` always calls ``roi_align`` with
    ``aligned=False``; detectron2's ViTDet uses ``ROIAlignV2`` (aligned). Level
    assignment is the same (canonical box 224 at level 4, FPN paper eq. 1);
    scales come from the given strides instead of being inferred.
    """

    def __init__(
        self,
        featmap_names: List[str],
        output_size: int,
        sampling_ratio: int,
        featmap_strides: Sequence[int],
        aligned: bool = True,
        canonical_scale: int = 224,
        canonical_level: int = 4,
    ):
        """
        Args:
            featmap_names: pyramid levels to pool from, finest first ("p2" .. "p5").
            output_size: side of the pooled (C, S, S) features.
            sampling_ratio: sampling points per bin side; 0 = adaptive.
            featmap_strides: stride of each level (4, 8, 16, 32), powers of 2.
            aligned: shift box coordinates by -0.5 pixel (detectron2 ``ROIAlignV2``).
            canonical_scale, canonical_level: level mapping (box of side 224 -> level 4).
        """
        super().__init__(
            featmap_names,
            output_size,
            sampling_ratio,
            canonical_scale=canonical_scale,
            canonical_level=canonical_level,
        )
        if len(featmap_strides) != len(featmap_names):
            raise ValueError("featmap_strides must have one stride per featmap name")
        levels = [int(round(torch.log2(torch.tensor(float(s))).item())) for s in featmap_strides]
        self.aligned = aligned
        self.scales = [1.0 / s for s in featmap_strides]
        self.map_levels = LevelMapper(levels[0], levels[-1], canonical_scale, canonical_level)

    def forward(
        self,
        x: Dict[str, torch.Tensor],
        boxes: List[torch.Tensor],
        image_shapes: List[Tuple[int, int]],
    ) -> torch.Tensor:
        """
        Args:
            x: feature maps by name, (B, C, H_l, W_l).
            boxes: per image (N_i, 4) xyxy boxes in input-image pixels.
            image_shapes: unused (scales are fixed by the strides).
        Returns:
            (sum N_i, C, S, S) pooled features, in the order of ``boxes``.
        """
        feats = [x[name] for name in self.featmap_names]
        concat = torch.cat(boxes, dim=0)
        ids = torch.cat(
            [torch.full((b.shape[0], 1), i, dtype=concat.dtype, device=concat.device) for i, b in enumerate(boxes)],
            dim=0,
        )
        rois = torch.cat([ids, concat], dim=1)
        if len(feats) == 1:
            return roi_align(
                feats[0], rois, self.output_size, self.scales[0], self.sampling_ratio, self.aligned
            )
        levels = self.map_levels(boxes)
        result = feats[0].new_zeros((rois.shape[0], feats[0].shape[1]) + tuple(self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            pooled = roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio, self.aligned)
            result[idx] = pooled.to(result.dtype)
        return result


class ViTDetRPN(RegionProposalNetwork):
    """torchvision RPN with a configurable smooth-L1 beta (detectron2 ViTDet: 0, i.e. L1)."""

    def __init__(self, *args, smooth_l1_beta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = smooth_l1_beta

    def compute_loss(
        self,
        objectness: torch.Tensor,
        pred_bbox_deltas: torch.Tensor,
        labels: List[torch.Tensor],
        regression_targets: List[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Same sampling and normalization as torchvision; box loss L1 (beta 0) by default."""
        sampled_pos_inds, sampled_neg_inds = self.fg_bg_sampler(labels)
        sampled_pos_inds = torch.where(torch.cat(sampled_pos_inds, dim=0))[0]
        sampled_neg_inds = torch.where(torch.cat(sampled_neg_inds, dim=0))[0]
        sampled_inds = torch.cat([sampled_pos_inds, sampled_neg_inds], dim=0)
        objectness = objectness.flatten()
        labels = torch.cat(labels, dim=0)
        regression_targets = torch.cat(regression_targets, dim=0)
        box_loss = box_regression_loss(
            pred_bbox_deltas[sampled_pos_inds], regression_targets[sampled_pos_inds], self.smooth_l1_beta
        ) / max(sampled_inds.numel(), 1)
        objectness_loss = F.binary_cross_entropy_with_logits(objectness[sampled_inds], labels[sampled_inds])
        return objectness_loss, box_loss


def _mask_targets(
    gt_masks: torch.Tensor, boxes: torch.Tensor, matched_idxs: torch.Tensor, size: int
) -> torch.Tensor:
    """Crop each matched gt mask to its proposal box and resize to (size, size).

    Aligned RoIAlign, then binarized at 0.5 (detectron2 ``BitMasks.crop_and_resize``).

    Args:
        gt_masks: (G, H, W) masks of one image.
        boxes: (P, 4) positive proposals.
        matched_idxs: (P,) index of the matched gt for each proposal.
        size: mask head resolution M.
    Returns:
        (P, M, M) float {0, 1} targets.
    """
    rois = torch.cat([matched_idxs[:, None].to(boxes), boxes], dim=1)
    out = roi_align(gt_masks[:, None].to(boxes), rois, (size, size), 1.0, 0, True)[:, 0]
    return (out >= 0.5).to(boxes.dtype)


class ViTDetRoIHeads(RoIHeads):
    """torchvision RoIHeads with detectron2's training losses (box + mask only).

    Inference is torchvision's. In training, the box regression loss uses a
    configurable smooth-L1 beta (ViTDet: 0 = L1, torchvision hard-codes 1/9),
    normalized by the number of sampled RoIs as in both libraries, and the mask
    targets are cropped with aligned RoIAlign and binarized at 0.5 as in
    detectron2 (torchvision: unaligned, soft targets). Keypoint heads are not
    supported.
    """

    def __init__(self, *args, smooth_l1_beta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = smooth_l1_beta

    def forward(
        self,
        features: Dict[str, torch.Tensor],
        proposals: List[torch.Tensor],
        image_shapes: List[Tuple[int, int]],
        targets: Optional[List[Dict[str, torch.Tensor]]] = None,
    ):
        if not self.training:
            return super().forward(features, proposals, image_shapes, targets)
        if self.has_keypoint():
            raise NotImplementedError("ViTDetRoIHeads does not support keypoint heads")
        if targets is None:
            raise ValueError("targets are required in training mode")
        for t in targets:
            if t["boxes"].dtype not in (torch.float, torch.double, torch.half):
                raise TypeError(f"target boxes must be of float type, got {t['boxes'].dtype}")
            if t["labels"].dtype != torch.int64:
                raise TypeError(f"target labels must be of int64 type, got {t['labels'].dtype}")

        proposals, matched_idxs, labels, regression_targets = self.select_training_samples(proposals, targets)
        box_features = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression = self.box_predictor(box_features)

        all_labels = torch.cat(labels, dim=0)
        all_targets = torch.cat(regression_targets, dim=0)
        loss_classifier = F.cross_entropy(class_logits, all_labels)
        pos = torch.where(all_labels > 0)[0]
        box_regression = box_regression.reshape(class_logits.shape[0], -1, 4)
        loss_box_reg = box_regression_loss(
            box_regression[pos, all_labels[pos]], all_targets[pos], self.smooth_l1_beta
        ) / max(all_labels.numel(), 1)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

        if self.has_mask():
            mask_proposals, pos_matched_idxs = [], []
            for img_id in range(len(proposals)):
                p = torch.where(labels[img_id] > 0)[0]
                mask_proposals.append(proposals[img_id][p])
                pos_matched_idxs.append(matched_idxs[img_id][p])
            mask_features = self.mask_head(self.mask_roi_pool(features, mask_proposals, image_shapes))
            mask_logits = self.mask_predictor(mask_features)
            size = mask_logits.shape[-1]
            gt_labels = torch.cat([t["labels"][i] for t, i in zip(targets, pos_matched_idxs)], dim=0)
            mask_targets = torch.cat(
                [
                    _mask_targets(t["masks"], b, i, size)
                    for t, b, i in zip(targets, mask_proposals, pos_matched_idxs)
                ],
                dim=0,
            )
            if mask_targets.numel() == 0:
                loss_mask = mask_logits.sum() * 0
            else:
                logits = mask_logits[torch.arange(gt_labels.shape[0], device=gt_labels.device), gt_labels]
                loss_mask = F.binary_cross_entropy_with_logits(logits, mask_targets.to(logits.dtype))
            losses["loss_mask"] = loss_mask
        return [], losses


def _init_detectron2_style(box_head: nn.Module, box_predictor: FastRCNNPredictor, mask_predictor: nn.Module) -> None:
    """Initializations of detectron2's FastRCNNConvFCHead / FastRCNNOutputLayers / mask head."""
    for m in box_head.modules():
        if isinstance(m, nn.Linear):  # c2_xavier_fill
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)
    nn.init.normal_(box_predictor.cls_score.weight, std=0.01)
    nn.init.normal_(box_predictor.bbox_pred.weight, std=0.001)
    nn.init.zeros_(box_predictor.cls_score.bias)
    nn.init.zeros_(box_predictor.bbox_pred.bias)
    nn.init.zeros_(mask_predictor.conv5_mask.bias)  # weight: kaiming normal fan_out (c2_msra_fill)
    nn.init.normal_(mask_predictor.mask_fcn_logits.weight, std=0.001)
    nn.init.zeros_(mask_predictor.mask_fcn_logits.bias)


def build_vitdet_mask_rcnn(
    num_classes: int,
    vit_kwargs: Optional[dict] = None,
    pyramid_out_channels: int = 256,
    pyramid_scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
    square_pad: Optional[int] = None,
    min_size: int = 1024,
    max_size: int = 1024,
    size_divisible: int = 64,
    train_resize: bool = False,
    image_mean: Sequence[float] = IMAGENET_MEAN,
    image_std: Sequence[float] = IMAGENET_STD,
    anchor_sizes: Sequence[int] = (32, 64, 128, 256, 512),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_conv_depth: int = 2,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 1000,
    rpn_post_nms_top_n_train: int = 1000,
    rpn_post_nms_top_n_test: int = 1000,
    rpn_nms_thresh: float = 0.7,
    rpn_fg_iou_thresh: float = 0.7,
    rpn_bg_iou_thresh: float = 0.3,
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    box_fg_iou_thresh: float = 0.5,
    box_bg_iou_thresh: float = 0.5,
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    bbox_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
    box_head_conv_dims: Sequence[int] = (256, 256, 256, 256),
    box_head_fc_dim: int = 1024,
    mask_head_conv_dims: Sequence[int] = (256, 256, 256, 256),
    roi_aligned: bool = True,
    rpn_smooth_l1_beta: float = 0.0,
    roi_smooth_l1_beta: float = 0.0,
) -> MaskRCNN:
    """Mask R-CNN with a ViTDet backbone (ViT + simple feature pyramid).

    Args:
        num_classes: K foreground classes; the model predicts K + 1 (0 = background),
            so dataset labels are 1..K.
        vit_kwargs: keyword arguments of :class:`ViT` (e.g. ``VIT_PRESETS["vit_base"]``
            plus overrides). ``img_size`` defaults to ``max_size``.
        pyramid_out_channels: channels of p2..p6.
        pyramid_scale_factors: see :class:`SimpleFeaturePyramid`.
        square_pad: pad every batch to a square of this side inside the backbone
            (ViTDet pads to 1024); None = ``max_size``; 0 = off.
        min_size, max_size: test-time resize of ``GeneralizedRCNNTransform``
            (ViTDet: 1024 / 1024, i.e. longer side 1024).
        size_divisible: batch padding multiple; must be a multiple of the
            pyramid's coarsest stride (64).
        train_resize: resize training images in the model like at test time.
            False (ViTDet): training images are used at the size given, the
            data pipeline does large-scale jitter (torchvision ``_skip_resize``).
        image_mean, image_std: normalization of [0, 1] RGB inputs.
        anchor_sizes: one anchor side per pyramid level p2..p6.
        aspect_ratios: anchor aspect ratios (same on every level).
        rpn_conv_depth: 3x3 convs in the RPN head (ViTDet: 2).
        rpn_pre_nms_top_n_train/test: proposals per level kept before NMS.
        rpn_post_nms_top_n_train/test: proposals per image kept after NMS.
        rpn_nms_thresh, rpn_fg_iou_thresh, rpn_bg_iou_thresh,
        rpn_batch_size_per_image, rpn_positive_fraction: RPN matching / sampling.
        box_score_thresh, box_nms_thresh, box_detections_per_img: inference.
        box_fg_iou_thresh, box_bg_iou_thresh, box_batch_size_per_image,
        box_positive_fraction: RoI matching / sampling.
        bbox_reg_weights: box coder weights of the RoI head.
        box_head_conv_dims: 3x3 conv (+LN +ReLU) widths of the box head.
        box_head_fc_dim: width of the box head's fc layer.
        mask_head_conv_dims: 3x3 conv (+LN +ReLU) widths of the mask head.
        roi_aligned: RoIAlign ``aligned=True`` (detectron2 ROIAlignV2).
        rpn_smooth_l1_beta, roi_smooth_l1_beta: box loss beta; 0 = L1 (ViTDet).
    Returns:
        ``torchvision.models.detection.MaskRCNN``; ``model.backbone.net`` is the ViT.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1 (foreground classes), got {num_classes}")
    vit_kwargs = dict(vit_kwargs or {})
    vit_kwargs.setdefault("img_size", max_size)
    if square_pad is None:
        square_pad = max_size
    vit = ViT(**vit_kwargs)
    backbone = SimpleFeaturePyramid(
        vit,
        in_feature="last_feat",
        out_channels=pyramid_out_channels,
        scale_factors=pyramid_scale_factors,
        top_block=True,
        norm="LN",
        square_pad=square_pad,
    )
    if size_divisible % backbone.size_divisibility:
        raise ValueError(
            f"size_divisible={size_divisible} must be a multiple of {backbone.size_divisibility}"
        )
    levels = list(backbone._out_features)
    if len(anchor_sizes) != len(levels):
        raise ValueError(f"anchor_sizes needs one size per level {levels}, got {tuple(anchor_sizes)}")
    roi_levels = [name for name in levels if name != levels[-1]]  # p2..p5 (not the top block)
    roi_strides = [backbone._out_feature_strides[n] for n in roi_levels]

    anchor_generator = Float32AnchorGenerator(
        sizes=tuple((int(s),) for s in anchor_sizes),
        aspect_ratios=(tuple(float(r) for r in aspect_ratios),) * len(levels),
    )
    rpn_head = RPNHead(
        pyramid_out_channels, anchor_generator.num_anchors_per_location()[0], conv_depth=rpn_conv_depth
    )
    box_roi_pool = AlignedMultiScaleRoIAlign(roi_levels, 7, 0, roi_strides, aligned=roi_aligned)
    mask_roi_pool = AlignedMultiScaleRoIAlign(roi_levels, 14, 0, roi_strides, aligned=roi_aligned)
    box_head = FastRCNNConvFCHead(
        (pyramid_out_channels, 7, 7), list(box_head_conv_dims), [box_head_fc_dim], norm_layer=_layer_norm_2d
    )
    box_predictor = FastRCNNPredictor(box_head_fc_dim, num_classes + 1)
    mask_head = MaskRCNNHeads(pyramid_out_channels, list(mask_head_conv_dims), 1, norm_layer=_layer_norm_2d)
    mask_dim = list(mask_head_conv_dims)[-1]
    mask_predictor = MaskRCNNPredictor(mask_dim, mask_dim, num_classes + 1)
    _init_detectron2_style(box_head, box_predictor, mask_predictor)

    model = MaskRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        image_mean=list(image_mean),
        image_std=list(image_std),
        size_divisible=size_divisible,
        _skip_resize=not train_resize,
        rpn_anchor_generator=anchor_generator,
        rpn_head=rpn_head,
        box_roi_pool=box_roi_pool,
        box_head=box_head,
        box_predictor=box_predictor,
        mask_roi_pool=mask_roi_pool,
        mask_head=mask_head,
        mask_predictor=mask_predictor,
    )
    # Replace RPN / RoI heads by the subclasses with detectron2's losses (same submodules).
    model.rpn = ViTDetRPN(
        anchor_generator,
        rpn_head,
        rpn_fg_iou_thresh,
        rpn_bg_iou_thresh,
        rpn_batch_size_per_image,
        rpn_positive_fraction,
        dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
        dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test),
        rpn_nms_thresh,
        score_thresh=0.0,
        smooth_l1_beta=rpn_smooth_l1_beta,
    )
    model.roi_heads = ViTDetRoIHeads(
        box_roi_pool,
        box_head,
        box_predictor,
        box_fg_iou_thresh,
        box_bg_iou_thresh,
        box_batch_size_per_image,
        box_positive_fraction,
        tuple(bbox_reg_weights),
        box_score_thresh,
        box_nms_thresh,
        box_detections_per_img,
        mask_roi_pool=mask_roi_pool,
        mask_head=mask_head,
        mask_predictor=mask_predictor,
        smooth_l1_beta=roi_smooth_l1_beta,
    )
    return model
