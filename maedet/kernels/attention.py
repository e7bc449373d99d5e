"""Attention with ViTDet's decomposed relative-position bias: the reference and the fast paths.

:func:`rel_pos_attention` computes ``softmax(scale * q k^T + bias) v`` where the bias of
query (i, j) and key (k, l) is ``rel_h[(i, j), k] + rel_w[(i, j), l]`` (MViTv2 /
detectron2's ViTDet). The reference (:func:`attention_reference`) writes it out as
detectron2 does. The fast paths (:mod:`maedet.kernels` switch) never keep a
tokens x tokens matrix: on CPU the scores are computed tile by tile with their own
backward (:class:`_PackedRelPosAttention`); on other devices the bias is folded into
the query and key of one fused SDPA call (:func:`_folded_sdpa`).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from maedet.kernels import fast_enabled

__all__ = ["get_rel_pos", "get_decomposed_rel_pos", "attention_reference", "rel_pos_attention"]


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


# Elements of one score tile of the CPU path (fp32: 8 MB). A global block's scores
# (heads x N x N: 12 x 4096 x 4096 for ViT-B at 1024) are never materialized: each
# head's queries are taken in chunks of ``tile // N`` rows, so that the GEMMs of a
# tile are single large matrix products (512 x 4096 scores for ViT-B, rather than
# batches of small per-head products). Small attention problems
# (windows: 196 x 196 per head) go by groups of whole heads of a quarter tile, which
# stay in cache between the passes over a tile. Tiles are also kept under glibc's
# mmap threshold (32 MB): larger blocks are mapped and unmapped on every allocation
# and their page faults cost more than the arithmetic.
_CPU_TILE_ELEMENTS = 1 << 21


# log2(e): the CPU kernels form their scores in base 2 and exponentiate with exp2.
_LOG2E = 1.4426950408889634


def _base2(scale: float, *terms: torch.Tensor):
    """``scale`` and the bias terms multiplied by log2(e) (scores in base 2)."""
    return (scale * _LOG2E,) + tuple(t * _LOG2E for t in terms)


def _tiles(rows: int, n: int, n_keys: int) -> List[Tuple[int, int, int, int]]:
    """(row start, row end, query start, query end) of each tile of a (rows x n x n_keys) score tensor.

    ``rows`` is batch x heads. When one row's scores exceed a tile, a tile is one
    row and a chunk of its queries (the last chunk may be shorter); otherwise a tile
    is a group of whole rows of at most a quarter tile.
    """
    if n * n_keys * 4 <= _CPU_TILE_ELEMENTS:
        g = max(1, _CPU_TILE_ELEMENTS // (4 * n * n_keys))
        return [(r, min(r + g, rows), 0, n) for r in range(0, rows, g)]
    c = max(1, _CPU_TILE_ELEMENTS // n_keys)
    return [(r, r + 1, s, min(s + c, n)) for r in range(rows) for s in range(0, n, c)]


def _tile_buffer(ref: torch.Tensor, tiles, n_keys: int) -> torch.Tensor:
    """One flat buffer that holds the largest tile (allocated once per call, filled in place)."""
    return ref.new_empty(max((r1 - r0) * (e - s) for r0, r1, s, e in tiles) * n_keys)


def _biased_scores(buf, q, kt, rel_h, rel_w, scale, r0, r1, s, e) -> torch.Tensor:
    """``scale q k^T + rel_h[..., :, None] + rel_w[..., None, :]`` of one tile, written into ``buf``."""
    g, c, n_keys = r1 - r0, e - s, kt.shape[-1]
    k_h, k_w = rel_h.shape[-1], rel_w.shape[-1]
    p = buf[: g * c * n_keys].view(g, c, n_keys)
    torch.add(rel_h[r0:r1, s:e, :, None], rel_w[r0:r1, s:e, None, :], out=p.view(g, c, k_h, k_w))
    return p.baddbmm_(q[r0:r1, s:e], kt[r0:r1], alpha=scale)


def _tiled_forward(q, k, v, rel_h, rel_w, scale: float, want_lse: bool):
    """``softmax(scale q k^T + bias) v`` tile by tile on (rows, N, d) tensors.

    The scores are in base 2: ``scale``, ``rel_h`` and ``rel_w`` come multiplied by
    log2(e) (:func:`_base2`), so that the tile's exponentials are ``exp2``, about
    twice as fast as ``exp`` on a CPU, with the same probabilities up to float
    rounding. Each tile's probabilities are ``2 ** (s - max)`` left unnormalized:
    the row sums divide the (tile x d) output instead of the (tile x N)
    probabilities (one pass less over the tile). With ``want_lse`` the base-2
    log-sum-exp of every score row is returned too, from which backward
    recomputes the probabilities in one pass.
    """
    rows, n, _ = q.shape
    n_keys = k.shape[1]
    tiles = _tiles(rows, n, n_keys)
    buf = _tile_buffer(q, tiles, n_keys)
    out = q.new_empty(rows, n, v.shape[-1])
    lse = q.new_empty(rows, n, 1) if want_lse else None
    kt = k.transpose(1, 2)
    for r0, r1, s, e in tiles:
        p = _biased_scores(buf, q, kt, rel_h, rel_w, scale, r0, r1, s, e)
        row_max = p.amax(-1, keepdim=True)
        p.sub_(row_max).exp2_()
        row_sum = p.sum(-1, keepdim=True)
        o = out[r0:r1, s:e]
        torch.bmm(p, v[r0:r1], out=o)
        o.div_(row_sum)
        if want_lse:
            lse[r0:r1, s:e] = row_max + row_sum.log2()
    return out, lse


def _tiled_backward(q, k, v, rel_h, rel_w, out, lse, dout, scale: float, dq, dk, dv):
    """Gradients of :func:`_tiled_forward` (with ``want_lse``), tile by tile, on (rows, N, d)
    tensors. ``rel_h``, ``rel_w`` and ``lse`` are in base 2 as there; ``scale`` is the
    plain one (the gradients are those of the natural scores). Writes dq, dk, dv
    (given, any contents) and returns (drel_h, drel_w)."""
    rows, n, _ = q.shape
    n_keys = k.shape[1]
    k_h, k_w = rel_h.shape[-1], rel_w.shape[-1]
    delta = (dout * out).sum(-1, keepdim=True)  # rowsum(dP * P) = dO . O
    rh_lse = rel_h - lse
    dk.zero_()
    dv.zero_()
    drel_h, drel_w = torch.empty_like(rel_h), torch.empty_like(rel_w)
    kt, vt = k.transpose(1, 2), v.transpose(1, 2)
    tiles = _tiles(rows, n, n_keys)
    probs_buf, grad_buf = _tile_buffer(q, tiles, n_keys), _tile_buffer(q, tiles, n_keys)
    scale2 = scale * _LOG2E
    for r0, r1, s, e in tiles:
        g, c = r1 - r0, e - s
        p = _biased_scores(probs_buf, q, kt, rh_lse, rel_w, scale2, r0, r1, s, e).exp2_()
        doc = dout[r0:r1, s:e]
        dv[r0:r1].baddbmm_(p.transpose(1, 2), doc)
        ds = grad_buf[: g * c * n_keys].view(g, c, n_keys)
        torch.bmm(doc, vt[r0:r1], out=ds)
        ds.sub_(delta[r0:r1, s:e]).mul_(p)
        ds4 = ds.view(g, c, k_h, k_w)
        torch.sum(ds4, -1, out=drel_h[r0:r1, s:e])
        torch.sum(ds4, -2, out=drel_w[r0:r1, s:e])
        torch.bmm(ds, k[r0:r1], out=dq[r0:r1, s:e])
        dk[r0:r1].baddbmm_(ds.transpose(1, 2), q[r0:r1, s:e])
    dq.mul_(scale)
    dk.mul_(scale)
    return drel_h, drel_w


def _rel_terms(q4: torch.Tensor, Rh: torch.Tensor, Rw: torch.Tensor):
    """(rows, q_h, q_w, d) queries -> rel_h (rows, N, k_h), rel_w (rows, N, k_w)."""
    rows, q_h, q_w, _ = q4.shape
    rel_h = torch.einsum("bhwc,hkc->bhwk", q4, Rh).reshape(rows, q_h * q_w, -1)
    rel_w = torch.einsum("bhwc,wkc->bhwk", q4, Rw).reshape(rows, q_h * q_w, -1)
    return rel_h, rel_w


def _packed_forward(qkv, Rh, Rw, scale: float, want_lse: bool):
    """:func:`_tiled_forward` on packed (3, B, heads, N, d) q, k, v, the rel-pos terms
    formed from the (q_h, k_h, d) / (q_w, k_w, d) tables; returns (rows, N, d) outputs."""
    acc = torch.promote_types(qkv.dtype, torch.float32)
    _, B, heads, n, d = qkv.shape
    q, k, v = qkv.to(acc).reshape(3, B * heads, n, d).unbind(0)
    scale2, Rh2, Rw2 = _base2(scale, Rh.to(acc), Rw.to(acc))
    rh, rw = _rel_terms(q.view(-1, Rh.shape[0], Rw.shape[0], d), Rh2, Rw2)
    return _tiled_forward(q, k, v, rh, rw, scale2, want_lse)


class _PackedRelPosAttention(torch.autograd.Function):
    """The CPU tiled attention on packed q, k, v (:func:`maedet.kernels.window_layout.partition_heads`),
    with the rel-pos terms formed inside from the per-axis tables ``Rh``, ``Rw``.

    Taking q, k, v as one tensor, the backward writes dq, dk, dv straight into one
    gradient tensor (no stacking of three), and the rel-pos terms are recomputed
    (a small product) instead of kept.
    """

    @staticmethod
    def forward(ctx, qkv, Rh, Rw, scale):
        out, lse = _packed_forward(qkv, Rh, Rw, scale, want_lse=True)
        ctx.save_for_backward(qkv, Rh, Rw, out, lse)
        ctx.scale = scale
        return out.view(qkv.shape[1:]).to(qkv.dtype)

    @staticmethod
    def backward(ctx, dout):
        qkv, Rh, Rw, out, lse = ctx.saved_tensors
        acc = out.dtype
        _, B, heads, n, d = qkv.shape
        t = qkv.to(acc).reshape(3, B * heads, n, d)
        q, k, v = t.unbind(0)
        Rh_, Rw_ = Rh.to(acc), Rw.to(acc)
        q4 = q.view(-1, Rh.shape[0], Rw.shape[0], d)
        rh, rw = _rel_terms(q4, *_base2(ctx.scale, Rh_, Rw_)[1:])
        dt = torch.empty_like(t)
        dq, dk, dv = dt.unbind(0)
        do3 = dout.to(acc).reshape(B * heads, n, d)
        drh, drw = _tiled_backward(q, k, v, rh, rw, out, lse, do3, ctx.scale, dq, dk, dv)
        drh4, drw4 = drh.view(*q4.shape[:3], -1), drw.view(*q4.shape[:3], -1)
        dq.view_as(q4).add_(torch.einsum("bhwk,hkc->bhwc", drh4, Rh_)).add_(torch.einsum("bhwk,wkc->bhwc", drw4, Rw_))
        dRh = torch.einsum("bhwk,bhwc->hkc", drh4, q4).to(Rh.dtype)
        dRw = torch.einsum("bhwk,bhwc->wkc", drw4, q4).to(Rw.dtype)
        return dt.view(qkv.shape).to(qkv.dtype), dRh, dRw, None


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: Optional[torch.Tensor],
    rel_w: Optional[torch.Tensor],
    k_size: Tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """detectron2's ``Attention``: scores, decomposed rel-pos bias, softmax, weighted sum.

    Args:
        q, k, v: (B, heads, N, head_dim), N = k_h * k_w (self-attention on a grid).
        rel_h: (B, heads, N, k_h) or None (no rel-pos bias); rel_w: (B, heads, N, k_w) or None.
        k_size: (k_h, k_w) key grid.
        scale: multiplier of ``q . k`` (usually ``head_dim ** -0.5``).
    Returns:
        (B, heads, N, head_dim).
    """
    attn = (q * scale) @ k.transpose(-2, -1)
    if rel_h is not None:
        k_h, k_w = k_size
        attn = (attn.unflatten(-1, (k_h, k_w)) + rel_h[..., :, None] + rel_w[..., None, :]).flatten(-2)
    return attn.softmax(dim=-1) @ v


def _folded_sdpa(q, k, v, rel_h, rel_w, k_size: Tuple[int, int], scale: float) -> torch.Tensor:
    """The rel-pos bias folded into one fused SDPA call (the fast path off the CPU).

    The bias of key (k, l) is a row term plus a column term, so appending ``rel_h`` and
    ``rel_w`` to the pre-scaled query and one-hot row / column indicators to the key
    gives ``q' . k' = scale * q.k + rel_h[k] + rel_w[l]``. The value is zero-padded to
    the same head size (the fused kernels need equal q / v head sizes; all three go to
    a multiple of 8), SDPA runs with ``scale=1`` and the padding is dropped. On a CPU
    the longer head (64 -> 192 for a ViT-B global block at 1024) would triple the GEMM
    work, hence the tiled kernel there.
    """
    k_h, k_w = k_size
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


def rel_pos_attention(
    qkv: torch.Tensor,
    rel_pos_h: Optional[torch.Tensor],
    rel_pos_w: Optional[torch.Tensor],
    q_size: Tuple[int, int],
    scale: float,
) -> torch.Tensor:
    """Self-attention of packed q, k, v with the decomposed rel-pos bias of a block's tables.

    Args:
        qkv: (3, B, heads, N, head_dim), N = q_h * q_w (:func:`maedet.kernels.window_layout.partition_heads`).
        rel_pos_h, rel_pos_w: the block's (L, head_dim) tables, or None (no rel-pos bias).
        q_size: (q_h, q_w) token grid of one window.
        scale: multiplier of ``q . k``.
    Returns:
        (B, heads, N, head_dim).
    """
    if fast_enabled():
        if rel_pos_h is not None and qkv.device.type == "cpu":
            q_h, q_w = q_size
            Rh, Rw = get_rel_pos(q_h, q_h, rel_pos_h), get_rel_pos(q_w, q_w, rel_pos_w)
            if torch.is_grad_enabled() and any(t.requires_grad for t in (qkv, Rh, Rw)):
                return _PackedRelPosAttention.apply(qkv, Rh, Rw, float(scale))
            out, _ = _packed_forward(qkv, Rh, Rw, float(scale), want_lse=False)
            return out.view(qkv.shape[1:]).to(qkv.dtype)
        q, k, v = qkv.unbind(0)
        if rel_pos_h is None:
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        rel_h, rel_w = get_decomposed_rel_pos(q, rel_pos_h, rel_pos_w, q_size, q_size)
        return _folded_sdpa(q, k, v, rel_h, rel_w, q_size, scale)
    q, k, v = qkv.unbind(0)
    rel_h = rel_w = None
    if rel_pos_h is not None:
        rel_h, rel_w = get_decomposed_rel_pos(q, rel_pos_h, rel_pos_w, q_size, q_size)
    return attention_reference(q, k, v, rel_h, rel_w, q_size, scale)
