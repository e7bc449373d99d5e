"""Run logs: console/file logger, JSON-lines metrics and tensorboard events (rank 0 only)."""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from typing import Dict, Optional

from maedet.engine.distributed import get_rank
from maedet.errors import TrainingError
from maedet.fileio import atomic_write_text

__all__ = ["setup_logger", "MetricsWriter", "format_seconds"]

LOGGER_NAME = "maedet"


def setup_logger(output_dir: Optional[str] = None, rank: Optional[int] = None, name: str = LOGGER_NAME) -> logging.Logger:
    """Console logging on rank 0 (warnings only elsewhere) and ``log.txt`` in ``output_dir``."""
    rank = get_rank() if rank is None else rank
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    fmt = logging.Formatter("[%(asctime)s %(name)s] %(message)s", datefmt="%m/%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if output_dir and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(output_dir, "log.txt"), mode="a")
        fh.setFormatter(fmt)
        logger.addHandler(fh)
    return logger


def format_seconds(s: float) -> str:
    s = int(max(0, s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}"


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
            with open(self.path, "r", encoding="utf-8") as f:
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
