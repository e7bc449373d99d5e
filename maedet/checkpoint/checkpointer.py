"""Training checkpoints: periodic atomic saves, ``last_checkpoint`` pointer, resume."""

from __future__ import annotations

import glob
import logging
import os
import re
from typing import Any, Dict, Optional

from maedet.checkpoint.io import atomic_save, load_checkpoint_file
from maedet.utils.errors import CheckpointError
from maedet.utils.fileio import atomic_write_text

__all__ = ["Checkpointer"]

logger = logging.getLogger("maedet")

_PERIODIC = re.compile(r"^model_(\d{7})\.pth$")


class Checkpointer:
    """Writes ``model_{iter:07d}.pth`` files into ``output_dir``.

    Each save is atomic (temp file + fsync + rename); only then is
    ``last_checkpoint`` (a one-line text file naming the newest complete
    checkpoint) rewritten, also atomically. So a kill at any moment leaves
    ``last_checkpoint`` pointing at a complete file. Older periodic
    checkpoints beyond ``max_to_keep`` are deleted; other names (``model_final.pth``,
    ``model_best.pth``) are never deleted.
    """

    def __init__(self, output_dir: str, max_to_keep: int = 2, save_enabled: bool = True):
        self.output_dir = output_dir
        self.max_to_keep = max_to_keep
        self.save_enabled = save_enabled

    @property
    def pointer_path(self) -> str:
        return os.path.join(self.output_dir, "last_checkpoint")

    def save(self, name: str, state: Dict[str, Any], update_pointer: bool = True) -> Optional[str]:
        """Save ``state`` as ``output_dir/name``; returns the path (None when disabled)."""
        if not self.save_enabled:
            return None
        path = os.path.join(self.output_dir, name)
        atomic_save(state, path)
        if update_pointer:
            try:
                atomic_write_text(self.pointer_path, name + "\n")
            except OSError as e:  # e.g. the disk filled up between the two writes
                raise CheckpointError(
                    f"cannot update {self.pointer_path} after writing {path}: {e.strerror or e} "
                    f"(it still names the previous checkpoint)"
                ) from e
        self._prune()
        logger.info(f"saved checkpoint {path}")
        return path

    def _prune(self) -> None:
        # temp files of a write that was killed (SIGKILL, power loss); never named by the pointer
        tmps = glob.glob(os.path.join(self.output_dir, ".model_*.tmp"))
        tmps += glob.glob(os.path.join(self.output_dir, ".last_checkpoint.*.tmp"))
        for tmp in tmps:
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
        if self.max_to_keep <= 0:
            return
        files = sorted(f for f in os.listdir(self.output_dir) if _PERIODIC.match(f))
        pointed = self.last_checkpoint_name()
        for f in files[: -self.max_to_keep]:
            if f != pointed:
                try:
                    os.remove(os.path.join(self.output_dir, f))
                except FileNotFoundError:
                    pass

    def last_checkpoint_name(self) -> Optional[str]:
        try:
            with open(self.pointer_path, encoding="utf-8") as f:
                name = f.read().strip()
        except FileNotFoundError:
            return None
        return name or None

    def last_checkpoint_path(self) -> Optional[str]:
        name = self.last_checkpoint_name()
        if name is None:
            return None
        path = os.path.join(self.output_dir, name)
        if not os.path.isfile(path):
            raise CheckpointError(f"{self.pointer_path} names {name}, which does not exist")
        return path

    def load_last(self) -> Optional[Dict[str, Any]]:
        """The newest complete checkpoint's content, or None when there is none."""
        path = self.last_checkpoint_path()
        if path is None:
            return None
        state = load_checkpoint_file(path)
        if not isinstance(state, dict) or "model" not in state or "iter" not in state:
            raise CheckpointError(f"{path} is not a maedet training checkpoint (no 'model'/'iter' entries)")
        state["_path"] = path
        return state
