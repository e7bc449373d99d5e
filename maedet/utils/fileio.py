"""Atomic file writes: a reader, or a crash, never sees a half-written file."""

from __future__ import annotations

import io
import os
import tempfile
from typing import Callable

__all__ = ["atomic_write", "atomic_write_text"]


def atomic_write(path: str, write_fn: Callable[[io.BufferedWriter], None]) -> None:
    """Write a file atomically: ``write_fn(f)`` into a temp file, fsync, rename.

    On any failure (including a full disk) the temp file is removed and the
    previous content of ``path``, if any, is untouched.
    """
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename itself durable.
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    data = text.encode("utf-8")
    atomic_write(path, lambda f: f.write(data))
