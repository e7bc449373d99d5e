"""LayerNorm over the channels of an NCHW map: detectron2's formula and the fast path."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maedet.kernels import fast_enabled

__all__ = ["channel_layer_norm", "channel_layer_norm_reference"]


def channel_layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """detectron2's ``LayerNorm`` (``layers/batch_norm.py``), written out."""
    u = x.mean(1, keepdim=True)
    s = (x - u).pow(2).mean(1, keepdim=True)
    x = (x - u) / torch.sqrt(s + eps)
    return weight[:, None, None] * x + bias[:, None, None]


class _ChannelLayerNorm(torch.autograd.Function):
    """LayerNorm over dim 1 of an (N, C, H, W) map, computed where the map lies.

    The obvious ``F.layer_norm(x.permute(0, 2, 3, 1))`` leaves its output (and so
    the next convolution's input and gradients) in channels-last strides, and the
    CPU convolution backward in that layout is much slower than in NCHW; making it
    contiguous costs two copies each way. This
    keeps the input's layout, reads it in few passes (``var_mean``, one
    normalize, one ``addcmul``), saves only the normalized map and ``1 / std``,
    and computes in float32 (as ``F.layer_norm`` does under autocast).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.in_dtype = x.dtype
        dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
        x = x.to(dtype)
        # Two passes (mean, then the mean square of x - mean): on NCHW maps faster than
        # ``var_mean`` over dim 1.
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


def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over dim 1 of an (N, C, H, W) map; the output keeps the input's memory layout.

    Fast path: with autograd recording, :class:`_ChannelLayerNorm` (detectron2's
    arithmetic in float32 with its own backward); inference on channels-last maps uses
    ``F.layer_norm`` on the (N, H, W, C) view, where the channels are the innermost axis.
    """
    if not fast_enabled():
        return channel_layer_norm_reference(x, weight, bias, eps)
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    if channels_last and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        dtype = torch.promote_types(torch.promote_types(x.dtype, weight.dtype), torch.float32)
        y = F.layer_norm(x.permute(0, 2, 3, 1).to(dtype), (x.shape[1],), weight.to(dtype), bias.to(dtype), eps)
        return y.permute(0, 3, 1, 2)
    return _ChannelLayerNorm.apply(x, weight, bias, eps)
