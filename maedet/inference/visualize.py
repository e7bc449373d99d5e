"""Drawing predicted instances on an image: translucent masks, box outlines, labels.

Everything is drawn with OpenCV on an RGB ``uint8`` copy of the input; the input
is never modified, and pixels change only under masks, on box outlines and
under label tags.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import pycocotools.mask as mask_util

from maedet.utils.arrays import ArrayLike, instance_arrays, to_numpy
from maedet.utils.errors import MaedetError
from maedet.utils.fileio import atomic_write

__all__ = ["PALETTE", "color_for", "draw_instances", "save_visualization"]

#: Fixed RGB palette (saturated, none of them gray) cycled over instances or classes.
PALETTE: Tuple[Tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (0, 200, 90),
)


def color_for(index: int) -> Tuple[int, int, int]:
    """The palette color (RGB) for an instance index or a class label."""
    return PALETTE[int(index) % len(PALETTE)]


def _class_name(class_names: Union[Sequence[str], Mapping[int, str], None], label: int, label_offset: int) -> str:
    if class_names is None:
        return str(label)
    if isinstance(class_names, Mapping):
        return str(class_names.get(label, label))
    i = label - label_offset
    return str(class_names[i]) if 0 <= i < len(class_names) else str(label)


def draw_instances(
    image_rgb: np.ndarray,
    boxes: ArrayLike,
    scores: ArrayLike,
    labels: ArrayLike,
    class_names: Union[Sequence[str], Mapping[int, str], None],
    masks: Optional[ArrayLike] = None,
    score_thresh: float = 0.0,
    alpha: float = 0.5,
    draw_boxes: bool = True,
    draw_labels: bool = True,
    color_by_class: bool = False,
    label_offset: int = 1,
    mask_threshold: float = 0.5,
) -> np.ndarray:
    """Draw predicted instances on a copy of an RGB image.

    Args:
        image_rgb: (H, W, 3) uint8 RGB image (not modified).
        boxes: (N, 4) boxes ``x1, y1, x2, y2`` in the image's pixels.
        scores: (N,) scores; instances with ``score < score_thresh`` are skipped.
        labels: (N,) integer class labels.
        class_names: names used in the text tags. A sequence is indexed with
            ``label - label_offset`` (the default ``label_offset=1`` fits
            torchvision labels 1..K with ``class_names`` listing the K classes;
            use 0 when ``class_names[0]`` is the background); a mapping is
            indexed with the label. Labels with no name are shown as numbers.
        masks: optional (N, H, W) or (N, 1, H, W) masks, bool or probabilities
            (foreground where ``> mask_threshold``), or a list of N COCO RLEs
            (decoded one at a time, so a large photo never holds N full masks).
        score_thresh: minimum score of a drawn instance.
        alpha: opacity of the mask overlay, in [0, 1].
        draw_boxes: draw box outlines.
        draw_labels: draw ``"name score"`` tags on a filled background.
        color_by_class: one color per class instead of one per instance.
        label_offset: see ``class_names``.
        mask_threshold: threshold for float masks.

    Returns:
        (H, W, 3) uint8 RGB image. Masks are blended as
        ``(1 - alpha) * pixel + alpha * color`` (larger instances first, so
        small ones stay visible), then box outlines, then tags on top.
    """
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image_rgb must be an (H, W, 3) uint8 array, got shape {image.shape} dtype {image.dtype}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = image.shape[:2]
    out = np.ascontiguousarray(image.copy())

    boxes_np, scores_np, labels_np = instance_arrays(boxes, scores, labels)
    n = boxes_np.shape[0]
    rles = masks if isinstance(masks, (list, tuple)) and all(isinstance(m, Mapping) for m in masks) else None
    masks_np = None
    if rles is not None:
        if len(rles) != n or any(tuple(r["size"]) != (h, w) for r in rles):
            raise ValueError(f"masks: expected {n} RLEs of size ({h}, {w})")
    elif masks is not None:
        masks_np = to_numpy(masks)
        if masks_np.ndim == 4 and masks_np.shape[1] == 1:
            masks_np = masks_np[:, 0]
        if masks_np.ndim != 3 or masks_np.shape[0] != n or masks_np.shape[1:] != (h, w):
            raise ValueError(f"masks must be ({n}, {h}, {w}) or ({n}, 1, {h}, {w}), got {masks_np.shape}")
        if np.issubdtype(masks_np.dtype, np.floating):
            masks_np = masks_np > mask_threshold
        else:
            masks_np = masks_np != 0

    keep = np.nonzero(scores_np >= score_thresh)[0]
    colors = {int(i): np.array(color_for(labels_np[i] if color_by_class else i), dtype=np.float32) for i in keep}

    # Larger instances first so that small ones are drawn on top.
    if rles is not None:
        areas = np.array([float(mask_util.area(rles[i])) for i in keep])
    elif masks_np is not None:
        areas = masks_np[keep].reshape(len(keep), -1).sum(axis=1) if len(keep) else np.zeros(0)
    else:
        areas = (boxes_np[keep, 2] - boxes_np[keep, 0]) * (boxes_np[keep, 3] - boxes_np[keep, 1])
    order = keep[np.argsort(-areas, kind="stable")]

    if masks_np is not None or rles is not None:
        for i in order:
            m = masks_np[i] if rles is None else mask_util.decode(rles[i])
            _blend(out, m, colors[int(i)], alpha)

    thickness = max(1, int(round(min(h, w) / 320)))
    font = cv2.FONT_HERSHEY_SIMPLEX
    font_scale = max(0.35, min(h, w) / 1200)
    font_thick = max(1, int(round(font_scale * 1.5)))
    ib = np.rint(boxes_np).astype(np.int64)

    if draw_boxes:
        for i in order:
            x1, y1, x2, y2 = (int(v) for v in ib[i])
            color = tuple(int(c) for c in colors[int(i)])
            cv2.rectangle(out, (x1, y1), (x2, y2), color, thickness, lineType=cv2.LINE_8)

    if draw_labels:
        for i in order:
            text = f"{_class_name(class_names, int(labels_np[i]), label_offset)} {scores_np[i]:.2f}"
            (tw, th), baseline = cv2.getTextSize(text, font, font_scale, font_thick)
            tag_w, tag_h = tw + 2, th + baseline + 2
            x1, y1 = int(ib[i, 0]), int(ib[i, 1])
            x1 = min(max(x1, 0), max(w - tag_w, 0))
            # Just above the box if there is room, else just inside its top edge.
            top = y1 - tag_h
            if top < 0:
                top = min(max(y1, 0), max(h - tag_h, 0))
            color = colors[int(i)]
            bg = tuple(int(c) for c in color)
            # cv2.rectangle includes both corners.
            cv2.rectangle(out, (x1, top), (x1 + tag_w - 1, top + tag_h - 1), bg, thickness=-1)
            luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
            fg = (0, 0, 0) if luminance > 140 else (255, 255, 255)
            cv2.putText(out, text, (x1 + 1, top + th + 1), font, font_scale, fg, font_thick, cv2.LINE_AA)
    return out


def _blend(out: np.ndarray, mask: np.ndarray, color: np.ndarray, alpha: float, rows: int = 512) -> None:
    """``out[mask] = (1 - alpha) * out[mask] + alpha * color`` in bands of ``rows`` rows, so the
    float temporaries stay small however large the picture (a 6000 x 6000 photo)."""
    for y0 in range(0, out.shape[0], rows):
        m = mask[y0 : y0 + rows] != 0
        if not m.any():
            continue
        band = out[y0 : y0 + rows]
        blended = (1.0 - alpha) * band[m].astype(np.float32) + alpha * color
        band[m] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def save_visualization(path: str, image_rgb: np.ndarray) -> None:
    """Write an RGB uint8 image (e.g. from :func:`draw_instances`) atomically.

    The format follows the extension of ``path`` (``.png`` lossless,
    ``.jpg``/``.jpeg``, ...); the image is encoded in memory with
    ``cv2.imencode`` (RGB -> BGR) and written with
    :func:`maedet.utils.fileio.atomic_write`, so a reader never sees a
    half-written file.

    Raises:
        MaedetError: the extension cannot be encoded or the file cannot be written.
    """
    image = np.asarray(image_rgb)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image_rgb must be an (H, W, 3) uint8 array, got shape {image.shape} dtype {image.dtype}")
    ext = os.path.splitext(path)[1].lower()
    if not ext:
        raise MaedetError(f"cannot save visualization {path}: no file extension (use .png or .jpg)")
    try:
        ok, buf = cv2.imencode(ext, cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    except cv2.error as e:
        raise MaedetError(f"cannot encode visualization as {ext} for {path}: {e}") from e
    if not ok:
        raise MaedetError(f"cannot encode visualization as {ext} for {path}")
    data = buf.tobytes()
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        raise MaedetError(f"cannot write visualization {path}: {e.strerror or e}") from e
