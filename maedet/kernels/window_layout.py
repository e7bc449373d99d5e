"""Token grid <-> per-head windows: detectron2's ``window_partition`` and its fast path.

A ViTDet block's attention needs q, k and v as (windows x heads, tokens, head_dim)
matrices, and its output back as a (B, H, W, C) grid. The reference writes it as
detectron2 does (pad, :func:`window_partition`, reshape / permute), which makes five
copies of the qkv tensor forward and as many backward; the fast path
(:class:`_QKVToHeads`, :class:`_HeadsToGrid`) makes one each way.

The padding follows detectron2's ViTDet: the token grid is zero-padded to whole
windows *before* the qkv projection, so a padding token's q, k and v are the
projection's bias (:func:`partition_heads` ``pad``), and its gradient reaches the
bias only. A global block is one window of the whole (H, W) grid, without padding.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

from maedet.kernels import fast_enabled

__all__ = ["window_partition", "window_unpartition", "partition_heads", "unpartition_heads", "window_grid"]

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


def window_partition(x: torch.Tensor, window_size: int) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Split a token grid into non-overlapping windows, zero-padding if needed (detectron2).

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
    """Inverse of :func:`window_partition`: reassemble windows and drop the padding (detectron2).

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


def partition_heads(qkv: torch.Tensor, num_heads: int, window_size: int, pad: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, H, W, 3C) qkv projection -> (3, B * windows, heads, window tokens, head_dim).

    Windows of ``window_size x window_size`` tokens in row-major order per image
    (:func:`window_partition`), tokens row-major inside a window; ``window_size=0`` for
    one window of the whole grid (global attention). The grid is padded to whole
    windows with ``pad`` (the (3C,) qkv bias; None: zeros), whose gradient is the sum
    over the padding tokens.
    """
    window = window_size or None
    if fast_enabled():
        return _QKVToHeads.apply(qkv, pad, num_heads, window)
    B, H, W, C3 = qkv.shape
    if window:
        Hp, Wp = -(-H // window) * window, -(-W // window) * window
        if (Hp, Wp) != (H, W):
            fill = pad.to(qkv.dtype) if pad is not None else qkv.new_zeros(C3)
            qkv = torch.cat([qkv, fill.expand(B, H, Wp - W, C3)], dim=2)
            qkv = torch.cat([qkv, fill.expand(B, Hp - H, Wp, C3)], dim=1)
        qkv, _ = window_partition(qkv, window)
    tokens = qkv.shape[1] * qkv.shape[2]
    return qkv.reshape(qkv.shape[0], tokens, 3, num_heads, -1).permute(2, 0, 3, 1, 4)


def unpartition_heads(x: torch.Tensor, hw: Tuple[int, int], window_size: int) -> torch.Tensor:
    """(B * windows, heads, window tokens, head_dim) -> (B, H, W, heads * head_dim),
    the inverse layout of :func:`partition_heads` without the padding tokens."""
    window = window_size or None
    if fast_enabled():
        return _HeadsToGrid.apply(x, tuple(hw), window)
    H, W = hw
    wh, ww, nh, nw = window_grid((H, W), window)
    n, heads, _, hd = x.shape
    x = x.permute(0, 2, 1, 3).reshape(n, wh, ww, heads * hd)
    if window:
        return window_unpartition(x, window, (nh * wh, nw * ww), (H, W))
    return x
