"""Pasting RoI mask probabilities into the image, as detectron2's ``paste_masks_in_image``.

Each M x M mask covers its box: pixel (x, y) of the image (centre ``x + 0.5``)
samples the mask at ``((x + 0.5 - x0) / (x1 - x0)) * 2 - 1`` in ``grid_sample``'s
normalized coordinates (``align_corners=False``, bilinear, zeros outside), and the
result is thresholded (``>= threshold``). torchvision instead resizes the mask
into a box grown by one mask pixel, which moves mask borders by up to a pixel.

Memory stays bounded by the boxes, not the image: each mask is sampled only over
its box (plus one pixel), as detectron2's CPU path does; the values outside are
below any threshold > 0 by construction.
"""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.nn.functional as F

__all__ = ["paste_mask", "paste_masks_in_image", "iter_pasted_masks", "encode_rle"]


def paste_mask(
    mask: torch.Tensor, box: torch.Tensor, image_size: Tuple[int, int], threshold: float = 0.5
) -> Tuple[torch.Tensor, Tuple[slice, slice]]:
    """One (M, M) probability mask pasted into its (4,) box.

    Returns:
        ``(region, (rows, cols))``: the thresholded bool mask over the image region
        ``[rows, cols]`` that can hold foreground (the box grown by one pixel,
        clipped to the image); every pixel outside it is background.
    """
    h, w = int(image_size[0]), int(image_size[1])
    box = box.float()
    x0_i = max(int(torch.floor(box[0]).item()) - 1, 0)
    y0_i = max(int(torch.floor(box[1]).item()) - 1, 0)
    x1_i = min(int(torch.ceil(box[2]).item()) + 1, w)
    y1_i = min(int(torch.ceil(box[3]).item()) + 1, h)
    rows, cols = slice(y0_i, max(y1_i, y0_i)), slice(x0_i, max(x1_i, x0_i))
    if y1_i <= y0_i or x1_i <= x0_i:
        return torch.zeros((0, 0), dtype=torch.bool, device=mask.device), (rows, cols)
    x0, y0, x1, y1 = box.unbind()  # float32 arithmetic, as detectron2
    img_y = torch.arange(y0_i, y1_i, device=mask.device, dtype=torch.float32) + 0.5
    img_x = torch.arange(x0_i, x1_i, device=mask.device, dtype=torch.float32) + 0.5
    img_y = (img_y - y0) / (y1 - y0) * 2 - 1
    img_x = (img_x - x0) / (x1 - x0) * 2 - 1
    gx = img_x[None, :].expand(img_y.shape[0], img_x.shape[0])
    gy = img_y[:, None].expand(img_y.shape[0], img_x.shape[0])
    grid = torch.stack([gx, gy], dim=2)[None]
    sampled = F.grid_sample(mask.float()[None, None], grid, align_corners=False)[0, 0]
    return sampled >= threshold, (rows, cols)


# Pixels of full-size masks held at once by iter_pasted_masks: 64 MB of bool (64 masks of a
# 1024 x 1024 image, 1 of a 6000 x 6000 photo), so memory stays flat in the photo's size.
PASTE_CHUNK_PIXELS = 1 << 26


def iter_pasted_masks(
    masks: torch.Tensor,
    boxes: torch.Tensor,
    image_size: Tuple[int, int],
    threshold: float = 0.5,
    chunk_size: Optional[int] = None,
) -> Iterator[torch.Tensor]:
    """Yield the pasted masks in chunks, each (n, H, W) bool on the CPU.

    Peak memory: one chunk of full-size bool masks (``chunk_size`` masks, by default
    as many as fit in :data:`PASTE_CHUNK_PIXELS`, at least one) plus one box region.

    Args:
        masks: (N, 1, M, M) or (N, M, M) mask probabilities.
        boxes: (N, 4) XYXY boxes in the pixels of the image of ``image_size``.
        image_size: (H, W) of the image to paste into.
    """
    if masks.dim() == 4:
        masks = masks[:, 0]
    h, w = int(image_size[0]), int(image_size[1])
    if chunk_size is None:
        chunk_size = max(1, PASTE_CHUNK_PIXELS // max(1, h * w))
    for start in range(0, masks.shape[0], chunk_size):
        chunk = torch.zeros((min(chunk_size, masks.shape[0] - start), h, w), dtype=torch.bool)
        for j in range(chunk.shape[0]):
            region, (rows, cols) = paste_mask(masks[start + j], boxes[start + j], (h, w), threshold)
            if region.numel():
                chunk[j, rows, cols] = region.cpu()
        yield chunk


def paste_masks_in_image(
    masks: torch.Tensor, boxes: torch.Tensor, image_size: Tuple[int, int], threshold: float = 0.5
) -> torch.Tensor:
    """(N, H, W) bool masks (see :func:`iter_pasted_masks`)."""
    h, w = int(image_size[0]), int(image_size[1])
    parts = list(iter_pasted_masks(masks, boxes, image_size, threshold))
    return torch.cat(parts) if parts else torch.zeros((0, h, w), dtype=torch.bool)


def encode_rle(masks: torch.Tensor) -> list:
    """COCO compressed RLE (``counts`` as str) of (n, H, W) bool masks."""
    arr = np.asfortranarray(masks.numpy().transpose(1, 2, 0), dtype=np.uint8)  # one copy
    rles = mask_util.encode(arr) if arr.shape[2] else []
    for r in rles:
        r["counts"] = r["counts"].decode("utf-8")
    return list(rles)
