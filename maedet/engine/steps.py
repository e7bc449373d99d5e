"""The loss of one batch for each task: what the trainer and the benchmark tool run."""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import torch
from torch import nn

from maedet.models.mae import masking_noise

__all__ = ["detection_loss", "mae_loss_fn", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP and ``torch.compile`` wrappers."""
    while isinstance(model, nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


def detection_loss(
    model: nn.Module, batch: Tuple[List[torch.Tensor], List[dict], torch.Tensor], device: torch.device
) -> Dict[str, torch.Tensor]:
    """batch = (uint8 images, targets, seeds) from the detection loader -> the detector's losses."""
    images, targets, _ = batch
    images = [img.to(device, non_blocking=True) for img in images]
    keys = ("boxes", "labels", "masks")  # no masks in box-only data
    targets = [{k: t[k].to(device) for k in keys if k in t} for t in targets]
    return model(images, targets)


def mae_loss_fn(mask_ratio: float) -> Callable[[nn.Module, object, torch.device], Dict[str, torch.Tensor]]:
    """Loss closure for MAE batches ``(images (B, 3, S, S), seeds (B,))``; the masking noise of
    each sample comes from its own seed, so a sample's mask does not depend on the batch
    layout or the process."""

    def loss_fn(
        model: nn.Module, batch: Tuple[torch.Tensor, torch.Tensor], device: torch.device
    ) -> Dict[str, torch.Tensor]:
        images, seeds = batch
        images = images.to(device, non_blocking=True)
        noise = masking_noise(seeds.tolist(), unwrap_model(model).num_patches, device=device)
        loss, _, _ = model(images, mask_ratio=mask_ratio, noise=noise)
        return {"loss_mae": loss}

    return loss_fn
