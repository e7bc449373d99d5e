"""The ``maedet`` logger: console on rank 0, ``log.txt`` in the output directory."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from maedet.utils.distributed import get_rank

__all__ = ["LOGGER_NAME", "setup_logger", "log_to_files", "format_seconds"]

LOGGER_NAME = "maedet"


def setup_logger(
    output_dir: Optional[str] = None, rank: Optional[int] = None, name: str = LOGGER_NAME
) -> logging.Logger:
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


def log_to_files(message: str, level: int = logging.ERROR, name: str = LOGGER_NAME) -> None:
    """Write ``message`` to the logger's files only (``log.txt``), not the console.

    A fatal error is printed once on stderr by the tool and also recorded here,
    where a user looks after a cluster job died.
    """
    logger = logging.getLogger(name)
    record = logger.makeRecord(name, level, __file__, 0, message, None, None)
    for h in logger.handlers:
        if isinstance(h, logging.FileHandler):
            h.handle(record)
            h.flush()
