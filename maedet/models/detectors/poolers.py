"""Multi-level RoIAlign as detectron2's ``ROIPooler(pooler_type="ROIAlignV2")``."""

from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
from torch import nn

from maedet.kernels.conv import conv_layout
from maedet.kernels.roi_align import roi_align

__all__ = ["MultiLevelRoIAlign", "assign_boxes_to_levels"]


def assign_boxes_to_levels(
    boxes: torch.Tensor, min_level: int, max_level: int, canonical_box_size: float = 224.0, canonical_level: int = 4
) -> torch.Tensor:
    """Pyramid level index (0-based from ``min_level``) of each (N, 4) box (FPN paper, eq. 1).

    ``floor(canonical_level + log2(sqrt(area) / canonical_box_size + 1e-8))``,
    clamped to ``[min_level, max_level]`` (detectron2's formula and epsilon).
    """
    sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    levels = torch.floor(canonical_level + torch.log2(sizes / canonical_box_size + 1e-8))
    return torch.clamp(levels, min=min_level, max=max_level).to(torch.int64) - min_level


class MultiLevelRoIAlign(nn.Module):
    """RoIAlign of boxes from the pyramid level their size selects.

    Args:
        in_features: level names, finest first ("p2" .. "p5").
        strides: stride of each level (powers of 2).
        output_size: side S of the pooled (C, S, S) features.
        sampling_ratio: sampling points per bin side; 0 = adaptive.
        aligned: half-pixel shift (``ROIAlignV2``; detectron2 ViTDet: True).
        canonical_box_size, canonical_level: a box of side 224 pools from level 4.
    """

    def __init__(
        self,
        in_features: Sequence[str],
        strides: Sequence[int],
        output_size: int,
        sampling_ratio: int = 0,
        aligned: bool = True,
        canonical_box_size: float = 224.0,
        canonical_level: int = 4,
    ):
        super().__init__()
        if len(in_features) != len(strides):
            raise ValueError("one stride per pooled level")
        levels = [int(round(math.log2(s))) for s in strides]
        if any(2**lv != s for lv, s in zip(levels, strides)) or levels != list(range(levels[0], levels[-1] + 1)):
            raise ValueError(f"pooled levels must have consecutive power-of-2 strides, got {list(strides)}")
        self.in_features = list(in_features)
        self.scales = [1.0 / s for s in strides]
        self.min_level, self.max_level = levels[0], levels[-1]
        self.output_size = int(output_size)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)
        self.canonical_box_size = float(canonical_box_size)
        self.canonical_level = int(canonical_level)

    def forward(self, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            features: level name -> (B, C, H_l, W_l).
            boxes: per image (N_i, 4) XYXY boxes in input pixels.
        Returns:
            (sum N_i, C, S, S) pooled features, in the order of ``boxes``.
        """
        feats = [features[f] for f in self.in_features]
        concat = torch.cat([b.float() for b in boxes], dim=0)
        ids = torch.cat(
            [torch.full((len(b), 1), i, dtype=torch.float32, device=concat.device) for i, b in enumerate(boxes)], dim=0
        )
        rois = torch.cat([ids, concat], dim=1)
        S = (self.output_size, self.output_size)
        if len(feats) == 1:
            out = roi_align(feats[0], rois, S, self.scales[0], self.sampling_ratio, self.aligned)
            return conv_layout(out, self.training, rois=True)
        levels = assign_boxes_to_levels(
            concat, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        out = None
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.nonzero(levels == level).squeeze(1)
            pooled = roi_align(feat, rois[idx], S, scale, self.sampling_ratio, self.aligned)
            if out is None:
                out = pooled.new_zeros((rois.shape[0], feat.shape[1]) + S)
            out.index_put_((idx,), pooled.to(out.dtype))
        return conv_layout(out, self.training, rois=True)
