"""Per-iteration learning-rate multipliers built from fvcore's param schedulers."""

from __future__ import annotations

from typing import Sequence

from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    ConstantParamScheduler,
    CosineParamScheduler,
    LinearParamScheduler,
    MultiStepParamScheduler,
    ParamScheduler,
)

__all__ = ["LRSchedule"]


class LRSchedule:
    """lr multiplier as a function of the iteration (0-based), in [0, 1].

    * ``cosine`` (MAE): linear warm-up from ``warmup_factor`` to 1 over
      ``warmup_iters``, then a half cosine from 1 to ``min_lr_ratio`` over the
      remaining iterations.
    * ``multistep`` (ViTDet): the multiplier is ``gamma ** (number of steps
      passed)``, times a linear warm-up factor going from ``warmup_factor`` to 1
      over the first ``warmup_iters``.
    * ``constant``: 1 after the warm-up.

    The value depends only on the iteration, so a resumed run gets exactly the
    same lr as an uninterrupted one.
    """

    def __init__(
        self,
        schedule: str,
        max_iter: int,
        warmup_iters: int = 0,
        warmup_factor: float = 0.0,
        min_lr_ratio: float = 0.0,
        steps: Sequence[int] = (),
        gamma: float = 0.1,
    ):
        if max_iter <= 0:
            raise ValueError("max_iter must be positive")
        self.max_iter = max_iter
        self.warmup_iters = min(warmup_iters, max_iter)
        self.warmup_factor = warmup_factor
        self.schedule = schedule
        w = self.warmup_iters / max_iter
        if schedule == "cosine":
            main: ParamScheduler = CosineParamScheduler(1.0, min_lr_ratio)
            self._warmup_inside = False
        elif schedule == "multistep":
            steps = sorted(int(s) for s in steps)
            if any(s <= 0 or s >= max_iter for s in steps):
                raise ValueError(f"multistep steps {steps} must lie in (0, max_iter={max_iter})")
            values = [gamma**k for k in range(len(steps) + 1)]
            main = MultiStepParamScheduler(values, num_updates=max_iter, milestones=steps)
            self._warmup_inside = True
        elif schedule == "constant":
            main = ConstantParamScheduler(1.0)
            self._warmup_inside = True
        else:
            raise ValueError(f"unknown lr schedule '{schedule}' (cosine, multistep or constant)")
        if self._warmup_inside or w == 0:
            self._sched = main
        else:
            self._sched = CompositeParamScheduler(
                [LinearParamScheduler(warmup_factor, 1.0), main],
                lengths=[w, 1.0 - w],
                interval_scaling=["rescaled", "rescaled"],
            )

    def __call__(self, iteration: int) -> float:
        where = min(iteration, self.max_iter - 1) / self.max_iter
        value = self._sched(where)
        if self._warmup_inside and iteration < self.warmup_iters:
            alpha = iteration / self.warmup_iters
            value *= self.warmup_factor * (1 - alpha) + alpha
        return float(value)
