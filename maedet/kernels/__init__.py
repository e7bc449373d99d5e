"""Fast paths ("kernels"), each beside the plain PyTorch it replaces, behind one switch.

Model code calls the functions of this package and reads like the paper and
detectron2; how a step runs fast on a device is decided here. Each kernel module
holds the reference implementation (plain PyTorch, detectron2's formula) and its
fast path, which computes the same numbers up to float rounding and is tested
against the reference, outputs and gradients (``tests/test_kernels.py``):

==================  ==========================================  =============================================
kernel              reference                                   fast path
==================  ==========================================  =============================================
attention           scores, rel-pos bias, softmax, weighted     CPU: tiled GEMMs, no N x N tensor, own
                    sum written out (detectron2's ``Attention``) backward; other devices: bias folded into SDPA
window_layout       ``window_partition`` + reshape / permute     one copy each way, padding = the qkv bias
layer_norm          detectron2's channel ``LayerNorm`` formula   layout-keeping LN with a float32 backward;
                                                                channels-last inference via ``F.layer_norm``
roi_align           ``torchvision.ops.roi_align``                CPU: channel slices on threads (bit-exact)
conv                one ``nn.Conv2d`` per 1 x 1 predictor;       1 x 1 convolutions as one matrix product;
                    NCHW                                         channels-last where CPU convolutions gain
==================  ==========================================  =============================================

The switch: :func:`set_fast` / :func:`fast` (a context manager), or the
environment variable ``MAEDET_KERNELS=reference`` at start-up. Default: the fast
paths, each used only where it is exact for the device and the call (the others
fall back to the reference by themselves, e.g. threaded RoIAlign on one thread).
Measured gains are in docs/BENCHMARKS.md (``tools/benchmark.py --compare
kernels=fast,reference``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

__all__ = ["fast_enabled", "set_fast", "fast"]

_VALUES = {"fast": True, "reference": False}


def _from_env() -> bool:
    value = os.environ.get("MAEDET_KERNELS", "fast").strip().lower()
    if value not in _VALUES:
        raise ValueError(f"MAEDET_KERNELS={value!r}: expected one of {', '.join(_VALUES)}")
    return _VALUES[value]


_fast = _from_env()


def fast_enabled() -> bool:
    """Whether the kernels run their fast paths (else the references)."""
    return _fast


def set_fast(enabled: bool) -> None:
    """Turn the fast paths on (default) or off for the whole process."""
    global _fast
    _fast = bool(enabled)


@contextlib.contextmanager
def fast(enabled: bool) -> Iterator[None]:
    """``with kernels.fast(False): ...`` runs the block on the references."""
    before = fast_enabled()
    set_fast(enabled)
    try:
        yield
    finally:
        set_fast(before)
