"""``DistributedDataParallel`` with maedet's communication settings (the one place DDP is set up)."""

from __future__ import annotations

from typing import Any

import torch

from maedet.utils.errors import ConfigError

__all__ = ["GRAD_COMPRESSIONS", "check_grad_compression", "wrap_ddp"]

GRAD_COMPRESSIONS = ("none", "bf16", "fp16")


def check_grad_compression(mode: str) -> str:
    """``mode`` if it is a known ``train.ddp_grad_compression`` value, else a ConfigError."""
    if mode not in GRAD_COMPRESSIONS:
        raise ConfigError(f"train.ddp_grad_compression must be none, bf16 or fp16, got '{mode}'")
    return mode


def wrap_ddp(
    model: torch.nn.Module,
    device: torch.device,
    grad_compression: str = "none",
    bucket_view: bool = True,
    **kwargs: Any,
) -> torch.nn.Module:
    """``model`` in ``DistributedDataParallel``.

    Args:
        model: module already on ``device``.
        device: this process's device (CUDA: its index becomes ``device_ids``).
        grad_compression: ``none``, or ``bf16`` / ``fp16``: gradients are cast to
            that dtype for the all-reduce (half the bytes) and back (torch's
            ``bf16_compress_hook`` / ``fp16_compress_hook``).
        bucket_view: ``gradient_as_bucket_view``: the ``.grad`` tensors are views
            into the all-reduce buckets, which saves one gradient-sized copy.
        kwargs: further ``DistributedDataParallel`` arguments.
    """
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    check_grad_compression(grad_compression)
    kwargs.setdefault("gradient_as_bucket_view", bool(bucket_view))
    # the detectors' buffers (normalization constants, frozen statistics) never change:
    # no broadcast before every forward (detectron2 sets the same)
    kwargs.setdefault("broadcast_buffers", False)
    if device.type == "cuda":
        kwargs.setdefault("device_ids", [device.index if device.index is not None else 0])
    ddp = DistributedDataParallel(model, **kwargs)
    if grad_compression != "none":
        hook = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}
        ddp.register_comm_hook(None, hook[grad_compression])
    return ddp
