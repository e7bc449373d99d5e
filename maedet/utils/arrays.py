"""Per-instance arrays (boxes, scores, labels) as numpy, whatever they came as."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = ["ArrayLike", "to_numpy", "instance_arrays"]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence]


def to_numpy(x: Optional[ArrayLike]) -> Optional[np.ndarray]:
    """A tensor (any device), array or sequence as a numpy array; None stays None."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def instance_arrays(
    boxes: ArrayLike, scores: ArrayLike, labels: ArrayLike, where: str = ""
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(N, 4)`` float64 boxes, ``(N,)`` float64 scores and int64 labels.

    Raises:
        ValueError: the three do not have the same number of instances
            (``where`` starts the message, e.g. ``"image 12: "``).
    """
    b = to_numpy(boxes).astype(np.float64).reshape(-1, 4)
    s = to_numpy(scores).astype(np.float64).reshape(-1)
    lab = to_numpy(labels).astype(np.int64).reshape(-1)
    n = b.shape[0]
    if s.shape[0] != n or lab.shape[0] != n:
        raise ValueError(f"{where}{n} boxes but {s.shape[0]} scores and {lab.shape[0]} labels")
    return b, s, lab
