"""The trainer from a config: one wiring for pretraining and detection training."""

from __future__ import annotations

import logging
import re
from typing import Any, Callable, Dict, Sequence, Sized

import torch
from torch import nn

from maedet.builders.data import build_train_loader_fn
from maedet.builders.solver import build_lr_schedule, build_solver_optimizer, derive_schedule
from maedet.engine.trainer import DDPOptions, HookBase, Trainer
from maedet.utils import distributed as du
from maedet.utils.errors import ConfigError

__all__ = ["per_process_batch", "build_trainer"]

logger = logging.getLogger("maedet")


def per_process_batch(train_cfg: Any) -> int:
    """Images per process and micro-batch.

    ``train.total_batch_size > 0`` is the global batch: each of N processes takes
    ``total_batch_size / (N x accum_steps)`` (an error if that is not a whole
    number), so a recipe keeps its batch, and its lr, on any number of GPUs.
    Otherwise ``train.batch_size`` per process.
    """
    if train_cfg.total_batch_size > 0:
        denom = du.get_world_size() * train_cfg.accum_steps
        if train_cfg.total_batch_size % denom != 0:
            raise ConfigError(
                f"train.total_batch_size={train_cfg.total_batch_size} is not divisible by "
                f"{du.get_world_size()} processes x {train_cfg.accum_steps} accumulation steps"
            )
        return train_cfg.total_batch_size // denom
    return train_cfg.batch_size


def _sampler_section(cfg: Any, collate: str) -> Any:
    """``data.train.sampler`` of a detection config (pretraining draws every image once per epoch)."""
    return cfg.data.train.sampler if collate == "detection" else None


def build_trainer(
    cfg: Any,
    model: nn.Module,
    dataset: Sized,
    collate: str,
    loss_fn: Callable,
    hooks: Sequence[HookBase],
    device: torch.device,
    **log_info: Any,
) -> Trainer:
    """A :class:`Trainer` for ``model`` on ``dataset`` as ``cfg.train`` and ``cfg.solver`` say.

    Args:
        cfg: a pretraining or detection config.
        model: on ``device``.
        dataset: the training dataset (its length sets epoch-based schedules).
        collate: ``"pretrain"`` or ``"detection"`` (the loader's batch layout).
        loss_fn: ``loss_fn(model, batch, device) -> {name: loss}``.
        hooks: in the order they run.
    """
    t = cfg.train
    batch = per_process_batch(t)
    world = du.get_world_size()
    samples_per_iter = batch * world * t.accum_steps
    lr, max_iter, warmup = derive_schedule(cfg.solver, len(dataset), samples_per_iter)
    logger.info(
        f"batch {batch} per process x {world} processes x {t.accum_steps} accumulation = "
        f"{samples_per_iter}; peak lr {lr:.3e}; {max_iter} iterations ({warmup} warm-up)"
    )
    logger.info(describe_trainable(model))
    schedule = build_lr_schedule(cfg.solver, max_iter, warmup)
    optimizer = build_solver_optimizer(cfg.solver, model, lr, device)
    return Trainer(
        model,
        optimizer,
        build_train_loader_fn(dataset, collate, batch, t, device, sampler=_sampler_section(cfg, collate)),
        loss_fn,
        schedule,
        lr=lr,
        max_iter=max_iter,
        samples_per_iter=samples_per_iter,
        output_dir=cfg.output_dir,
        device=device,
        amp=t.amp,
        accum_steps=t.accum_steps,
        clip_grad_norm=cfg.solver.clip_grad_norm,
        checkpoint_period=t.checkpoint_period,
        log_period=t.log_period,
        max_to_keep=t.max_to_keep,
        nonfinite=t.nonfinite,
        hooks=list(hooks),
        ddp=DDPOptions(t.ddp_grad_compression, t.ddp_bucket_view, t.ddp_find_unused),
    )


def _ranges(ids: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> "0-2, 5"."""
    ids, out = sorted(ids), []
    for i in ids:
        if out and i == out[-1][1] + 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in out)


def describe_trainable(model: nn.Module) -> str:
    """One line: trainable and total parameters, and the frozen parts by module (blocks as ranges)."""
    params = list(model.named_parameters())
    total = sum(p.numel() for _, p in params)
    trainable = sum(p.numel() for _, p in params if p.requires_grad)
    line = f"parameters: {trainable:,} trainable of {total:,} ({100.0 * trainable / max(total, 1):.1f}%)"
    frozen = [n for n, p in params if not p.requires_grad]
    if not frozen:
        return line
    blocks: Dict[str, set] = {}
    rest = []
    for n in frozen:
        m = re.match(r"(.*\bblocks)\.(\d+)\.", n)
        if m:
            blocks.setdefault(m.group(1), set()).add(int(m.group(2)))
        else:
            rest.append(n)
    others = []
    for n in rest:  # a parameter of the module that holds the blocks by its name, others by their module
        parent = n.rsplit(".", 1)[0]
        name = n if any(k.startswith(parent + ".") for k in blocks) else parent
        if name not in others:
            others.append(name)
    parts = others + [f"{k} {_ranges(v)}" for k, v in blocks.items()]
    return f"{line}; frozen: {', '.join(parts)}"
