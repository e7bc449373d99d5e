"""Multi-level RoIAlign as detectron2's ``ROIPooler(pooler_type="ROIAlignV2")``."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchvision.ops import roi_align

from maedet.models.layers import conv_layout

__all__ = ["MultiLevelRoIAlign", "assign_boxes_to_levels", "roi_align_threaded"]

# Below this many pooled values a call is too small to be worth a thread hand-off.
_MIN_THREADED_OUTPUT = 1 << 16
_executor: Optional[ThreadPoolExecutor] = None
_executor_key: Optional[Tuple[int, int]] = None


def _pool(workers: int) -> ThreadPoolExecutor:
    """The process's RoIAlign threads (made again after a fork or a thread-count change)."""
    global _executor, _executor_key
    key = (os.getpid(), workers)
    if _executor_key != key:
        _executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="maedet-roi-align")
        _executor_key = key
    return _executor


def _on_threads(fn: Callable[[torch.Tensor], torch.Tensor], chunks: List[torch.Tensor]) -> List[torch.Tensor]:
    """``[fn(c) for c in chunks]``, the first chunk on this thread, the others on the pool."""

    def call(c: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return fn(c)

    futures = [_pool(len(chunks) - 1).submit(call, c) for c in chunks[1:]]
    return [call(chunks[0])] + [f.result() for f in futures]


class _ThreadedRoIAlign(torch.autograd.Function):
    """torchvision's RoIAlign kernels on channel slices, one slice per thread.

    The CPU kernels of ``torchvision.ops.roi_align`` run on one thread, forward and
    backward. The channels are independent, so slices of them run side by side and
    their outputs concatenate to the same values, bit for bit: each output (and input
    gradient) element is computed by the same code from the same numbers. ViT-B Mask
    R-CNN at 1024 on 2 cores: box pooler on 512 RoIs, 0.23 -> 0.13 s forward and
    0.75 -> 0.42 s backward (docs/BENCHMARKS.md). The kernels release the GIL.
    Computes in float32, as torchvision's autocast rule for RoIAlign does.
    """

    @staticmethod
    def forward(ctx, feat, rois, spatial_scale, output_size, sampling_ratio, aligned, slices):
        ph, pw = output_size
        rois32 = rois.float().contiguous()
        chunks = [c.float().contiguous() for c in feat.split(slices, dim=1)]
        outs = _on_threads(
            lambda c: torch.ops.torchvision.roi_align(c, rois32, spatial_scale, ph, pw, sampling_ratio, aligned),
            chunks,
        )
        ctx.save_for_backward(rois32)
        ctx.args = (spatial_scale, ph, pw, sampling_ratio, aligned, slices, tuple(feat.shape), feat.dtype)
        return torch.cat(outs, dim=1).to(feat.dtype)

    @staticmethod
    def backward(ctx, grad):
        (rois32,) = ctx.saved_tensors
        spatial_scale, ph, pw, sampling_ratio, aligned, slices, (B, _, H, W), dtype = ctx.args
        chunks = [g.float().contiguous() for g in grad.split(slices, dim=1)]
        outs = _on_threads(
            lambda g: torch.ops.torchvision._roi_align_backward(
                g, rois32, spatial_scale, ph, pw, B, g.shape[1], H, W, sampling_ratio, aligned
            ),
            chunks,
        )
        return torch.cat(outs, dim=1).to(dtype), None, None, None, None, None, None


def roi_align_threaded(
    feat: torch.Tensor,
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """``torchvision.ops.roi_align(feat, rois, ...)`` (``rois``: (K, 5) batch index + XYXY),
    the same values, with the channels split over torch's intra-op threads on CPU.

    Falls back to torchvision where threads cannot help (other devices, one thread,
    small calls, TorchScript, tracing, torch.compile) and for non-float32 maps outside
    autocast (torchvision then computes in their dtype).
    """
    threads = min(torch.get_num_threads(), feat.shape[1])
    if (
        torch.jit.is_scripting()
        or torch.jit.is_tracing()  # tracers and compilers follow this thread only
        or torch.compiler.is_compiling()
        or feat.device.type != "cpu"
        or threads < 2
        or feat.is_quantized
        or (feat.dtype != torch.float32 and not torch.is_autocast_enabled("cpu"))
        or rois.shape[0] * feat.shape[1] * output_size[0] * output_size[1] < _MIN_THREADED_OUTPUT
    ):
        return roi_align(feat, rois, output_size, spatial_scale, sampling_ratio, aligned)
    C = feat.shape[1]
    slices = [C // threads + (i < C % threads) for i in range(threads)]
    return _ThreadedRoIAlign.apply(feat, rois, spatial_scale, tuple(output_size), sampling_ratio, aligned, slices)


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
            out = roi_align_threaded(feats[0], rois, S, self.scales[0], self.sampling_ratio, self.aligned)
            return conv_layout(out, self.training, rois=True)
        levels = assign_boxes_to_levels(
            concat, self.min_level, self.max_level, self.canonical_box_size, self.canonical_level
        )
        out = None
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.nonzero(levels == level).squeeze(1)
            pooled = roi_align_threaded(feat, rois[idx], S, scale, self.sampling_ratio, self.aligned)
            if out is None:
                out = pooled.new_zeros((rois.shape[0], feat.shape[1]) + S)
            out.index_put_((idx,), pooled.to(out.dtype))
        return conv_layout(out, self.training, rois=True)
