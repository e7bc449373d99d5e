"""Attention with ViTDet's decomposed relative-position bias, and its fast kernels.

``attention_rel_pos`` computes ``softmax(scale * q k^T + bias) v`` where the bias of
query (i, j) and key (k, l) is ``rel_h[(i, j), k] + rel_w[(i, j), l]`` (MViTv2 /
detectron2's ViTDet), with three implementations that agree to float precision:
``sdpa`` (default; never keeps a tokens x tokens matrix), ``sdpa_mask`` and
``explicit`` (the reference). See :func:`attention_rel_pos` for how each works.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "ATTN_IMPLS",
    "get_rel_pos",
    "get_decomposed_rel_pos",
    "attention_rel_pos",
    "window_partition",
    "window_unpartition",
]

ATTN_IMPLS = ("sdpa", "sdpa_mask", "explicit")


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


def _rel_pos_bias(rel_h: torch.Tensor, rel_w: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(..., n, k_h) + (..., n, k_w) -> (..., n, k_h * k_w) additive bias (row-major keys).

    ``out``: a (..., n, k_h, k_w) buffer to write into (reused across chunks, see
    :func:`_chunked_sdpa_forward`)."""
    if out is None:
        return (rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    return torch.add(rel_h[..., :, None], rel_w[..., None, :], out=out).flatten(-2)


def _query_chunk(q: torch.Tensor, n_keys: int) -> int:
    rows = max(1, q.numel() // max(1, q.shape[-2] * q.shape[-1]))  # batch x heads
    return max(1, min(q.shape[-2], _CPU_CHUNK_ELEMENTS // (rows * n_keys)))


def _chunks(n: int, chunk: int):
    """(start, end) of each query chunk; the last one may be shorter."""
    return [(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def _chunked_sdpa_forward(q, k, v, rel_h, rel_w, scale: float, chunk: int) -> torch.Tensor:
    """SDPA over query chunks with the chunk's (chunk x N) bias as ``attn_mask`` (no grad).

    The bias is written into one buffer reused by every chunk: a fresh 16 MB tensor
    per chunk is a fresh ``mmap`` whose page faults cost as much as filling it.
    """
    n = q.shape[-2]
    lead, k_h, k_w = rel_h.shape[:-2], rel_h.shape[-1], rel_w.shape[-1]
    if chunk >= n:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=_rel_pos_bias(rel_h, rel_w), scale=scale)
    out = torch.empty_like(q)
    buf = rel_h.new_empty(*lead, chunk, k_h, k_w)
    for s, e in _chunks(n, chunk):
        mask = _rel_pos_bias(rel_h[..., s:e, :], rel_w[..., s:e, :], buf if e - s == chunk else None)
        out[..., s:e, :] = F.scaled_dot_product_attention(q[..., s:e, :], k, v, attn_mask=mask, scale=scale)
    return out


class _ChunkedRelPosAttention(torch.autograd.Function):
    """``softmax(scale q k^T + bias) v`` that keeps no (N x N) tensor for backward.

    Forward: SDPA (CPU flash kernel, head size unchanged) over query chunks with
    the chunk's bias as mask. Backward: per query chunk, recompute the
    probabilities and form the gradients with plain GEMMs (flash-attention
    style recomputation, but over whole key rows, so no running softmax is
    needed); the rel-pos gradients are the row / column sums of dS. The two
    (chunk x N) matrices of a chunk live in two buffers allocated once per call
    and filled in place (``out=`` GEMMs, in-place softmax), and dK, dV accumulate
    in place (``baddbmm_``). Low-precision inputs (autocast) are computed in
    float32 and their gradients returned in their dtype.
    """

    @staticmethod
    def forward(ctx, q, k, v, rel_h, rel_w, scale, chunk):
        out = _chunked_sdpa_forward(q, k, v, rel_h, rel_w, scale, chunk)
        ctx.save_for_backward(q, k, v, rel_h, rel_w, out)
        ctx.scale, ctx.chunk = scale, chunk
        return out

    @staticmethod
    def backward(ctx, dout):
        saved = ctx.saved_tensors
        dtypes = [t.dtype for t in saved[:5]]
        acc = torch.promote_types(saved[0].dtype, torch.float32)
        q, k, v, rel_h, rel_w, out = (t.to(acc) for t in saved)
        scale, chunk = ctx.scale, ctx.chunk
        n, d = q.shape[-2], q.shape[-1]
        k_h, k_w = rel_h.shape[-1], rel_w.shape[-1]
        bh = q.numel() // (n * d)  # batch x heads, flattened for the 3-d (b)mm calls
        qs = (q * scale).reshape(bh, n, d)
        k3, v3 = k.reshape(bh, -1, d), v.reshape(bh, -1, v.shape[-1])
        do3 = dout.to(acc).reshape(bh, n, -1)
        rel_h3, rel_w3 = rel_h.reshape(bh, n, k_h), rel_w.reshape(bh, n, k_w)
        n_keys = k3.shape[1]
        dq = torch.empty_like(qs)
        dk, dv = torch.zeros_like(k3), torch.zeros_like(v3)
        drel_h, drel_w = torch.empty_like(rel_h3), torch.empty_like(rel_w3)
        delta = (do3 * out.reshape(bh, n, -1)).sum(-1, keepdim=True)  # rowsum(dP * P) = dO . O
        kt, vt = k3.transpose(1, 2), v3.transpose(1, 2)
        probs_buf = q.new_empty(bh, chunk, n_keys)
        grad_buf = q.new_empty(bh, chunk, n_keys)
        for s, e in _chunks(n, chunk):
            full = e - s == chunk
            qc, doc = qs[:, s:e], do3[:, s:e]
            p = torch.bmm(qc, kt, out=probs_buf) if full else torch.bmm(qc, kt)
            p4 = p.view(bh, e - s, k_h, k_w)
            p4.add_(rel_h3[:, s:e, :, None]).add_(rel_w3[:, s:e, None, :])
            torch._softmax(p, -1, False, out=p)
            dv.baddbmm_(p.transpose(1, 2), doc)
            ds = torch.bmm(doc, vt, out=grad_buf) if full else torch.bmm(doc, vt)
            ds.sub_(delta[:, s:e]).mul_(p)  # dS = P * (dP - delta)
            ds4 = ds.view(bh, e - s, k_h, k_w)
            torch.sum(ds4, -1, out=drel_h[:, s:e])
            torch.sum(ds4, -2, out=drel_w[:, s:e])
            torch.bmm(ds, k3, out=dq[:, s:e])
            dk.baddbmm_(ds.transpose(1, 2), qc)
        dq.mul_(scale)  # dk: q was pre-scaled, so dS^T (scale q) is already scale dS^T q
        grads = (dq, dk, dv, drel_h, drel_w)
        shapes = [t.shape for t in saved[:5]]
        dq, dk, dv, drel_h, drel_w = (g.reshape(sh).to(dt) for g, sh, dt in zip(grads, shapes, dtypes))
        return dq, dk, dv, drel_h, drel_w, None, None


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
            attn = (attn.unflatten(-1, (k_h, k_w)) + rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
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
