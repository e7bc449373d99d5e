"""timm ``VisionTransformer`` state dicts (``vit_*_patch16_*``, ``vit_huge_patch14_*``, the ``.mae`` tags).

Their names are the MAE release's (:mod:`.mae`), so reading one is unwrapping
its tensors and writing one is writing the encoder state as it is, as a
``torch.save`` file or a ``.safetensors`` file (timm's hub format), for
``timm.create_model(..., num_classes=0, global_pool="token")``.
"""

from __future__ import annotations

from typing import Mapping

import torch

from maedet.utils.errors import CheckpointError, ConfigError
from maedet.utils.fileio import atomic_write

__all__ = ["write_timm"]


def write_timm(state: Mapping[str, torch.Tensor], path: str) -> None:
    """Write a plain state dict; ``.safetensors`` by extension, else ``torch.save`` (atomically)."""
    if not path.endswith(".safetensors"):
        from maedet.checkpoint.io import atomic_save

        atomic_save(dict(state), path)
        return
    from safetensors.torch import save

    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: only a plain state dict can be written as .safetensors")
    data = save({k: v.detach().cpu().contiguous() for k, v in state.items()})
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
