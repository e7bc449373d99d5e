"""Token grid <-> per-head windows, each way in one copy.

A ViTDet block's attention needs q, k and v as (windows x heads, tokens, head_dim)
matrices, and its output back as a (B, H, W, C) grid. Written with ``F.pad``,
``window_partition``, ``reshape`` / ``permute`` and ``unbind``, the forward makes
five copies of the qkv tensor and the backward as many again (ViT-B at 1024 on 2
CPU cores: ~0.3 s per window block per training step, docs/BENCHMARKS.md).
:func:`qkv_to_heads` and :func:`heads_to_grid` make one each way.

The padding follows detectron2's ViTDet: the token grid is zero-padded to whole
windows *before* the qkv projection, so a padding token's q, k and v are the
projection's bias (:func:`qkv_to_heads` ``pad``), and its gradient reaches the
bias only. A global block is one window of the whole (H, W) grid, without padding.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch

__all__ = ["qkv_to_heads", "heads_to_grid", "window_grid"]

Index = Tuple[object, ...]


def window_grid(hw: Tuple[int, int], window: Optional[int]) -> Tuple[int, int, int, int]:
    """(window height, window width, windows down, windows across) of an (H, W) grid;
    ``window=None``: one window of the whole grid (global attention)."""
    H, W = hw
    if not window:
        return H, W, 1, 1
    return window, window, -(-H // window), -(-W // window)


def _axis(n: int, w: int) -> List[Tuple[Index, slice, bool]]:
    """Pieces of one axis of n tokens in windows of w: (window index, within-window
    index), the token range, and whether the piece is whole windows (to unflatten)."""
    full, part = divmod(n, w)
    pieces: List[Tuple[Index, slice, bool]] = []
    if full:
        pieces.append(((slice(0, full), slice(None)), slice(0, full * w), True))
    if part:
        pieces.append(((full, slice(0, part)), slice(full * w, n), False))
    return pieces


def _regions(H: int, W: int, wh: int, ww: int) -> Iterator[Tuple[Index, Index, Tuple[int, ...]]]:
    """(index into the (B, nh, wh, nw, ww, ...) window view, index into the (B, H, W, ...)
    grid, split of the grid piece's H / W axes into windows) covering the H x W tokens."""
    for ya, yb, ysplit in _axis(H, wh):
        for xa, xb, xsplit in _axis(W, ww):
            yield (slice(None),) + ya + xa, (slice(None), yb, xb), (ysplit, xsplit)


def _pad_regions(H: int, W: int, wh: int, ww: int, nh: int, nw: int) -> List[Index]:
    """Disjoint indexes into the window view covering the padding tokens."""
    ph, pw = H - (nh - 1) * wh, W - (nw - 1) * ww  # tokens in the last window row / column
    out: List[Index] = []
    if ph < wh:  # rows below the grid, every column
        out.append((slice(None), nh - 1, slice(ph, None)))
    if pw < ww:  # columns right of the grid, rows inside it
        out.append((slice(None), slice(0, nh - 1), slice(None), nw - 1, slice(pw, None)))
        out.append((slice(None), nh - 1, slice(0, min(ph, wh)), nw - 1, slice(pw, None)))
    return out


def _piece(grid_part: torch.Tensor, split: Tuple[bool, bool], wh: int, ww: int) -> torch.Tensor:
    """A (B, h, w, ...) grid piece viewed with its axes split into windows where whole."""
    ysplit, xsplit = split
    if xsplit:
        grid_part = grid_part.unflatten(2, (-1, ww))
    if ysplit:
        grid_part = grid_part.unflatten(1, (-1, wh))
    return grid_part


def _window_view(t: torch.Tensor, B: int, nh: int, nw: int, wh: int, ww: int, lead: int) -> torch.Tensor:
    """(lead?, B*nh*nw, heads, wh*ww, hd) -> (B, nh, wh, nw, ww, lead?, heads, hd) view."""
    heads, hd = t.shape[-3], t.shape[-1]
    if lead:
        return t.view(lead, B, nh, nw, heads, wh, ww, hd).permute(1, 2, 5, 3, 6, 0, 4, 7)
    return t.view(B, nh, nw, heads, wh, ww, hd).permute(0, 1, 4, 2, 5, 3, 6)


class _QKVToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, pad, heads: int, window: Optional[int]):
        B, H, W, C3 = (int(v) for v in qkv.shape)  # ints also under jit tracing (fvcore)
        wh, ww, nh, nw = window_grid((H, W), window)
        hd = C3 // 3 // heads
        out = qkv.new_empty(3, B * nh * nw, heads, wh * ww, hd)
        view = _window_view(out, B, nh, nw, wh, ww, 3)
        src = qkv.view(B, H, W, 3, heads, hd)
        for wi, gi, split in _regions(H, W, wh, ww):
            view[wi].copy_(_piece(src[gi], split, wh, ww))
        fill = pad.to(qkv.dtype).view(3, heads, hd) if pad is not None else 0.0
        for wi in _pad_regions(H, W, wh, ww, nh, nw):
            view[wi] = fill
        ctx.dims = (B, H, W, heads, hd, wh, ww, nh, nw)
        ctx.has_pad = pad is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        B, H, W, heads, hd, wh, ww, nh, nw = ctx.dims
        grad = grad.contiguous()
        view = _window_view(grad, B, nh, nw, wh, ww, 3)
        dqkv = grad.new_empty(B, H, W, 3, heads, hd)
        for wi, gi, split in _regions(H, W, wh, ww):
            _piece(dqkv[gi], split, wh, ww).copy_(view[wi])
        dpad = None
        if ctx.has_pad and ctx.needs_input_grad[1]:
            dpad = grad.new_zeros(3, heads, hd)
            for wi in _pad_regions(H, W, wh, ww, nh, nw):
                part = view[wi]
                dpad += part.reshape(-1, 3, heads, hd).sum(0)
            dpad = dpad.view(-1)
        return dqkv.view(B, H, W, 3 * heads * hd), dpad, None, None


class _HeadsToGrid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, hw: Tuple[int, int], window: Optional[int]):
        H, W = int(hw[0]), int(hw[1])  # ints also under jit tracing (fvcore)
        wh, ww, nh, nw = window_grid((H, W), window)
        heads, hd = int(x.shape[-3]), int(x.shape[-1])
        B = int(x.shape[0]) // (nh * nw)
        view = _window_view(x, B, nh, nw, wh, ww, 0)
        out = x.new_empty(B, H, W, heads, hd)
        for wi, gi, split in _regions(H, W, wh, ww):
            _piece(out[gi], split, wh, ww).copy_(view[wi])
        ctx.dims = (B, H, W, heads, hd, wh, ww, nh, nw)
        return out.view(B, H, W, heads * hd)

    @staticmethod
    def backward(ctx, grad):
        B, H, W, heads, hd, wh, ww, nh, nw = ctx.dims
        src = grad.reshape(B, H, W, heads, hd)
        dx = grad.new_empty(B * nh * nw, heads, wh * ww, hd)
        view = _window_view(dx, B, nh, nw, wh, ww, 0)
        for wi, gi, split in _regions(H, W, wh, ww):
            view[wi].copy_(_piece(src[gi], split, wh, ww))
        for wi in _pad_regions(H, W, wh, ww, nh, nw):
            view[wi] = 0.0  # the padding tokens' outputs are dropped
        return dx, None, None


def qkv_to_heads(qkv: torch.Tensor, heads: int, window: Optional[int], pad: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, H, W, 3C) qkv projection -> (3, B * windows, heads, window tokens, head_dim).

    Windows of ``window x window`` tokens in row-major order per image (detectron2's
    ``window_partition``), tokens row-major inside a window; ``window=None`` for one
    window of the whole grid. The grid is padded to whole windows with ``pad`` (the
    (3C,) qkv bias; None: zeros), whose gradient is the sum over the padding tokens.
    """
    return _QKVToHeads.apply(qkv, pad, heads, window)


def heads_to_grid(x: torch.Tensor, hw: Tuple[int, int], window: Optional[int]) -> torch.Tensor:
    """(B * windows, heads, window tokens, head_dim) -> (B, H, W, heads * head_dim),
    the inverse layout of :func:`qkv_to_heads` without the padding tokens."""
    return _HeadsToGrid.apply(x, tuple(hw), window)
