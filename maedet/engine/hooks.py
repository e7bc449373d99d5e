"""Trainer hooks: periodic evaluation with the best checkpoint, final weights, MAE reconstruction grids."""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import cv2
import numpy as np
import torch
from torch import nn

from maedet.checkpoint.io import atomic_save
from maedet.engine.trainer import HookBase, Trainer, unwrap_model
from maedet.models.mae import masking_noise
from maedet.utils import distributed as du
from maedet.utils.fileio import atomic_write

__all__ = ["EvalHook", "FinalWeightsHook", "ReconstructionVisHook", "reconstruction_grid"]

logger = logging.getLogger("maedet")

Results = Dict[str, Dict[str, float]]


def _flatten(results: Results) -> Dict[str, float]:
    return {f"{task}/{k}": v for task, metrics in results.items() for k, v in metrics.items()}


class FinalWeightsHook(HookBase):
    """Writes ``output_dir/name`` = ``{"model": weights, "meta": meta}`` when training ends,
    before the hooks after it (the final evaluation) run, so a failing evaluation
    never costs the trained weights."""

    def __init__(
        self,
        output_dir: str,
        meta: Dict[str, Any],
        name: str = "model_final.pth",
        state_fn: Optional[Callable[[nn.Module], Dict[str, torch.Tensor]]] = None,
    ):
        self.path = os.path.join(output_dir, name)
        self.meta = meta
        self.state_fn = state_fn or (lambda m: m.state_dict())

    def after_train(self, trainer: Trainer) -> None:
        if du.is_main_process():
            atomic_save(
                {"model": self.state_fn(unwrap_model(trainer.model)), "meta": {**self.meta, "iter": trainer.iter}},
                self.path,
            )
            logger.info(f"final weights written: {self.path}")
        du.synchronize()


class EvalHook(HookBase):
    """Evaluates every ``period`` iterations and after training; keeps ``model_best.pth``.

    Args:
        period: iterations between evaluations (0: only after training).
        eval_fn: ``eval_fn(model) -> {task: {metric: value}}`` (rank 0; {} elsewhere).
        best_metric: ``task/metric`` that picks ``model_best.pth`` (higher is better).
        output_dir: where ``model_best.pth`` goes.
        meta: stored with the best weights.
    """

    def __init__(
        self,
        period: int,
        eval_fn: Callable[[nn.Module], Results],
        best_metric: str,
        output_dir: str,
        meta: Dict[str, Any],
    ):
        self.period = period
        self.eval_fn = eval_fn
        self.best_metric = best_metric
        self.output_dir = output_dir
        self.meta = meta
        self.best: Optional[float] = None
        self.last_results: Results = {}

    def _run(self, trainer: Trainer) -> None:
        results = self.eval_fn(unwrap_model(trainer.model))
        self.last_results = results
        if not du.is_main_process():
            return
        logger.info(f"evaluation at iteration {trainer.iter} done")
        flat = {k: v for k, v in _flatten(results).items() if v == v}  # drop NaN
        trainer.metrics.write(trainer.iter - 1, flat)
        trainer.metrics.flush()
        value = flat.get(self.best_metric)
        if value is not None and (self.best is None or value > self.best):
            self.best = value
            atomic_save(
                {
                    "model": unwrap_model(trainer.model).state_dict(),
                    "meta": {**self.meta, "iter": trainer.iter, self.best_metric: value},
                },
                os.path.join(self.output_dir, "model_best.pth"),
            )
            logger.info(f"new best {self.best_metric} = {value:.3f}: saved model_best.pth")

    def after_step(self, trainer: Trainer) -> None:
        if self.period > 0 and trainer.iter % self.period == 0 and trainer.iter < trainer.max_iter:
            self._run(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self._run(trainer)

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = state.get("best")


def _to_uint8(img: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    x = (img.float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def reconstruction_grid(
    model: nn.Module,
    images: torch.Tensor,
    mask_ratio: float,
    seeds: List[int],
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """Rows of [original | masked input | reconstruction | reconstruction with visible patches pasted].

    Args:
        model: a :class:`~maedet.models.mae.MaskedAutoencoderViT`.
        images: (N, 3, S, S) images normalized with ``mean`` / ``std``.
    Returns:
        (N*S, 4*S, 3) uint8 RGB.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images = images.to(device)
    noise = masking_noise(seeds, model.num_patches, device=device)
    _, pred, mask = model(images, mask_ratio=mask_ratio, noise=noise)
    if model.norm_pix_loss:
        target = model.patchify(images)
        pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + target.mean(dim=-1, keepdim=True)
    recon = model.unpatchify(pred.float())
    p = model.patch_size
    mask_img = model.unpatchify(mask.unsqueeze(-1).repeat(1, 1, p * p * 3).float())
    masked = images * (1 - mask_img)
    pasted = images * (1 - mask_img) + recon * mask_img
    rows = [
        np.concatenate([_to_uint8(t[i], mean, std) for t in (images, masked, recon, pasted)], axis=1)
        for i in range(images.shape[0])
    ]
    model.train(was_training)
    return np.concatenate(rows, axis=0)


class ReconstructionVisHook(HookBase):
    """Every ``period`` iterations (and at the end) writes ``vis/recon_{iter:07d}.png``:
    reconstructions of fixed images under fixed masks.

    Args:
        images: (N, 3, S, S) normalized images shown every time.
        period: iterations between grids (0: off).
        mask_ratio: fraction of patches removed.
        output_dir: the run's output directory.
        mean, std: the images' normalization (to draw them).
    """

    def __init__(
        self,
        images: torch.Tensor,
        period: int,
        mask_ratio: float,
        output_dir: str,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        self.images = images
        self.period = period
        self.mask_ratio = mask_ratio
        self.output_dir = os.path.join(output_dir, "vis")
        self.seeds = list(range(images.shape[0]))
        self.mean, self.std = mean, std

    def _write(self, trainer: Trainer) -> None:
        if not du.is_main_process() or self.images.shape[0] == 0:
            return
        with torch.random.fork_rng(devices=[]):
            grid = reconstruction_grid(
                unwrap_model(trainer.model), self.images, self.mask_ratio, self.seeds, self.mean, self.std
            )
        ok, buf = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        if ok:
            path = os.path.join(self.output_dir, f"recon_{trainer.iter:07d}.png")
            atomic_write(path, lambda f: f.write(buf.tobytes()))

    def after_step(self, trainer: Trainer) -> None:
        if self.period > 0 and trainer.iter % self.period == 0:
            self._write(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if self.period > 0 and trainer.iter % self.period != 0:
            self._write(trainer)
