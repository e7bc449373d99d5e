"""Iteration-based training loop shared by MAE pretraining and detection training.

The loop owns what every run needs: device placement, DDP, AMP (bf16, or fp16
with a gradient scaler), gradient accumulation and clipping, the per-iteration
lr schedule, non-finite loss handling, progress and metric logs, periodic
atomic checkpoints, exact resume and SIGTERM handling. What a batch means is
given by ``loss_fn(model, batch) -> {name: scalar loss}``.

Exact resume: the checkpoint holds the model, optimizer, scaler, iteration,
number of samples consumed and every rank's RNG states. The data loader is
rebuilt from ``samples_seen`` by ``loader_fn``, whose sampler derives each
sample's index and augmentation seed from its global position only, so the
continuation is the same batch stream an uninterrupted run would see.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from maedet.checkpoint.checkpointer import Checkpointer
from maedet.engine.ddp import check_grad_compression, wrap_ddp
from maedet.engine.events import MetricsWriter
from maedet.engine.rng import get_rng_state, set_rng_state
from maedet.engine.schedule import LRSchedule
from maedet.engine.signals import StopSignals
from maedet.engine.steps import unwrap_model
from maedet.utils import distributed as du
from maedet.utils.amp import amp_dtype, autocast, resolve_amp
from maedet.utils.errors import ConfigError, TrainingError
from maedet.utils.fileio import atomic_write_text
from maedet.utils.logger import format_seconds

__all__ = ["Trainer", "DDPOptions", "HookBase", "FINISHED_MARKER", "unwrap_model"]

# The file a run writes into its output dir once training and its final steps are done.
FINISHED_MARKER = "finished.json"

logger = logging.getLogger("maedet")


class HookBase:
    """Called by :class:`Trainer` around training. ``trainer.iter`` is the number
    of completed iterations when ``after_step`` runs."""

    def before_train(self, trainer: Trainer) -> None:
        pass

    def after_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class _AMP:
    def __init__(self, mode: str, device: torch.device):
        self.requested = mode
        self.mode = resolve_amp(mode, device)
        self.device = device
        self.dtype = amp_dtype(self.mode, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=(self.mode == "fp16"))

    def autocast(self):
        return autocast(self.device, self.dtype)


@dataclass
class DDPOptions:
    """How the model is wrapped in ``DistributedDataParallel`` when there are several processes.

    Attributes:
        grad_compression: ``none`` | ``bf16`` | ``fp16`` communication hook.
        bucket_view: DDP ``gradient_as_bucket_view`` (see :func:`maedet.engine.ddp.wrap_ddp`).
        find_unused_parameters: DDP's flag of that name.
    """

    grad_compression: str = "none"
    bucket_view: bool = True
    find_unused_parameters: bool = False


class Trainer:
    """Runs ``max_iter`` iterations of ``loss_fn`` over batches from ``loader_fn``.

    Args:
        model: the module to train (already on ``device``); wrapped in DDP here
            when the process group has more than one process.
        optimizer: optimizer whose groups carry ``lr_scale`` (see
            :func:`maedet.engine.optim.param_groups`).
        loader_fn: ``loader_fn(start_sample) -> iterable of batches`` for this
            rank, starting at global sample position ``start_sample``.
        loss_fn: ``loss_fn(model, batch, device) -> dict of scalar losses``.
        schedule: lr multiplier per iteration.
        lr: peak lr (the lr at multiplier 1, before each group's ``lr_scale``).
        max_iter: number of optimizer steps.
        samples_per_iter: global samples consumed per iteration
            (batch per process x processes x accumulation steps).
        output_dir: where logs and checkpoints go.
        device: compute device.
        amp: ``auto`` | ``off`` | ``bf16`` | ``fp16`` (see :mod:`maedet.utils.amp`).
        accum_steps: micro-batches per optimizer step.
        clip_grad_norm: max global grad norm (0 = no clipping).
        checkpoint_period: save every N iterations (0 = only at the end / on SIGTERM).
        log_period: log every N iterations.
        max_to_keep: periodic checkpoints kept on disk.
        nonfinite: ``stop`` raises on a NaN/inf loss naming the iteration and
            term; ``skip`` drops that step and counts it.
        hooks: :class:`HookBase` objects, called in order.
        ddp: see :class:`DDPOptions`.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loader_fn: Callable[[int], Iterable],
        loss_fn: Callable[[nn.Module, Any, torch.device], Dict[str, torch.Tensor]],
        schedule: LRSchedule,
        *,
        lr: float,
        max_iter: int,
        samples_per_iter: int,
        output_dir: str,
        device: torch.device,
        amp: str = "off",
        accum_steps: int = 1,
        clip_grad_norm: float = 0.0,
        checkpoint_period: int = 1000,
        log_period: int = 20,
        max_to_keep: int = 2,
        nonfinite: str = "stop",
        hooks: Sequence[HookBase] = (),
        ddp: Optional[DDPOptions] = None,
    ):
        if nonfinite not in ("stop", "skip"):
            raise ConfigError(f"train.nonfinite must be stop or skip, got '{nonfinite}'")
        ddp = ddp or DDPOptions()
        check_grad_compression(ddp.grad_compression)
        self.device = device
        self.model = model
        if du.get_world_size() > 1:
            self.model = wrap_ddp(
                model, device, ddp.grad_compression, ddp.bucket_view, find_unused_parameters=ddp.find_unused_parameters
            )
            if ddp.grad_compression != "none":
                logger.info(f"DDP gradients all-reduced in {ddp.grad_compression} (train.ddp_grad_compression)")
        self.optimizer, self.loader_fn, self.loss_fn = optimizer, loader_fn, loss_fn
        self.schedule, self.peak_lr, self.max_iter = schedule, lr, max_iter
        self.samples_per_iter, self.output_dir = samples_per_iter, output_dir
        self.amp = _AMP(amp, device)
        self.accum_steps = max(1, accum_steps)
        self.clip_grad_norm = clip_grad_norm
        self.checkpoint_period = checkpoint_period
        self.log_period = max(1, log_period)
        self.nonfinite = nonfinite
        self.hooks = list(hooks)
        self.checkpointer = Checkpointer(output_dir, max_to_keep, save_enabled=du.is_main_process())
        self.iter = 0
        self.samples_seen = 0
        self.skipped_steps = 0
        self.last_losses: Dict[str, float] = {}
        self.signals = StopSignals()
        # True when train() found the run already complete (trained and its after-train
        # hooks done, e.g. the final evaluation): nothing was run again
        self.was_finished = False
        self.metrics: Optional[MetricsWriter] = None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        rng = du.all_gather_object(get_rng_state())
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.amp.scaler.state_dict(),
            "iter": self.iter,
            "samples_seen": self.samples_seen,
            "skipped_steps": self.skipped_steps,
            "world_size": du.get_world_size(),
            "rng": rng,
            "hooks": [h.state_dict() for h in self.hooks],
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.amp.scaler.load_state_dict(state["scaler"])
        self.iter = int(state["iter"])
        self.samples_seen = int(state["samples_seen"])
        self.skipped_steps = int(state.get("skipped_steps", 0))
        rng = state.get("rng") or []
        if len(rng) == du.get_world_size():
            set_rng_state(rng[du.get_rank()])
        else:
            logger.warning(
                f"checkpoint was written by {len(rng)} processes, this run has {du.get_world_size()}: "
                "RNG streams are reseeded, so the continuation is not bit-exact"
            )
            torch.manual_seed(1_000_003 * self.iter + du.get_rank())
        for h, hs in zip(self.hooks, state.get("hooks", [])):
            h.load_state_dict(hs)

    def resume(self) -> bool:
        """Load the newest checkpoint of ``output_dir`` if there is one."""
        state = self.checkpointer.load_last()
        if state is None:
            logger.info(f"--resume: no checkpoint in {self.output_dir}, starting from scratch")
            return False
        self.load_state_dict(state)
        logger.info(f"resumed from {state['_path']} at iteration {self.iter}")
        return True

    def save_checkpoint(self, name: Optional[str] = None) -> None:
        state = self.state_dict()  # collective: every rank takes part
        if du.is_main_process():
            self.checkpointer.save(name or f"model_{self.iter:07d}.pth", state)
        du.synchronize()

    # ------------------------------------------------------------------- loop
    def _set_lr(self, iteration: int) -> float:
        mult = self.schedule(iteration)
        for g in self.optimizer.param_groups:
            g["lr"] = self.peak_lr * mult * g.get("lr_scale", 1.0)
        return self.peak_lr * mult

    def _agree(self, flags: List[float]) -> List[float]:
        """Max of small per-rank flags across ranks (so all ranks take the same branch)."""
        if du.get_world_size() == 1:
            return flags
        t = torch.tensor(flags, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.tolist()

    @property
    def finished_marker(self) -> str:
        """Written when training and every after-train hook (the final evaluation) are done."""
        return os.path.join(self.output_dir, FINISHED_MARKER)

    def train(self) -> None:
        """Run the iterations left, then the after-train hooks. A run that is already complete
        (resumed at ``max_iter`` with :attr:`finished_marker` present) says so and does nothing;
        one resumed at ``max_iter`` whose after-train hooks never completed runs only those."""
        if self.iter >= self.max_iter and os.path.isfile(self.finished_marker):
            logger.info(
                f"the run in {self.output_dir} is finished ({self.iter} of {self.max_iter} iterations, final steps "
                "done): nothing to do. Train longer with a larger solver.max_iter and --resume, or start a new "
                "run with another --output-dir"
            )
            self.was_finished = True
            return
        self.metrics = MetricsWriter(self.output_dir, start_iter=self.iter, enabled=du.is_main_process())
        self.signals = StopSignals()
        try:
            with self.signals:
                for h in self.hooks:
                    h.before_train(self)
                if self.iter < self.max_iter:
                    self._loop()
            if self.signals.received is None:
                for h in self.hooks:
                    h.after_train(self)
                if du.is_main_process():
                    atomic_write_text(self.finished_marker, json.dumps({"iter": self.iter, "max_iter": self.max_iter}))
                du.synchronize()
        finally:
            self.metrics.close()

    def _loop(self) -> None:
        # Creating a DataLoader iterator draws its base seed from the global torch
        # generator. Keep that draw out of the training RNG stream (which the model
        # uses, e.g. torchvision's RPN/RoI samplers), or a resumed run, which creates
        # its iterator at iteration k, would diverge from an uninterrupted one.
        with torch.random.fork_rng(devices=[]):
            data_iter = iter(self.loader_fn(self.samples_seen))
        self.model.train()
        start_iter = self.iter
        t_start = time.perf_counter()
        amp = self.amp.mode + (f" (train.amp={self.amp.requested})" if self.amp.requested != self.amp.mode else "")
        logger.info(f"starting training at iteration {self.iter} of {self.max_iter}, amp: {amp}")
        # a live bar on a terminal; the periodic log lines carry the same numbers into files
        bar = tqdm(
            total=self.max_iter,
            initial=self.iter,
            desc="train",
            dynamic_ncols=True,
            leave=False,
            disable=not (du.is_main_process() and sys.stderr.isatty()),
        )
        try:
            self._run_iterations(data_iter, bar, start_iter, t_start)
        finally:
            bar.close()
        self.save_checkpoint()

    def train_step(self, next_batch: Callable[[], Any]) -> Dict[str, float]:
        """One optimizer iteration at the current lr: ``accum_steps`` micro-batches from
        ``next_batch()`` (forward under autocast, backward), then the optimizer step, or,
        after a non-finite loss, what ``nonfinite`` says. Returns the mean loss terms."""
        losses, bad_term = self._forward_backward(next_batch)
        if bad_term is not None:
            self._drop_step(bad_term)
            return losses
        if self.clip_grad_norm > 0:
            self.amp.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad_norm)
        self.amp.scaler.step(self.optimizer)
        self.amp.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    def _forward_backward(self, next_batch: Callable[[], Any]) -> Tuple[Dict[str, float], Optional[str]]:
        """Forward and backward of the step's micro-batches (gradients accumulate; DDP
        synchronizes on the last). Returns the mean loss terms and, when a loss was not
        finite on any process, which (the remaining micro-batches are read, not run)."""
        model = self.model
        losses_sum: Dict[str, float] = {}
        bad_term: Optional[str] = None
        for micro in range(self.accum_steps):
            batch = next_batch()
            if bad_term is not None:
                continue  # keep the data position; this step is dropped
            sync = micro == self.accum_steps - 1 or not isinstance(model, DistributedDataParallel)
            with contextlib.nullcontext() if sync else model.no_sync():
                with self.amp.autocast():
                    loss_dict = self.loss_fn(model, batch, self.device)
                total = sum(loss_dict.values())
                values = {k: float(v.detach()) for k, v in loss_dict.items()}
                nonfinite = [k for k, v in values.items() if not math.isfinite(v)]
                if not math.isfinite(float(total.detach())) and not nonfinite:
                    nonfinite = ["total"]
                if self._agree([1.0 if nonfinite else 0.0])[0]:
                    bad_term = (
                        ", ".join(f"{k}={values.get(k, float(total.detach()))}" for k in nonfinite)
                        or "a loss term on another process"
                    )
                else:
                    self.amp.scaler.scale(total / self.accum_steps).backward()
            # logged as seen (a skipped step shows its nan/inf, not 0)
            for k, v in values.items():
                losses_sum[k] = losses_sum.get(k, 0.0) + v / self.accum_steps
        return losses_sum, bad_term

    def _drop_step(self, bad_term: str) -> None:
        """A non-finite loss: stop (``nonfinite=stop``) or skip the step, gradients dropped."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.nonfinite == "stop":
            raise TrainingError(
                f"non-finite loss at iteration {self.iter}: {bad_term} "
                "(set train.nonfinite=skip to drop such steps instead)"
            )
        self.skipped_steps += 1
        logger.warning(
            f"iteration {self.iter}: non-finite loss ({bad_term}); step skipped ({self.skipped_steps} so far)"
        )

    def _run_iterations(self, data_iter, bar, start_iter: int, t_start: float) -> None:
        window_start, window_iters, data_time = t_start, 0, 0.0

        def next_batch():
            nonlocal data_time
            t0 = time.perf_counter()
            batch = next(data_iter)
            data_time += time.perf_counter() - t0
            return batch

        while self.iter < self.max_iter:
            lr = self._set_lr(self.iter)
            losses_sum = self.train_step(next_batch)
            self.samples_seen += self.samples_per_iter
            self.iter += 1
            window_iters += 1
            self.last_losses = losses_sum
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses_sum.values()):.4f}", lr=f"{lr:.2e}", refresh=False)
            stop_flag = self._agree([1.0 if self.signals.received is not None else 0.0])[0]

            if self.iter % self.log_period == 0 or self.iter == self.max_iter or stop_flag:
                self._log(losses_sum, lr, start_iter, t_start, window_start, window_iters, data_time)
                window_start, window_iters, data_time = time.perf_counter(), 0, 0.0
            if stop_flag:
                self._stop_on_signal()
            if self.checkpoint_period > 0 and self.iter % self.checkpoint_period == 0 and self.iter < self.max_iter:
                self.save_checkpoint()
            for h in self.hooks:
                h.after_step(self)

    def _stop_on_signal(self) -> None:
        """A signal reached this process or another: checkpoint here, then exit with its code."""
        if self.signals.received is None:  # another process got it
            self.signals.received = signal.SIGTERM
        logger.warning(
            f"received {self.signals.name}: saving a checkpoint at iteration {self.iter} and exiting; "
            "rerun with --resume to continue"
        )
        self.save_checkpoint()
        logger.warning(
            f"checkpoint {os.path.join(self.output_dir, f'model_{self.iter:07d}.pth')} written; continue "
            f"with the same command and --resume (output dir {self.output_dir})"
        )
        raise SystemExit(self.signals.exit_code)

    def _log(
        self,
        losses: Dict[str, float],
        lr: float,
        start_iter: int,
        t_start: float,
        window_start: float,
        window_iters: int,
        data_time: float,
    ) -> None:
        names = sorted(losses)
        if du.get_world_size() > 1:
            t = torch.tensor([losses[k] for k in names], dtype=torch.float64, device=self.device)
            losses = dict(zip(names, du.all_reduce_mean(t).tolist()))
        if not du.is_main_process():
            return
        now = time.perf_counter()
        per_iter = (now - window_start) / max(1, window_iters)
        done = self.iter - start_iter
        eta = (now - t_start) / max(1, done) * (self.max_iter - self.iter)
        total = sum(losses.values())
        ips = self.samples_per_iter / max(per_iter, 1e-9)
        scalars = {
            "loss": total,
            **losses,
            "lr": lr,
            "time": per_iter,
            "data_time": data_time / max(1, window_iters),
            "images_per_sec": ips,
            "eta_seconds": eta,
            "skipped_steps": self.skipped_steps,
        }
        self.metrics.write(self.iter - 1, scalars)
        terms = "  ".join(f"{k}: {losses[k]:.4f}" for k in names) if len(names) > 1 else ""
        logger.info(
            f"iter {self.iter}/{self.max_iter}  eta {format_seconds(eta)}  loss {total:.4f}  {terms}"
            f"{'  ' if terms else ''}lr {lr:.3e}  {ips:.1f} img/s  time {per_iter:.3f}s"
        )
        sys.stdout.flush()
