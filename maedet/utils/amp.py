"""Mixed precision: the one place where an ``amp`` setting becomes an autocast dtype.

Modes (``train.amp`` in configs, ``--amp`` of the tools):

- ``auto``: bf16 on a CUDA GPU that supports it (Ampere and newer), fp16 with
  loss scaling on older GPUs, full precision on CPU. bf16 on CPU pays only
  where the CPU has native bf16 arithmetic (AVX512-BF16 / AMX): the MAE ViT-B
  step ran 1.8x faster with it on such a CPU (docs/BENCHMARKS.md), while CPUs
  without it emulate bf16; so on CPU it is asked for with ``bf16``, not
  chosen silently;
- ``bf16``: bf16 autocast (CPU or a GPU with bf16 support);
- ``fp16``: fp16 autocast with a gradient scaler (meant for GPUs; torch runs
  it on CPU too);
- ``off``: full precision.
"""

import contextlib
from typing import Optional

import torch

from maedet.utils.errors import ConfigError

__all__ = ["AMP_MODES", "resolve_amp", "amp_dtype", "autocast"]

AMP_MODES = ("auto", "off", "bf16", "fp16")

_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cuda_bf16_supported(device: torch.device) -> bool:
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_amp(mode: Optional[str], device: torch.device, key: str = "train.amp") -> str:
    """The concrete mode (``off``, ``bf16`` or ``fp16``) that ``mode`` means on ``device``.

    Raises:
        ConfigError: unknown mode, or ``bf16`` on a GPU without bf16 support;
            the message names ``key``.
    """
    mode = "off" if mode in (None, False, "", "none") else str(mode)
    if mode not in AMP_MODES:
        raise ConfigError(f"{key}={mode!r}: expected one of {', '.join(AMP_MODES)}")
    on_cuda = device.type == "cuda"
    if mode == "auto":
        if not on_cuda:
            return "off"
        return "bf16" if _cuda_bf16_supported(device) else "fp16"
    if mode == "bf16" and on_cuda and not _cuda_bf16_supported(device):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"{key}=bf16: {name} has no bf16 support (compute capability < 8.0); use fp16 or auto")
    return mode


def amp_dtype(mode: Optional[str], device: torch.device, key: str = "train.amp") -> Optional[torch.dtype]:
    """Autocast dtype of ``mode`` on ``device`` (None: full precision)."""
    return _DTYPES[resolve_amp(mode, device, key)]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``dtype``, or a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
