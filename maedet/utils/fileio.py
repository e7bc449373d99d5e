"""Atomic file writes: a reader, or a crash, never sees a half-written file."""

from __future__ import annotations

import errno
import io
import os
import shutil
import tempfile
from typing import Callable, Optional

from maedet.utils.errors import MaedetError

__all__ = ["atomic_write", "atomic_write_text", "disk_full_reason"]


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


def disk_full_reason(path: str, needed: int, error: BaseException) -> Optional[str]:
    """Why writing ``needed`` bytes to ``path`` failed, when the disk is the cause: "No space
    left on device (N MB needed, M MB free in DIR)"; None when it is not (``error`` is then
    another problem). torch's zip writer reports a full disk as a ``RuntimeError`` about
    the stream position, so a failure with less room than ``needed`` counts as one too."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return None
    enospc = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    if not (enospc or free < needed):
        return None
    mb = 2**20
    return f"{os.strerror(errno.ENOSPC)} ({needed / mb:.1f} MB needed, {free / mb:.1f} MB free in {directory})"


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Raises:
        MaedetError: the file cannot be written; a full disk is named with the room needed.
    """
    data = text.encode("utf-8")
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        why = disk_full_reason(path, len(data), e) or e.strerror or str(e)
        raise MaedetError(f"cannot write {path}: {why}") from e
