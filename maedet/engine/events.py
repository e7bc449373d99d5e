"""Metric logs: JSON lines and tensorboard events (rank 0 only)."""

from __future__ import annotations

import json
import math
import os
from typing import Dict

from maedet.utils.errors import TrainingError
from maedet.utils.fileio import atomic_write_text

__all__ = ["MetricsWriter"]


class MetricsWriter:
    """Appends one JSON object per logged iteration to ``metrics.jsonl`` and
    mirrors scalars to tensorboard under ``tb/``.

    On resume at iteration ``start_iter``, records from iterations ``>=
    start_iter`` (written after the checkpoint by the interrupted run) are
    dropped first, and tensorboard purges the same range, so the logs of a
    resumed run equal those of an uninterrupted one.
    """

    def __init__(self, output_dir: str, start_iter: int = 0, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if os.path.exists(self.path):
            kept = []
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # a line cut short by a kill
                    if rec.get("iter", -1) < start_iter:
                        kept.append(json.dumps(rec))
            atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(output_dir, "tb"), purge_step=start_iter if start_iter > 0 else None)

    def write(self, iteration: int, scalars: Dict[str, float]) -> None:
        """Record ``scalars`` for ``iteration`` (the number of completed iterations - 1)."""
        if not self.enabled:
            return
        rec = {"iter": int(iteration)}
        for k, v in scalars.items():
            v = float(v)
            rec[k] = v if math.isfinite(v) else str(v)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
                f.flush()
            if self._tb is not None:
                for k, v in scalars.items():
                    self._tb.add_scalar(k, float(v), iteration)
        except OSError as e:
            raise TrainingError(f"cannot write metrics to {self.path}: {e.strerror or e}") from e

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
