"""Mixed precision: the one place where an ``amp`` setting becomes an autocast dtype.

Modes (``train.amp`` in configs, ``--amp`` of the tools):

- ``auto``: bf16 on a CUDA GPU that supports it (Ampere and newer), fp16 with
  loss scaling on older GPUs, full precision on CPU. bf16 on CPU pays only
  where the CPU has native bf16 arithmetic (AVX512-BF16 / AMX), while CPUs
  without it emulate bf16 (convolutions many times slower than fp32; a warning
  says so); so on CPU it is asked for with ``bf16``, not chosen silently;
- ``bf16``: bf16 autocast (CPU or a GPU with bf16 support);
- ``fp16``: fp16 autocast with a gradient scaler (meant for GPUs; torch runs
  it on CPU too);
- ``off``: full precision.
"""

import contextlib
import logging
from typing import Optional

import torch

from maedet.utils.errors import ConfigError

__all__ = ["AMP_MODES", "resolve_amp", "amp_dtype", "autocast"]

AMP_MODES = ("auto", "off", "bf16", "fp16")

_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cuda_bf16_supported(device: torch.device) -> bool:
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def _cpu_bf16_native() -> bool:
    """Whether oneDNN has native bf16 kernels on this CPU (AVX512-BF16 / AMX)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


_warned_cpu_bf16 = False


def _warn_cpu_bf16(key: str) -> None:
    global _warned_cpu_bf16
    if _warned_cpu_bf16:
        return
    _warned_cpu_bf16 = True
    logging.getLogger("maedet").warning(
        "%s=bf16 on a CPU without native bf16 (%s, no AVX512-BF16/AMX): bf16 convolutions "
        "fall back to a slow reference kernel, up to ~100x slower than fp32; use %s=off here",
        key,
        torch.backends.cpu.get_cpu_capability(),
        key,
    )


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
    if mode == "bf16" and device.type == "cpu" and not _cpu_bf16_native():
        _warn_cpu_bf16(key)
    return mode


def amp_dtype(mode: Optional[str], device: torch.device, key: str = "train.amp") -> Optional[torch.dtype]:
    """Autocast dtype of ``mode`` on ``device`` (None: full precision)."""
    return _DTYPES[resolve_amp(mode, device, key)]


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``dtype``, or a no-op context for None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
