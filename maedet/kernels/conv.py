"""Convolution layouts and fused 1 x 1 convolutions: fast paths beside their references."""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn

from maedet.kernels import fast_enabled

__all__ = ["conv_layout", "pointwise_convs"]


def conv_layout(x: torch.Tensor, training: bool, rois: bool = False) -> torch.Tensor:
    """``x`` in the memory layout the convolutions that follow run fastest in.

    Fast path: CPU inference in channels-last; CPU training in channels-last for
    batches of RoI features (``rois``: small maps, many of them) and NCHW for feature
    maps (the CPU weight gradient of a 3 x 3 convolution on a large map is much slower
    in channels-last); other devices NCHW. Reference: NCHW.
    """
    if not fast_enabled():
        return x.contiguous()
    if x.device.type == "cpu" and x.dim() == 4 and (rois or not training):
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def pointwise_convs(x: torch.Tensor, convs: Sequence[nn.Conv2d]) -> List[torch.Tensor]:
    """Several 1 x 1 convolutions of one input, as one matrix product.

    The same numbers as ``[c(x) for c in convs]`` up to float rounding, but the input
    is read once and, in training, its gradient is one product instead of a sum of
    one per convolution (on a CPU the 1 x 1 convolution is also slower than the plain
    product). Works on NCHW and channels-last inputs; the outputs are channel slices
    of one tensor in the input's layout. Reference: ``[c(x) for c in convs]``.
    """
    for c in convs:
        if c.kernel_size != (1, 1) or c.stride != (1, 1) or c.padding != (0, 0) or c.groups != 1:
            raise ValueError(f"pointwise_convs takes plain 1 x 1 convolutions, got {c}")
    if not fast_enabled():
        return [c(x) for c in convs]
    B, C, H, W = x.shape
    weight = torch.cat([c.weight.reshape(c.out_channels, C) for c in convs])
    biases = [c.bias if c.bias is not None else c.weight.new_zeros(c.out_channels) for c in convs]
    bias = torch.cat(biases).to(x.dtype)
    weight = weight.to(x.dtype)
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = torch.addmm(bias, x.permute(0, 2, 3, 1).reshape(B * H * W, C), weight.t())
        y = y.view(B, H, W, -1).permute(0, 3, 1, 2)
    elif B == 1:
        y = torch.addmm(bias[:, None], weight, x.reshape(C, H * W)).view(1, -1, H, W)
    else:
        y = (torch.matmul(weight, x.reshape(B, C, H * W)) + bias[:, None]).view(B, -1, H, W)
    return list(y.split([c.out_channels for c in convs], dim=1))
