"""Augmentations built from ``torchvision.transforms.v2``.

Detection transforms take and return ``(image, target)`` where ``image`` is a
``tv_tensors.Image`` and ``target`` the dict of :class:`maedet.data.coco.CocoInstanceDataset`
(``boxes`` as ``tv_tensors.BoundingBoxes``, ``masks`` as ``tv_tensors.Mask``); v2
transforms move boxes and masks together with the image. Randomness comes from
torch's global generator, which :class:`maedet.data.samplers.SeededDataset` seeds
per sample.
"""
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_mae_transform",
    "BoxesFromMasks",
    "ResizeShortestEdge",
    "ToModelInput",
    "build_lsj_train_transform",
    "build_test_transform",
    "masks_to_tight_boxes",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_mae_transform(
    input_size: int = 224,
    scale: Tuple[float, float] = (0.2, 1.0),
    hflip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """MAE pretraining augmentation (as in the MAE paper's ``main_pretrain.py``).

    Args:
        input_size: side S of the square output.
        scale: area fraction range of ``RandomResizedCrop`` (aspect ratio 3/4..4/3).
        hflip: random horizontal flip with probability 0.5.
        mean, std: per-channel normalization of the [0, 1] image.

    Returns:
        A callable mapping a uint8 ``(3, H, W)`` image tensor to float32 ``(3, S, S)``.
    """
    ops: List[Any] = [
        v2.RandomResizedCrop(
            input_size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
        )
    ]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(ops)


def masks_to_tight_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight box of each mask in pixel-edge coordinates.

    Args:
        masks: ``(N, H, W)`` tensor, nonzero = inside.

    Returns:
        float32 ``(N, 4)`` XYXY boxes: ``x1`` = first column with a pixel, ``x2`` = last
        column + 1 (likewise for rows), so a one-pixel mask has a 1x1 box. Empty masks
        get ``(0, 0, 0, 0)``.
    """
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.float32)
    m = masks.bool()
    rows = m.any(dim=2)  # (N, H)
    cols = m.any(dim=1)  # (N, W)
    nonempty = rows.any(dim=1)
    y1 = rows.to(torch.uint8).argmax(dim=1)
    y2 = h - rows.flip(1).to(torch.uint8).argmax(dim=1)
    x1 = cols.to(torch.uint8).argmax(dim=1)
    x2 = w - cols.flip(1).to(torch.uint8).argmax(dim=1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1).to(torch.float32)
    boxes[~nonempty] = 0
    return boxes


class BoxesFromMasks(torch.nn.Module):
    """Replace ``target["boxes"]`` by the tight boxes of ``target["masks"]``.

    Instances whose mask is empty get a degenerate box ``(0, 0, 0, 0)``, so a
    following ``SanitizeBoundingBoxes`` removes them (with their label and mask).
    Takes and returns ``(image, target)``.
    """

    def forward(self, image, target: Dict[str, Any]):
        masks = target["masks"]
        h, w = masks.shape[-2:]
        target = dict(target)
        target["boxes"] = tv_tensors.BoundingBoxes(
            masks_to_tight_boxes(masks), format="XYXY", canvas_size=(int(h), int(w))
        )
        return image, target


class ResizeShortestEdge(v2.Transform):
    """Resize keeping the aspect ratio so the short side is ``short_edge`` and the long
    side at most ``max_size`` (detectron2's ``ResizeShortestEdge`` for testing).

    The output size is ``(round(H * s), round(W * s))`` with
    ``s = min(short_edge / min(H, W), max_size / max(H, W))``. Images use bilinear
    interpolation with antialiasing, masks nearest, boxes are scaled.

    Args:
        short_edge: target length of the shorter side.
        max_size: cap on the longer side.
    """

    def __init__(self, short_edge: int = 1024, max_size: int = 1024):
        super().__init__()
        self.short_edge = int(short_edge)
        self.max_size = int(max_size)

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = query_size(flat_inputs)
        s = min(self.short_edge / min(h, w), self.max_size / max(h, w))
        return dict(size=(max(1, int(round(h * s))), max(1, int(round(w * s)))))

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return self._call_kernel(F.resize, inpt, size=list(params["size"]), antialias=True)


class ToModelInput(v2.Transform):
    """Convert the uint8 image to float32 in [0, 1] (torchvision's MaskRCNN normalizes
    with its own mean/std); boxes, masks and labels pass through unchanged.

    Works on ``(image, target)`` pairs and on a plain image tensor (or batch).
    """

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if isinstance(inpt, (tv_tensors.BoundingBoxes, tv_tensors.Mask)):
            return inpt
        return F.to_dtype(inpt, torch.float32, scale=True)


def build_lsj_train_transform(
    image_size: int = 1024,
    min_scale: float = 0.1,
    max_scale: float = 2.0,
    hflip: bool = True,
    pad_value: Union[int, Sequence[int]] = 0,
) -> v2.Compose:
    """Large-scale jitter (ViTDet's training augmentation).

    Steps: random horizontal flip; resize keeping the aspect ratio so the image fits
    in ``scale * image_size`` with ``scale ~ U(min_scale, max_scale)``
    (``v2.ScaleJitter``); random crop to ``image_size x image_size``, padding with 0
    where the image is smaller; boxes recomputed as the tight boxes of the cropped
    masks; instances whose mask or box became empty dropped.

    Args:
        image_size: side S of the square output.
        min_scale, max_scale: range of the jitter scale.
        hflip: apply the random flip.
        pad_value: image fill where the crop extends past the resized image (an int or
            one per channel, 0..255). Masks are always padded with 0. ViTDet pads the
            *normalized* image with 0; pass ``[round(255 * m) for m in IMAGENET_MEAN]``
            for the same effect under torchvision's internal normalization.

    Returns:
        A callable ``(image, target) -> (image, target)``: image uint8 ``(3, S, S)``,
        ``boxes`` ``(N', 4)`` XYXY with canvas ``(S, S)``, ``masks`` ``(N', S, S)``,
        ``labels`` ``(N',)``; ``image_id`` and ``orig_size`` unchanged. ``N'`` may be 0.
    """
    ops: List[Any] = []
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [
        v2.ScaleJitter(target_size=(image_size, image_size), scale_range=(min_scale, max_scale), antialias=True),
        v2.RandomCrop(
            (image_size, image_size),
            pad_if_needed=True,
            fill={tv_tensors.Image: _fill(pad_value), tv_tensors.Mask: 0, "others": 0},
        ),
        BoxesFromMasks(),
        v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_get_labels),
    ]
    return v2.Compose(ops)


def build_test_transform(short_edge: int = 1024, max_size: int = 1024) -> v2.Compose:
    """Evaluation resize: see :class:`ResizeShortestEdge`. Boxes and masks in the
    target are resized with the image; ``orig_size`` keeps the file's size so
    predictions can be mapped back (scale factors ``orig_size / image.shape[-2:]``).
    """
    return v2.Compose([ResizeShortestEdge(short_edge, max_size)])


def _fill(value: Union[int, Sequence[int]]) -> Union[int, List[int]]:
    return int(value) if isinstance(value, (int, float)) else [int(v) for v in value]


def _get_labels(inputs) -> torch.Tensor:
    """``labels_getter`` for ``SanitizeBoundingBoxes`` on ``(image, target)``."""
    return inputs[1]["labels"]
