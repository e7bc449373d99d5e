"""Optimizer, parameter groups and lr schedule from a ``solver`` config section."""

from __future__ import annotations

import logging
from typing import Any, Tuple

import torch
from torch import nn

from maedet.engine.optim import build_optimizer, param_groups
from maedet.engine.schedule import LRSchedule
from maedet.utils.errors import ConfigError

__all__ = ["derive_schedule", "build_lr_schedule", "build_solver_optimizer"]

logger = logging.getLogger("maedet")


def derive_schedule(solver: Any, dataset_len: int, samples_per_iter: int) -> Tuple[float, int, int]:
    """Peak lr, max_iter and warm-up iterations of a solver section.

    The peak lr is ``solver.lr`` when set, else ``base_lr * samples_per_iter /
    base_batch_size``; epoch lengths use ``dataset_len // samples_per_iter`` iterations (at least 1).
    """
    if solver.lr is not None:
        lr = float(solver.lr)
    elif solver.base_batch_size > 0:
        lr = solver.base_lr * samples_per_iter / solver.base_batch_size
    else:
        lr = solver.base_lr
    iters_per_epoch = max(1, dataset_len // samples_per_iter)
    if solver.max_iter > 0:
        max_iter = solver.max_iter
    elif solver.epochs > 0:
        max_iter = max(1, int(round(solver.epochs * iters_per_epoch)))
    else:
        raise ConfigError("set solver.max_iter or solver.epochs to a positive number")
    warmup = solver.warmup_iters if solver.warmup_iters > 0 else int(round(solver.warmup_epochs * iters_per_epoch))
    return lr, max_iter, min(warmup, max_iter)


def build_lr_schedule(solver: Any, max_iter: int, warmup: int) -> LRSchedule:
    """The lr multiplier schedule of a solver section; the multistep steps must lie inside the run."""
    if solver.schedule == "multistep":
        bad = [int(x) for x in solver.steps if not 0 < int(x) < max_iter]
        if bad:
            raise ConfigError(f"solver.steps {list(solver.steps)}: steps {bad} are outside (0, max_iter={max_iter})")
    return LRSchedule(
        solver.schedule, max_iter, warmup, solver.warmup_factor, solver.min_lr_ratio, solver.steps, solver.gamma
    )


def build_solver_optimizer(solver: Any, model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """AdamW / SGD over the model's parameter groups.

    Weight decay follows ``solver.weight_decay*`` and ``no_*`` keys (see
    :func:`maedet.engine.optim.param_groups`); with ``solver.layer_decay < 1`` the
    model's own ``layer_id`` rule (its backbone's) gives each parameter's depth.
    """
    layer_id_fn, num_layers = None, 0
    if solver.layer_decay != 1.0:
        if not hasattr(model, "layer_id"):
            raise ConfigError(f"solver.layer_decay={solver.layer_decay}: {type(model).__name__} has no layer ids")
        layer_id_fn, num_layers = model.layer_id, model.backbone.num_layers
    groups = param_groups(
        model,
        solver.weight_decay,
        weight_decay_norm=solver.weight_decay_norm,
        no_decay_1d=solver.no_decay_1d,
        no_weight_decay=list(solver.no_weight_decay),
        layer_decay=solver.layer_decay,
        num_layers=num_layers,
        layer_id_fn=layer_id_fn,
    )
    return build_optimizer(groups, solver.optimizer, lr, solver.betas, solver.momentum, solver.fused, device)
