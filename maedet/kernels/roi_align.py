"""RoIAlign: torchvision's (the reference) and its threaded CPU fast path."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Tuple

import torch
from torchvision import ops

from maedet.kernels import fast_enabled

__all__ = ["roi_align"]

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
    gradient) element is computed by the same code from the same numbers. The
    kernels release the GIL.
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


def roi_align(
    feat: torch.Tensor,
    rois: torch.Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> torch.Tensor:
    """``torchvision.ops.roi_align(feat, rois, ...)`` (``rois``: (K, 5) batch index + XYXY).

    Fast path: the same values, with the channels split over torch's intra-op threads
    on CPU. It falls back to torchvision where threads cannot help (other devices, one
    thread, small calls, TorchScript, tracing, torch.compile) and for non-float32 maps
    outside autocast (torchvision then computes in their dtype).
    """
    threads = min(torch.get_num_threads(), feat.shape[1])
    if (
        not fast_enabled()
        or torch.jit.is_scripting()
        or torch.jit.is_tracing()  # tracers and compilers follow this thread only
        or torch.compiler.is_compiling()
        or feat.device.type != "cpu"
        or threads < 2
        or feat.is_quantized
        or (feat.dtype != torch.float32 and not torch.is_autocast_enabled("cpu"))
        or rois.shape[0] * feat.shape[1] * output_size[0] * output_size[1] < _MIN_THREADED_OUTPUT
    ):
        return ops.roi_align(feat, rois, output_size, spatial_scale, sampling_ratio, aligned)
    C = feat.shape[1]
    slices = [C // threads + (i < C % threads) for i in range(threads)]
    return _ThreadedRoIAlign.apply(feat, rois, spatial_scale, tuple(output_size), sampling_ratio, aligned, slices)
