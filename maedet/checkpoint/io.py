"""Reading and writing checkpoint files safely.

``atomic_save`` writes to a temporary file in the target directory, fsyncs it and
renames it over the target, so a reader (or a crash) never sees a half-written
file. ``load_checkpoint_file`` turns every way a file can be wrong into one
:class:`~maedet.utils.errors.CheckpointError` naming the file.
"""

from __future__ import annotations

import argparse
import os
import pickle
from typing import Any, Mapping, Optional, Tuple

import torch

from maedet.utils.errors import CheckpointError
from maedet.utils.fileio import atomic_write, disk_full_reason

__all__ = ["atomic_write", "atomic_save", "load_checkpoint_file", "checkpoint_object"]


def _tensor_bytes(obj: Any, seen: Optional[set] = None) -> int:
    """Bytes of the tensor storages in a (nested) checkpoint object, each storage once."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        storage = obj.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    return 0


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save(obj, path)`` atomically (see :func:`atomic_write`).

    Raises:
        CheckpointError: the file cannot be written; a full disk is named with the room
            needed and free (the previous file at ``path`` is untouched).
    """
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except (OSError, RuntimeError) as e:
        why = disk_full_reason(path, _tensor_bytes(obj), e)
        if why is None and not isinstance(e, OSError):
            raise
        raise CheckpointError(f"cannot write checkpoint {path}: {why or e.strerror or e}") from e


def load_checkpoint_file(path: str, map_location: Any = "cpu", weights_only: Optional[bool] = True) -> Any:
    """Load a ``torch.save`` file, a detectron2 ``.pkl`` or a ``.safetensors`` file with clear errors.

    Args:
        path: file to read.
        map_location: as for ``torch.load``.
        weights_only: load with PyTorch's safe unpickler (default; for ``.pkl``, an
            unpickler that accepts numpy arrays and plain containers only). Files
            that need arbitrary unpickling are refused with a message saying so
            (and naming ``--trust``); pass ``False`` only for files from a trusted source.
    Raises:
        CheckpointError: missing, empty, truncated, not a checkpoint, or unsafe.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"checkpoint is empty (0 bytes): {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file

            return load_file(path, device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"cannot read safetensors checkpoint {path}: {first}") from e
    if path.endswith(".pkl"):
        try:
            with open(path, "rb") as f:
                if weights_only:
                    return _RestrictedNumpyUnpickler(f).load()
                return pickle.load(f, encoding="latin1")
        except Exception as e:  # garbage input raises many types
            msg = " ".join(str(e).split())
            if "refusing to unpickle" in msg:
                what = msg.split("refusing to unpickle", 1)[1].split(":")[0].strip()
                raise CheckpointError(
                    f"checkpoint {path} holds Python objects that the safe loader refuses (it pickles {what}); "
                    "if you trust its source, rerun with --trust (library: weights_only=False), which "
                    "unpickles it and can run arbitrary code"
                ) from e
            raise CheckpointError(f"cannot read pickle checkpoint {path}: {msg}") from e
    try:
        # MAE's own training checkpoints pickle their argparse arguments: a plain
        # namespace of values, safe to allow (its norm_pix_loss is worth reading)
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=bool(weights_only))
    except pickle.UnpicklingError as e:
        msg = str(e)
        with open(path, "rb") as f:
            head = f.read(4)
        if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
            # neither torch.save's zip archive nor its (protocol >= 2) pickle: say so, rather
            # than let the safe unpickler's refusal suggest it is a checkpoint with objects
            raise CheckpointError(
                f"not a checkpoint: {path} (neither a PyTorch zip archive nor a pickle; the file starts with {head!r})"
            ) from e
        if weights_only and ("Weights only load failed" in msg or "weights_only" in msg):
            raise CheckpointError(
                f"checkpoint {path} holds Python objects that the safe loader refuses; "
                "if you trust its source, load it with weights_only=False "
                "(tools/convert_checkpoint.py --trust writes a safe copy)"
            ) from e
        raise CheckpointError(f"not a valid checkpoint: {path} ({msg.splitlines()[0] if msg else e})") from e
    except Exception as e:  # the unpicklers raise many types on garbage input
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        first = first.split(". ")[0]  # torch's zip reader appends a paragraph of advice
        raise CheckpointError(f"cannot read checkpoint {path}: truncated or not a checkpoint ({first})") from e


def checkpoint_object(src: Any, source_name: Optional[str] = None, trust: bool = False) -> Tuple[str, Mapping]:
    """(name, checkpoint dictionary) of a file path or an already loaded checkpoint object.

    Raises:
        CheckpointError: unreadable file (see :func:`load_checkpoint_file`), or not a dictionary.
    """
    if isinstance(src, (str, os.PathLike)):
        source = os.fspath(src)
        obj = load_checkpoint_file(source, map_location="cpu", weights_only=not trust)
    else:
        source, obj = source_name or "<state dict>", src
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {source} is not a dictionary (got {type(obj).__name__})")
    return source, obj


class _RestrictedNumpyUnpickler(pickle.Unpickler):
    """Unpickler for detectron2 model-zoo ``.pkl`` files: dicts of numpy arrays only."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),  # bytes in protocol-2 pickles written by Python 3
    }

    def __init__(self, f):
        super().__init__(f, encoding="latin1")

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to unpickle {module}.{name}: only numpy arrays are allowed in a .pkl checkpoint"
        )
