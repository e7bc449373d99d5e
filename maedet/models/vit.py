"""Plain ViT backbone for detection (ViTDet), following detectron2's ``modeling/backbone/vit.py``.

Parameter names match detectron2's ViTDet backbone (``patch_embed.proj``,
``pos_embed``, ``blocks.{i}.attn.rel_pos_h`` ...), so a detectron2 ViTDet
checkpoint converts by stripping the key prefix ``backbone.net.``, and the
encoder of an MAE checkpoint loads by name (see ``maedet.checkpoint.pretrained``).

The tokens stay a (B, H, W, C) grid through all blocks. Most blocks attend
inside non-overlapping windows (the grid is zero-padded to a multiple of the
window); a few blocks attend globally. Every attention adds detectron2's
decomposed relative-position bias. With ``attn_impl="sdpa"`` that bias is
folded into the query/key vectors so that ``F.scaled_dot_product_attention``
never materializes a (tokens x tokens) matrix (see :func:`attention_rel_pos`).
"""
from __future__ import annotations

import re
from functools import partial
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, PatchEmbed, trunc_normal_

from .pos_embed import resize_pos_embed_grid

__all__ = [
    "ATTN_IMPLS",
    "VIT_PRESETS",
    "ViT",
    "Block",
    "Attention",
    "window_partition",
    "window_unpartition",
    "get_rel_pos",
    "get_decomposed_rel_pos",
    "attention_rel_pos",
    "get_abs_pos",
    "get_vit_layer_id",
]

ATTN_IMPLS = ("sdpa", "sdpa_mask", "explicit")


def global_blocks_to_window_indexes(depth: int, global_blocks: Sequence[int]) -> Tuple[int, ...]:
    """Indexes of the window-attention blocks of a ViT whose other blocks are global."""
    global_set = set(global_blocks)
    return tuple(i for i in range(depth) if i not in global_set)


# Architecture presets (ViTDet paper, Table / detectron2 ``projects/ViTDet/configs``).
# ``drop_path_rate`` is the fine-tuning value of the ViTDet COCO recipe.
VIT_PRESETS: Dict[str, dict] = {
    # Test/quickstart size: two windowed and two global blocks.
    "vit_tiny": dict(
        embed_dim=192,
        depth=4,
        num_heads=3,
        drop_path_rate=0.0,
        window_block_indexes=global_blocks_to_window_indexes(4, (1, 3)),
    ),
    "vit_base": dict(
        embed_dim=768,
        depth=12,
        num_heads=12,
        drop_path_rate=0.1,
        window_block_indexes=global_blocks_to_window_indexes(12, (2, 5, 8, 11)),
    ),
    "vit_large": dict(
        embed_dim=1024,
        depth=24,
        num_heads=16,
        drop_path_rate=0.4,
        window_block_indexes=global_blocks_to_window_indexes(24, (5, 11, 17, 23)),
    ),
    "vit_huge": dict(
        embed_dim=1280,
        depth=32,
        num_heads=16,
        drop_path_rate=0.5,
        window_block_indexes=global_blocks_to_window_indexes(32, (7, 15, 23, 31)),
    ),
}


# --------------------------------------------------------------------------- windows


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Split a token grid into non-overlapping windows, zero-padding if needed.

    Args:
        x: (B, H, W, C) token grid.
        window_size: window side length ``ws``.
    Returns:
        windows: (B * num_windows, ws, ws, C), windows in row-major order per image.
        (Hp, Wp): padded grid size (multiples of ``ws``), needed to undo the partition.
    """
    B, H, W, C = x.shape
    pad_h = (window_size - H % window_size) % window_size
    pad_w = (window_size - W % window_size) % window_size
    if pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window_size, window_size, Wp // window_size, window_size, C)
    windows = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(-1, window_size, window_size, C)
    return windows, (Hp, Wp)


def window_unpartition(
    windows: torch.Tensor, window_size: int, pad_hw: Tuple[int, int], hw: Tuple[int, int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`: reassemble windows and drop the padding.

    Args:
        windows: (B * num_windows, ws, ws, C).
        window_size: ``ws``.
        pad_hw: (Hp, Wp) padded grid size returned by :func:`window_partition`.
        hw: (H, W) original grid size.
    Returns:
        (B, H, W, C) token grid.
    """
    Hp, Wp = pad_hw
    H, W = hw
    B = windows.shape[0] // (Hp * Wp // window_size // window_size)
    x = windows.view(B, Hp // window_size, Wp // window_size, window_size, window_size, -1)
    x = x.permute(0, 1, 3, 2, 4, 5).contiguous().view(B, Hp, Wp, -1)
    if Hp > H or Wp > W:
        x = x[:, :H, :W, :].contiguous()
    return x


# --------------------------------------------------------------------------- rel-pos


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative-position embeddings for every (query, key) pair along one axis.

    The table is linearly interpolated when its length differs from
    ``2 * max(q_size, k_size) - 1`` (e.g. a global block run on a grid other
    than the one it was built for), as in detectron2.

    Args:
        q_size: number of query positions along the axis.
        k_size: number of key positions along the axis.
        rel_pos: (L, head_dim) table; entry ``L // 2`` is offset 0.
    Returns:
        (q_size, k_size, head_dim) embeddings indexed by (query pos, key pos).
    """
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos_resized = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1),
            size=max_rel_dist,
            mode="linear",
        )
        rel_pos_resized = rel_pos_resized.reshape(-1, max_rel_dist).permute(1, 0)
    else:
        rel_pos_resized = rel_pos
    # Scale the coordinates with the shorter length if q and k sizes differ.
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos_resized[relative_coords.long()]


def get_decomposed_rel_pos(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: Tuple[int, int],
    k_size: Tuple[int, int],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-axis terms of the decomposed relative-position bias (MViTv2 / ViTDet).

    The bias added to the score of query (i, j) and key (k, l) is
    ``rel_h[..., i, j, k] + rel_w[..., i, j, l]`` with
    ``rel_h = <q_ij, Rh[i, k]>`` and ``rel_w = <q_ij, Rw[j, l]>`` (unscaled q).

    Args:
        q: (..., q_h * q_w, head_dim) queries, row-major grid.
        rel_pos_h: (Lh, head_dim) table for the height axis.
        rel_pos_w: (Lw, head_dim) table for the width axis.
        q_size: (q_h, q_w).
        k_size: (k_h, k_w).
    Returns:
        rel_h: (..., q_h * q_w, k_h); rel_w: (..., q_h * q_w, k_w).
    """
    q_h, q_w = q_size
    k_h, k_w = k_size
    Rh = get_rel_pos(q_h, k_h, rel_pos_h).to(q.dtype)
    Rw = get_rel_pos(q_w, k_w, rel_pos_w).to(q.dtype)
    lead = q.shape[:-2]
    r_q = q.reshape(-1, q_h, q_w, q.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw)
    return rel_h.reshape(*lead, q_h * q_w, k_h), rel_w.reshape(*lead, q_h * q_w, k_w)


# Elements of one (queries x keys) score block per chunk of the CPU path
# (fp32: 16 MB); the query chunk is sized so that batch x heads x chunk x N fits.
# Kept under glibc's largest mmap threshold (32 MB): larger blocks are mmap'ed
# and unmapped on every allocation, and the page faults of re-mapping them cost
# more system time than the attention arithmetic (a ViT-B global block at 1024,
# forward + backward on 2 cores: 2^26 elements 2.9 s wall with 1.8 s of system
# time, 2^22 2.1 s with none; docs/BENCHMARKS.md).
_CPU_CHUNK_ELEMENTS = 1 << 22


def _rel_pos_bias(rel_h: torch.Tensor, rel_w: torch.Tensor) -> torch.Tensor:
    """(..., n, k_h) + (..., n, k_w) -> (..., n, k_h * k_w) additive bias (row-major keys)."""
    return (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)


def _query_chunk(q: torch.Tensor, n_keys: int) -> int:
    rows = max(1, q.numel() // max(1, q.shape[-2] * q.shape[-1]))  # batch x heads
    return max(1, min(q.shape[-2], _CPU_CHUNK_ELEMENTS // (rows * n_keys)))


def _chunked_sdpa_forward(q, k, v, rel_h, rel_w, scale: float, chunk: int) -> torch.Tensor:
    """SDPA over query chunks with the chunk's (chunk x N) bias as ``attn_mask`` (no grad)."""
    n = q.shape[-2]
    if chunk >= n:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_rel_pos_bias(rel_h, rel_w), scale=scale)
    out = torch.empty_like(q)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        out[..., s:e, :] = F.scaled_dot_product_attention(
            q[..., s:e, :], k, v, attn_mask=_rel_pos_bias(rel_h[..., s:e, :], rel_w[..., s:e, :]), scale=scale
        )
    return out


class _ChunkedRelPosAttention(torch.autograd.Function):
    """``softmax(scale q k^T + bias) v`` that keeps no (N x N) tensor for backward.

    Forward: SDPA (CPU flash kernel, head size unchanged) over query chunks with
    the chunk's bias as mask. Backward: per query chunk, recompute the
    probabilities and form the gradients with plain GEMMs (flash-attention
    style recomputation, but over whole key rows, so no running softmax is
    needed); the rel-pos gradients are the row / column sums of dS.
    """

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, scale, chunk):
        out = _chunked_sdpa_forward(q, k, v, rel_h, rel_w, scale, chunk)
        ctx.save_for_backward(q, k, v, rel_h, rel_w, out)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, rel_h, rel_w, out = ctx.saved_tensors
        scale, chunk = ctx.scale, ctx.chunk
        n, k_h, k_w = q.shape[-2], rel_h.shape[-1], rel_w.shape[-1]
        dout = dout.contiguous()
        acc = torch.promote_types(q.dtype, torch.float32)  # float32 for bf16/fp16 inputs
        dq = torch.empty_like(q)
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros(v.shape, dtype=acc, device=v.device)
        drel_h = torch.empty_like(rel_h)
        drel_w = torch.empty_like(rel_w)
        delta = (dout.to(acc) * out.to(acc)).sum(-1, keepdim=True)  # rowsum(dP * P) = dO . O
        kt, vt = k.transpose(-2, -1), v.transpose(-2, -1)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            qc, doc = q[..., s:e, :], dout[..., s:e, :]
            logits = torch.matmul(qc, kt).to(acc).mul_(scale)
            logits += _rel_pos_bias(rel_h[..., s:e, :], rel_w[..., s:e, :]).to(acc)
            p = logits.softmax(dim=-1)
            del logits
            p_lp = p if p.dtype == v.dtype else p.to(v.dtype)
            dv += torch.matmul(p_lp.transpose(-2, -1), doc).to(acc)
            del p_lp
            ds = torch.matmul(doc, vt).to(acc).sub_(delta[..., s:e, :]).mul_(p)  # dS = P * (dP - delta)
            del p
            ds4 = ds.unflatten(-1, (k_h, k_w))
            drel_h[..., s:e, :] = ds4.sum(-1)
            drel_w[..., s:e, :] = ds4.sum(-2)
            del ds4
            ds = ds.to(q.dtype)
            dq[..., s:e, :] = torch.matmul(ds, k).mul_(scale)
            dk += torch.matmul(ds.transpose(-2, -1), qc).to(acc)
            del ds
        return dq, dk.mul_(scale).to(k.dtype), dv.to(v.dtype), drel_h, drel_w, None, None


def attention_rel_pos(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: Optional[torch.Tensor],
    rel_w: Optional[torch.Tensor],
    k_size: Tuple[int, int],
    scale: float,
    impl: str = "sdpa",
) -> torch.Tensor:
    """``softmax(scale * q k^T + bias) v`` with the decomposed rel-pos bias.

    ``bias[(i, j), (k, l)] = rel_h[(i, j), k] + rel_w[(i, j), l]``.

    Implementations (equal up to float rounding):

    - ``"sdpa"``: never keeps a (N x N) matrix. Two strategies, by device:

      * CUDA (and other non-CPU devices): the bias is folded into the dot
        product. Because the bias of key (k, l) is a row term plus a column
        term, appending ``rel_h`` and ``rel_w`` to the pre-scaled query and
        one-hot row / column indicators to the key gives
        ``q' . k' = scale * q.k + rel_h[k] + rel_w[l]``. The value is
        zero-padded to the same head size (the fused kernels need equal q/v
        head sizes; all three go to a multiple of 8), SDPA runs with
        ``scale=1`` and the padding is dropped from the output.
      * CPU: folding grows the head size from ``head_dim`` to
        ``head_dim + k_h + k_w`` (64 -> 192 for a ViT-B global block at 1024),
        which triples the work of the CPU flash kernel and made the folded path
        slower than the explicit one (docs/BENCHMARKS.md). Instead, SDPA runs
        over chunks of queries with the chunk's (chunk x N) bias as
        ``attn_mask`` (the CPU flash kernel accepts a mask, head size stays
        ``head_dim``); with autograd, a custom function keeps only q, k, v,
        the per-axis terms and the output, and recomputes each chunk's
        probabilities in backward (the rel-pos gradients are row / column sums
        of dS). Temporary memory is bounded by ``_CPU_CHUNK_ELEMENTS``.
    - ``"sdpa_mask"``: the bias is expanded to (N x N) and passed as ``attn_mask``.
    - ``"explicit"``: scores, softmax and weighted sum written out (reference).

    Args:
        q, k, v: (B, heads, N, head_dim), N = k_h * k_w (self-attention on a grid).
        rel_h: (B, heads, N, k_h) or None (no rel-pos bias).
        rel_w: (B, heads, N, k_w) or None.
        k_size: (k_h, k_w) key grid.
        scale: multiplier of ``q . k`` (usually ``head_dim ** -0.5``).
        impl: one of ``ATTN_IMPLS``.
    Returns:
        (B, heads, N, head_dim).
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    use_rel_pos = rel_h is not None
    if impl == "explicit":
        attn = (q * scale) @ k.transpose(-2, -1)
        if use_rel_pos:
            k_h, k_w = k_size
            attn = (
                attn.unflatten(-1, (k_h, k_w)) + rel_h[..., :, None] + rel_w[..., None, :]
            ).flatten(-2)
        return attn.softmax(dim=-1) @ v
    if not use_rel_pos:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if impl == "sdpa_mask":
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    k_h, k_w = k_size
    if q.device.type == "cpu":
        rel_h, rel_w = rel_h.to(q.dtype), rel_w.to(q.dtype)
        chunk = _query_chunk(q, k.shape[-2])
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, rel_h, rel_w)):
            return _ChunkedRelPosAttention.apply(q, k, v, rel_h, rel_w, float(scale), chunk)
        return _chunked_sdpa_forward(q, k, v, rel_h, rel_w, scale, chunk)

    # impl == "sdpa" off the CPU: fold the bias into q and k.
    head_dim = q.shape[-1]
    extra = k_h + k_w
    pad = (-(head_dim + extra)) % 8
    eye_h = torch.eye(k_h, dtype=k.dtype, device=k.device)
    eye_w = torch.eye(k_w, dtype=k.dtype, device=k.device)
    # Key (r, c) in row-major order -> one-hot of r, one-hot of c.
    ind = torch.cat([eye_h.repeat_interleave(k_w, dim=0), eye_w.repeat(k_h, 1)], dim=1)
    if pad:
        ind = F.pad(ind, (0, pad))
    ind = ind.expand(*k.shape[:-2], k_h * k_w, extra + pad)
    q_parts = [q * scale, rel_h.to(q.dtype), rel_w.to(q.dtype)]
    if pad:
        q_parts.append(q.new_zeros(*q.shape[:-1], pad))
    q_aug = torch.cat(q_parts, dim=-1)
    k_aug = torch.cat([k, ind], dim=-1)
    v_aug = F.pad(v, (0, extra + pad))
    out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)
    return out[..., :head_dim]


# --------------------------------------------------------------------------- modules


class Attention(nn.Module):
    """Multi-head self-attention on a token grid with decomposed relative positions."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        input_size: Optional[Tuple[int, int]] = None,
        attn_impl: str = "sdpa",
    ):
        """
        Args:
            dim: channels C of the (B, H, W, C) input.
            num_heads: attention heads; ``head_dim = C // num_heads``.
            qkv_bias: bias in the qkv projection.
            use_rel_pos: add the decomposed relative-position bias.
            rel_pos_zero_init: zero-initialize ``rel_pos_h`` / ``rel_pos_w``
                (otherwise truncated normal, std 0.02).
            input_size: (H, W) grid the rel-pos tables are sized for; tables
                have shapes (2H - 1, head_dim) and (2W - 1, head_dim). Required
                with ``use_rel_pos``.
            attn_impl: "sdpa" (bias folded into q/k), "sdpa_mask" or "explicit";
                see :func:`attention_rel_pos`.
        """
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos=True")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                trunc_normal_(self.rel_pos_h, std=0.02)
                trunc_normal_(self.rel_pos_w, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: (B, H, W, C) tokens.
        Returns:
            (B, H, W, C).
        """
        B, H, W, C = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        rel_h = rel_w = None
        if self.use_rel_pos:
            rel_h, rel_w = get_decomposed_rel_pos(q, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
        x = attention_rel_pos(q, k, v, rel_h, rel_w, (H, W), self.scale, self.attn_impl)
        x = x.transpose(1, 2).reshape(B, H, W, C)
        return self.proj(x)


class Block(nn.Module):
    """Transformer block with window or global attention on a (B, H, W, C) grid."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: Optional[Tuple[int, int]] = None,
        attn_impl: str = "sdpa",
    ):
        """
        Args:
            dim: channels C.
            num_heads: attention heads.
            mlp_ratio: MLP hidden size / C.
            qkv_bias: bias in the qkv projection.
            drop_path: stochastic-depth rate of this block.
            norm_layer: normalization constructor, called with C.
            act_layer: MLP activation.
            use_rel_pos: decomposed relative-position bias.
            rel_pos_zero_init: zero-init the rel-pos tables.
            window_size: window side in tokens; 0 = global attention.
            input_size: (H, W) token grid of a global block (sizes its rel-pos
                tables); window blocks use (window_size, window_size).
            attn_impl: see :class:`Attention`.
        """
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
            attn_impl=attn_impl,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            H, W = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (H, W))
        x = shortcut + self.drop_path(x)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


def get_abs_pos(pos_embed: torch.Tensor, has_cls_token: bool, hw: Tuple[int, int]) -> torch.Tensor:
    """Absolute position embeddings for a (H, W) grid, resized bicubically if needed.

    Args:
        pos_embed: (1, [1 +] N, C) pretraining-shape table (N a square number).
        has_cls_token: whether ``pos_embed`` starts with a class-token slot (dropped).
        hw: target grid (H, W).
    Returns:
        (1, H, W, C); ``pos_embed`` itself, reshaped, when the grid already matches.
    """
    return resize_pos_embed_grid(pos_embed, hw, num_prefix_tokens=1 if has_cls_token else 0, mode="bicubic")


class ViT(nn.Module):
    """Plain ViT backbone of ViTDet: one stride-16 feature map, no final norm."""

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
        act_layer: Callable[..., nn.Module] = nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        rel_pos_zero_init: bool = True,
        window_size: int = 14,
        window_block_indexes: Sequence[int] = (0, 1, 3, 4, 6, 7, 9, 10),
        pretrain_img_size: int = 224,
        pretrain_use_cls_token: bool = True,
        use_act_checkpoint: bool = False,
        freeze: bool = False,
        freeze_blocks: int = 0,
        attn_impl: str = "sdpa",
        out_feature: str = "last_feat",
    ):
        """
        Args:
            img_size: input side the model is built for; sizes the rel-pos tables
                of the global blocks ((2 * img_size / patch_size - 1, head_dim)).
                Other input sizes work (tables are interpolated).
            patch_size: patch side; inputs need H, W divisible by it.
            in_chans: input channels.
            embed_dim: token channels C.
            depth: number of blocks.
            num_heads: attention heads per block.
            mlp_ratio: MLP hidden size / C.
            qkv_bias: bias in the qkv projections.
            drop_path_rate: stochastic depth, linearly increasing from 0 to this.
            norm_layer: block normalization constructor.
            act_layer: MLP activation.
            use_abs_pos: add absolute position embeddings.
            use_rel_pos: decomposed relative-position bias in every block.
            rel_pos_zero_init: zero-init the rel-pos tables.
            window_size: window side in tokens for window blocks.
            window_block_indexes: indexes of window-attention blocks; the rest
                attend globally.
            pretrain_img_size: image side of pretraining; ``pos_embed`` keeps the
                pretraining shape (1, [1 +] (pretrain_img_size / patch_size)^2, C)
                and is resized to the actual grid in every forward.
            pretrain_use_cls_token: ``pos_embed`` has a class-token slot (unused
                here, kept so MAE / detectron2 checkpoints load unchanged).
            use_act_checkpoint: recompute each block in backward (training only).
            freeze: freeze patch_embed, pos_embed and all blocks; the module then
                stays in eval mode even after ``.train()`` (drop path off).
            freeze_blocks: freeze patch_embed, pos_embed and the first K blocks
                (kept in eval mode). Ignored when ``freeze`` is set.
            attn_impl: "sdpa" (default; rel-pos folded into q/k), "sdpa_mask" or
                "explicit"; see :func:`attention_rel_pos`.
            out_feature: name of the output feature.
        """
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        if not 0 <= freeze_blocks <= depth:
            raise ValueError(f"freeze_blocks must be in [0, depth={depth}], got {freeze_blocks}")
        bad = [i for i in window_block_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"window_block_indexes {bad} out of range for depth {depth}")
        self.pretrain_use_cls_token = pretrain_use_cls_token
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.use_act_checkpoint = use_act_checkpoint

        self.patch_embed = PatchEmbed(
            img_size=None,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            flatten=False,
            output_fmt="NHWC",
            strict_img_size=False,
        )

        if use_abs_pos:
            num_patches = (pretrain_img_size // patch_size) * (pretrain_img_size // patch_size)
            num_positions = (num_patches + 1) if pretrain_use_cls_token else num_patches
            self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, embed_dim))
        else:
            self.pos_embed = None

        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth)]
        window_set = set(int(i) for i in window_block_indexes)
        self.blocks = nn.ModuleList()
        for i in range(depth):
            self.blocks.append(
                Block(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=dpr[i],
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    use_rel_pos=use_rel_pos,
                    rel_pos_zero_init=rel_pos_zero_init,
                    window_size=window_size if i in window_set else 0,
                    input_size=(img_size // patch_size, img_size // patch_size),
                    attn_impl=attn_impl,
                )
            )

        self._out_features = [out_feature]
        self._out_feature_channels = {out_feature: embed_dim}
        self._out_feature_strides = {out_feature: patch_size}
        self.out_channels = embed_dim
        self.size_divisibility = patch_size

        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

        self.freeze = bool(freeze)
        self.freeze_blocks = depth if self.freeze else int(freeze_blocks)
        self._freeze_stages()

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def _frozen_modules(self):
        if self.freeze_blocks <= 0:
            return []
        return [self.patch_embed] + list(self.blocks[: self.freeze_blocks])

    def _freeze_stages(self) -> None:
        if self.freeze_blocks <= 0:
            return
        if self.pos_embed is not None:
            self.pos_embed.requires_grad_(False)
        for m in self._frozen_modules():
            m.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> "ViT":
        """Set train/eval mode; frozen parts always stay in eval mode."""
        super().train(mode)
        if self.freeze:
            super().train(False)
        else:
            for m in self._frozen_modules():
                m.eval()
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (B, in_chans, H, W) normalized images, H and W divisible by ``patch_size``.
        Returns:
            {out_feature: (B, embed_dim, H / patch_size, W / patch_size)}.
        """
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(
                f"ViT input size {H}x{W} is not divisible by the patch size {self.patch_size}"
            )
        x = self.patch_embed(x)  # (B, h, w, C)
        if self.pos_embed is not None:
            x = x + get_abs_pos(self.pos_embed, self.pretrain_use_cls_token, (x.shape[1], x.shape[2]))
        for blk in self.blocks:
            if self.use_act_checkpoint and self.training and torch.is_grad_enabled() and (
                x.requires_grad or any(p.requires_grad for p in blk.parameters())
            ):
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return {self._out_features[0]: x.permute(0, 3, 1, 2)}


_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")


def get_vit_layer_id(name: str, num_layers: int, prefix: str = "backbone.net.") -> int:
    """Layer index of a parameter for layer-wise learning-rate decay (ViTDet / BEiT).

    The part of ``name`` after the first occurrence of ``prefix`` (the ViT
    module's name inside the whole model; "" for a bare :class:`ViT`) is
    classified: ``patch_embed.*`` / ``pos_embed`` / ``cls_token`` -> 0,
    ``blocks.{i}.*`` -> i + 1, anything else -> ``num_layers + 1``. Names that
    do not contain ``prefix`` (pyramid, RPN, RoI heads) get ``num_layers + 1``.
    A wrapper prefix before ``prefix`` (e.g. DDP's ``module.``) is allowed, and
    ``torch.compile``'s ``_orig_mod.`` component is ignored
    ("backbone.net._orig_mod.blocks.0.x" -> 1).

    Args:
        name: parameter name, e.g. "backbone.net.blocks.3.attn.qkv.weight".
        num_layers: ViT depth.
        prefix: name of the ViT inside the model, with a trailing dot.
    Returns:
        int in [0, num_layers + 1]; the lr scale is ``decay ** (num_layers + 1 - id)``.
    """
    # torch.compile wraps a module as ``_orig_mod``; DDP as ``module``.
    name = name.replace("._orig_mod.", ".").replace("_orig_mod.", "")
    if prefix:
        idx = name.find(prefix)
        if idx < 0:
            return num_layers + 1
        rest = name[idx + len(prefix):]
    else:
        rest = name
    if rest.startswith(("patch_embed.", "pos_embed", "cls_token")):
        return 0
    m = _BLOCK_RE.match(rest)
    if m:
        return int(m.group(1)) + 1
    return num_layers + 1
