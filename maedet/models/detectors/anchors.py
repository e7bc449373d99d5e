"""Anchors exactly as detectron2's ``DefaultAnchorGenerator`` makes them.

Per level, one cell of anchors (one per aspect ratio) centred on (0, 0) with area
``size ** 2``, width ``sqrt(area / ratio)`` and height ``ratio * width`` (kept
fractional; torchvision rounds them to integers), shifted to every cell of the
feature map: anchor ``(y, x, a)`` is ``cell[a] + (x, y, x, y) * stride + offset * stride``,
flattened in (H, W, A) order, the order of the RPN head's outputs. Anchors are
always float32, whatever the autocast dtype of the features.
"""

from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

__all__ = ["DefaultAnchorGenerator", "cell_anchors"]


def cell_anchors(size: float, aspect_ratios: Sequence[float]) -> torch.Tensor:
    """(A, 4) XYXY float32 anchors of one size centred on the origin, one per aspect ratio (h / w)."""
    area = float(size) ** 2
    out = []
    for ratio in aspect_ratios:
        w = math.sqrt(area / ratio)
        h = ratio * w
        out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out, dtype=torch.float32)


class DefaultAnchorGenerator(nn.Module):
    """Anchors for a list of feature maps, one anchor size per level.

    Args:
        sizes: anchor side per level (ViTDet: 32, 64, 128, 256, 512 on p2..p6).
        aspect_ratios: height / width ratios, the same on every level.
        strides: stride of each level in input pixels.
        offset: anchor centre offset in units of the stride (detectron2's ViTDet: 0.0).
    """

    def __init__(
        self, sizes: Sequence[float], aspect_ratios: Sequence[float], strides: Sequence[int], offset: float = 0.0
    ):
        super().__init__()
        if len(sizes) != len(strides):
            raise ValueError(f"one anchor size per level: {len(sizes)} sizes for {len(strides)} levels")
        if not 0.0 <= offset < 1.0:
            raise ValueError(f"anchor offset must be in [0, 1), got {offset}")
        self.sizes = tuple(float(s) for s in sizes)
        self.aspect_ratios = tuple(float(r) for r in aspect_ratios)
        self.strides = tuple(int(s) for s in strides)
        self.offset = float(offset)
        self.cells = [cell_anchors(s, self.aspect_ratios) for s in self.sizes]
        self._cache: Dict[Tuple, List[torch.Tensor]] = {}

    @property
    def num_anchors_per_location(self) -> int:
        return len(self.aspect_ratios)

    def grid_anchors(self, grid_sizes: Sequence[Tuple[int, int]], device: torch.device) -> List[torch.Tensor]:
        """Per level, (H * W * A, 4) float32 anchors for feature maps of the given (H, W)."""
        key = (tuple(tuple(int(v) for v in g) for g in grid_sizes), str(device))
        if key in self._cache:
            return self._cache[key]
        out = []
        for (h, w), stride, cell in zip(grid_sizes, self.strides, self.cells):
            xs = torch.arange(self.offset * stride, w * stride, step=stride, dtype=torch.float32, device=device)
            ys = torch.arange(self.offset * stride, h * stride, step=stride, dtype=torch.float32, device=device)
            shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
            shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
            shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
            out.append((shifts.view(-1, 1, 4) + cell.to(device).view(1, -1, 4)).reshape(-1, 4))
        if len(self._cache) > 16:  # a few input sizes at most in practice
            self._cache.clear()
        self._cache[key] = out
        return out

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """Anchors for feature maps ``(B, C, H_l, W_l)`` (the same for every image)."""
        return self.grid_anchors([tuple(f.shape[-2:]) for f in features], features[0].device)
