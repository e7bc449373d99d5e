"""Run a detector over a dataset and score it with an evaluator."""

from __future__ import annotations

import logging
import time
from typing import Dict, Iterable, Optional

import torch
from torch import nn

from maedet.evaluation.coco import COCOEvaluator
from maedet.utils import distributed as du
from maedet.utils.amp import autocast

__all__ = ["inference_on_dataset"]

logger = logging.getLogger("maedet")


@torch.no_grad()
def inference_on_dataset(
    model: nn.Module,
    loader: Iterable,
    evaluator: COCOEvaluator,
    device: torch.device,
    amp_dtype: Optional[torch.dtype] = None,
) -> Dict[str, Dict[str, float]]:
    """Run ``model`` over this rank's share of ``loader`` and score with ``evaluator`` (results on rank 0).

    Args:
        model: a detector taking ``(images, output_sizes=...)`` (see :class:`maedet.models.detectors.GeneralizedRCNN`).
        loader: batches ``(images, targets)``; each target has ``image_id`` and ``orig_size``.
        evaluator: reset here, then fed every batch.
        device: where the model runs.
        amp_dtype: autocast dtype (None: full precision); decoding, NMS and pasting stay float32.
    """
    was_training = model.training
    model.eval()
    evaluator.reset()
    n, t0 = 0, time.perf_counter()
    total = len(loader) if hasattr(loader, "__len__") else None
    for i, (images, targets) in enumerate(loader):
        sizes = [tuple(int(v) for v in t["orig_size"]) for t in targets]
        with autocast(device, amp_dtype):
            outputs = model([img.to(device, non_blocking=True) for img in images], output_sizes=sizes)
        outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
        evaluator.process([t["image_id"] for t in targets], outputs, orig_sizes=sizes)
        n += len(images)
        if du.is_main_process() and (i + 1) % 20 == 0:
            rate = n / (time.perf_counter() - t0)
            logger.info(f"inference {i + 1}/{total or '?'} batches, {rate:.2f} img/s")
    logger.info(f"inference on {n} images (rank {du.get_rank()}) took {time.perf_counter() - t0:.1f}s")
    results = evaluator.evaluate()
    model.train(was_training)
    return results
