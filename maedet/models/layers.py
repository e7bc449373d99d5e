"""Small layers shared by the detection parts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "ShapeSpec",
    "LayerNorm2d",
    "ConvNorm2d",
    "get_norm",
    "conv_layout",
    "pointwise_convs",
    "shared_channels",
    "check_fractions",
    "check_positive",
]


@dataclass(frozen=True)
class ShapeSpec:
    """What a feature map is: its channels and its stride (input pixels per cell)."""

    channels: int
    stride: int


class _ChannelLayerNorm(torch.autograd.Function):
    """LayerNorm over dim 1 of an (N, C, H, W) map, computed where the map lies.

    The obvious ``F.layer_norm(x.permute(0, 2, 3, 1))`` leaves its output (and so
    the next convolution's input and gradients) in channels-last strides, and the
    CPU convolution backward in that layout is more than twice as slow as in NCHW
    (a conv + LN stack at 256 x 256: 7.4 s against 2.9 s backward,
    docs/BENCHMARKS.md); making it contiguous costs two copies each way. This
    keeps the input's layout, reads it in few passes (``var_mean``, one
    normalize, one ``addcmul``), saves only the normalized map and ``1 / std``,
    and computes in float32 (as ``F.layer_norm`` does under autocast).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.in_dtype = x.dtype
        dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
        x = x.to(dtype)
        # Two passes (mean, then the mean square of x - mean): on NCHW maps this is
        # 3-4x faster than ``var_mean`` over dim 1 ([512, 256, 7, 7]: 8.7 against 36.7 ms).
        xc = x - x.mean(1, keepdim=True)
        rstd = xc.square().mean(1, keepdim=True).add_(eps).rsqrt_()
        xhat = xc.mul_(rstd)
        w, b = weight.to(dtype)[:, None, None], bias.to(dtype)[:, None, None]
        ctx.save_for_backward(xhat, w, rstd)
        return torch.addcmul(b, xhat, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xhat, w, rstd = ctx.saved_tensors
        grad = grad.to(xhat.dtype)
        dw = (grad * xhat).sum((0, 2, 3)) if ctx.needs_input_grad[1] else None
        db = grad.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            # d xhat = g w;  dx = rstd (d xhat - mean_c(d xhat) - xhat mean_c(d xhat * xhat))
            dxhat = grad * w
            m1 = dxhat.mean(1, keepdim=True)
            m2 = (dxhat * xhat).mean(1, keepdim=True)
            dx = dxhat.sub_(m1).sub_(xhat * m2).mul_(rstd).to(ctx.in_dtype)
        return dx, dw, db, None


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of an NCHW map (detectron2's ``LayerNorm``, eps 1e-6).

    Deliberately not a ``torch.nn.LayerNorm`` subclass: detectron2's ViTDet recipe
    exempts ``torch.nn`` normalization layers from weight decay, and its
    channels-first LayerNorm (pyramid, heads) is not one of them, so this layer
    keeps weight decay under the same rule (:func:`maedet.engine.optim.param_groups`).
    The output keeps the input's memory layout. Training (autograd recording) always
    runs :class:`_ChannelLayerNorm`, detectron2's arithmetic: in the RoI heads of a
    tiny model, channels with almost no variance turn the rounding of another kernel
    into a 3% difference in the pyramid's gradient. Inference on channels-last maps
    uses ``F.layer_norm`` on the (N, H, W, C) view, which is many times faster there.
    """

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if channels_last and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            # Channels-last inference: the channels are the innermost axis, where
            # torch's own layer norm is 5-20x faster than reducing over dim 1
            # ([1000, 256, 7, 7]: 3.2 against 64 ms). Float32 at least, as below.
            dtype = torch.promote_types(torch.promote_types(x.dtype, self.weight.dtype), torch.float32)
            w, b = self.weight.to(dtype), self.bias.to(dtype)
            y = F.layer_norm(x.permute(0, 2, 3, 1).to(dtype), (x.shape[1],), w, b, self.eps)
            return y.permute(0, 3, 1, 2)
        return _ChannelLayerNorm.apply(x, self.weight, self.bias, self.eps)


def check_fractions(**values: float) -> None:
    """Raise ValueError naming the first value outside [0, 1] (thresholds, fractions)."""
    for name, v in values.items():
        if not 0.0 <= float(v) <= 1.0:
            raise ValueError(f"{name}={v} is outside the allowed range [0, 1]")


def check_positive(**values: int) -> None:
    """Raise ValueError naming the first count below 1 (top-k, batch sizes)."""
    for name, v in values.items():
        if int(v) < 1:
            raise ValueError(f"{name}={v} must be >= 1")


def shared_channels(input_shape: Dict[str, ShapeSpec], in_features: Sequence[str], what: str) -> int:
    """The channel count of the ``in_features`` maps a head reads (they must exist and agree).

    Raises:
        ValueError: a feature the neck does not output, or levels of different widths
            (``what`` names the head in the message).
    """
    missing = [f for f in in_features if f not in input_shape]
    if missing:
        raise ValueError(f"{what} in_features {missing} are not among the neck's outputs {list(input_shape)}")
    channels = {input_shape[f].channels for f in in_features}
    if len(channels) != 1:
        raise ValueError(f"{what} levels must have equal channels, got {sorted(channels)}")
    return channels.pop()


def conv_layout(x: torch.Tensor, training: bool, rois: bool = False) -> torch.Tensor:
    """``x`` in the memory layout the convolutions that follow run fastest in.

    CPU inference: channels-last (ViT-B at 1024 on 2 cores: pyramid + RPN head
    2.85 -> 2.43 s, box head on 1000 RoIs 2.21 -> 1.76 s, mask head on 100 RoIs
    1.10 -> 0.74 s; docs/BENCHMARKS.md). CPU training: channels-last for batches of
    RoI features (``rois``: the box head's 3 x 3 convolutions on 512 RoIs of 7 x 7
    run forward in 155 instead of 230 ms, backward as fast), NCHW for feature maps,
    since the CPU weight gradient of a 3 x 3 convolution on a large map is about
    5x slower in channels-last (256 x 256 map: 3.05 s against 0.59 s). Other
    devices: NCHW.
    """
    if x.device.type == "cpu" and x.dim() == 4 and (rois or not training):
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def pointwise_convs(x: torch.Tensor, convs: Sequence[nn.Conv2d]) -> List[torch.Tensor]:
    """Several 1 x 1 convolutions of one input, as one matrix product.

    The same numbers as ``[c(x) for c in convs]`` up to float rounding, but the input
    is read once and, in training, its gradient is one product instead of a sum of
    one per convolution. On a CPU the 1 x 1 convolution is also slower than the
    plain product: the RPN's two predictors on a 256 x 256 x 256 map, forward and
    backward, 0.42 s as convolutions, 0.11 s as one product (docs/BENCHMARKS.md).
    Works on NCHW and channels-last inputs; the outputs are channel slices of one
    tensor in the input's layout.
    """
    for c in convs:
        if c.kernel_size != (1, 1) or c.stride != (1, 1) or c.padding != (0, 0) or c.groups != 1:
            raise ValueError(f"pointwise_convs takes plain 1 x 1 convolutions, got {c}")
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


def get_norm(norm: str, channels: int) -> Optional[nn.Module]:
    """Normalization of NCHW maps by name: "LN" (:class:`LayerNorm2d`) or "" (none)."""
    if norm == "LN":
        return LayerNorm2d(channels)
    if norm in ("", None):
        return None
    raise ValueError(f"unsupported norm {norm!r}; use 'LN' or ''")


class ConvNorm2d(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional norm stored as ``.norm`` (detectron2's
    ``layers.Conv2d``), so parameters are named ``weight``, ``bias``, ``norm.weight``."""

    def __init__(self, *args, norm: Optional[nn.Module] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._conv_forward(x, self.weight, self.bias)
        if self.norm is not None:
            x = self.norm(x)
        return x
