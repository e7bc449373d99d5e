"""Absolute position embeddings: fixed 2-D sin-cos tables and resizing by interpolation.

The sin-cos table follows the MAE release exactly (same channel order), so a
table computed here equals the ``pos_embed`` buffer stored in MAE checkpoints.
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from maedet.utils.errors import CheckpointError

__all__ = [
    "get_1d_sincos_pos_embed",
    "get_2d_sincos_pos_embed",
    "resize_pos_embed_grid",
    "interpolate_pos_embed",
    "count_prefix_tokens",
    "fit_pos_embed",
]


def _pair(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """Sin-cos embedding of 1-D positions.

    Args:
        embed_dim: output channels D (even).
        pos: positions, any shape with M elements.
    Returns:
        (M, D) float64 tensor: ``[sin(pos * w_k), cos(pos * w_k)]`` with
        ``w_k = 1 / 10000^(k / (D/2))``, k = 0 .. D/2-1.
    """
    if embed_dim % 2 != 0:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / (10000.0**omega)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(
    embed_dim: int, grid_size: Union[int, Sequence[int]], cls_token: bool = False
) -> torch.Tensor:
    """Fixed 2-D sin-cos position table for a (H, W) patch grid, row-major.

    Half of the channels encode the column index and half the row index, in the
    order used by the MAE release (columns first).

    Args:
        embed_dim: channels D, divisible by 4.
        grid_size: H (= W) or (H, W).
        cls_token: prepend an all-zero row for a class token.
    Returns:
        float32 tensor of shape (H*W, D), or (1 + H*W, D) with ``cls_token``.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    h, w = _pair(grid_size)
    rows, cols = torch.meshgrid(
        torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij"
    )
    emb_cols = get_1d_sincos_pos_embed(embed_dim // 2, cols)
    emb_rows = get_1d_sincos_pos_embed(embed_dim // 2, rows)
    emb = torch.cat([emb_cols, emb_rows], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float()


def resize_pos_embed_grid(
    pos_embed: torch.Tensor,
    size: Union[int, Sequence[int]],
    num_prefix_tokens: int = 0,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resize a square grid of absolute position embeddings to ``size``.

    Args:
        pos_embed: (1, P + N, C) token layout (N a square number, P prefix
            tokens such as a class token, dropped) or (1, H0, W0, C) grid layout.
        size: target (H, W) or an int for a square grid.
        num_prefix_tokens: P, for the token layout.
        mode: interpolation mode for ``F.interpolate``.
    Returns:
        (1, H, W, C) tensor; the input itself (reshaped) when sizes already match.
    """
    h, w = _pair(size)
    if pos_embed.dim() == 3:
        tokens = pos_embed[:, num_prefix_tokens:]
        n = tokens.shape[1]
        side = int(math.isqrt(n))
        if side * side != n:
            raise ValueError(f"position embedding has {n} tokens, not a square grid")
        grid = tokens.reshape(1, side, side, -1)
    elif pos_embed.dim() == 4:
        grid = pos_embed
    else:
        raise ValueError(f"expected a 3-D or 4-D position embedding, got shape {tuple(pos_embed.shape)}")
    if grid.shape[1] == h and grid.shape[2] == w:
        return grid
    orig_dtype = grid.dtype
    out = F.interpolate(grid.permute(0, 3, 1, 2).float(), size=(h, w), mode=mode, align_corners=False)
    return out.permute(0, 2, 3, 1).to(orig_dtype)


def interpolate_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: Union[int, Sequence[int]],
    num_prefix_tokens: int = 1,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Resize a checkpoint's (1, P + N, C) position embedding to a new patch grid.

    Prefix tokens (the class token slot) are kept unchanged.

    Returns:
        (1, P + H*W, C) tensor.
    """
    prefix = pos_embed[:, :num_prefix_tokens]
    grid = resize_pos_embed_grid(pos_embed, new_grid, num_prefix_tokens, mode)
    return torch.cat([prefix, grid.reshape(1, -1, grid.shape[-1])], dim=1)


def count_prefix_tokens(n: int) -> int:
    """Number of prefix (class) tokens in a (1, P + side^2, C) position table."""
    for p in (0, 1):
        side = math.isqrt(max(n - p, 0))
        if side * side == n - p and side > 0:
            return p
    raise CheckpointError(f"key 'pos_embed': {n} positions are not a square grid with 0 or 1 prefix tokens")


def fit_pos_embed(ckpt: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A checkpoint's (1, P + N, C) position table fitted to the model's (1, P' + N', C)."""
    if ckpt.dim() != 3 or ckpt.shape[0] != 1 or ckpt.shape[-1] != target.shape[-1]:
        raise CheckpointError(
            f"key 'pos_embed' has shape {tuple(ckpt.shape)}, the model expects "
            f"{tuple(target.shape)} (different embedding width / model size?)"
        )
    p_ckpt, p_model = count_prefix_tokens(ckpt.shape[1]), count_prefix_tokens(target.shape[1])
    side = math.isqrt(target.shape[1] - p_model)
    ckpt = ckpt.to(target.dtype)
    if p_ckpt == 1 and p_model == 1:
        return interpolate_pos_embed(ckpt, side, num_prefix_tokens=1)
    grid = resize_pos_embed_grid(ckpt, side, num_prefix_tokens=p_ckpt).reshape(1, side * side, -1)
    if p_model == 0:
        return grid
    return torch.cat([target.new_zeros(1, 1, target.shape[-1]), grid], dim=1)
