"""Augmentation pipelines, registered by name (:data:`maedet.utils.registry.PIPELINES`).

Detection pipelines take and return ``(image, target)`` where ``image`` is a
``tv_tensors.Image`` uint8 (3, H, W) and ``target`` the dict of
:class:`maedet.data.coco.CocoInstanceDataset` (``boxes`` as ``BoundingBoxes``,
``masks`` as ``Mask``); ``torchvision.transforms.v2`` moves boxes and masks with
the image. Images are resized with PIL's bilinear filter on the uint8 pixels, as
detectron2's ``ResizeTransform`` does, so the pixels match detectron2's exactly;
masks are resized with nearest neighbour. Randomness comes from torch's global
generator, which :class:`maedet.data.samplers.SeededDataset` seeds per sample.

Built-in pipelines:

- ``lsj``: ViTDet's large-scale jitter for training (detectron2
  ``RandomFlip`` + ``ResizeScale`` + ``FixedSizeCrop(pad=False)``): the image is
  left at the top-left corner, never padded; the detector pads the batch
  bottom/right to its square;
- ``resize_shortest_edge``: ViTDet's test-time resize (detectron2
  ``ResizeShortestEdge(short_edge_length, max_size)``).

A new pipeline is a function returning a callable, registered with
``@PIPELINES.register("name")``; its keyword arguments are its config keys. A
pipeline whose images never exceed a size given by one of its keys says so with
``@declares_max_side(key)``: the config loader then checks that size against the
detector's square padding (:func:`max_output_side`).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from maedet.utils.registry import PIPELINES

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_mae_transform",
    "resize_image_pil",
    "shortest_edge_size",
    "ResizeShortestEdge",
    "ResizeScale",
    "FixedSizeCrop",
    "BoxesFromMasks",
    "lsj",
    "resize_shortest_edge",
    "masks_to_tight_boxes",
    "declares_max_side",
    "max_output_side",
]

# ImageNet statistics of [0, 1] RGB images (the MAE pretraining normalization).
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
        v2.RandomResizedCrop(input_size, scale=tuple(scale), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    ]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(ops)


def resize_image_pil(image: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A uint8 (3, H, W) image resized to ``size`` = (h, w) with PIL's bilinear filter."""
    h, w = int(size[0]), int(size[1])
    if tuple(image.shape[-2:]) == (h, w):
        return image
    arr = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    out = np.array(Image.fromarray(arr).resize((w, h), Image.BILINEAR))
    return torch.from_numpy(out).permute(2, 0, 1)


class _Resize(v2.Transform):
    """Base of the resizes: images with PIL bilinear (uint8), masks nearest, boxes scaled."""

    def output_size(self, h: int, w: int) -> Tuple[int, int]:
        raise NotImplementedError

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = query_size(flat_inputs)
        return {"size": self.output_size(int(h), int(w))}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        size = list(params["size"])
        if isinstance(inpt, tv_tensors.Image) or (type(inpt) is torch.Tensor and inpt.dtype == torch.uint8):
            out = resize_image_pil(inpt.as_subclass(torch.Tensor), size)
            return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out
        if isinstance(inpt, tv_tensors.Mask):
            return F.resize(inpt, size, interpolation=v2.InterpolationMode.NEAREST)
        if isinstance(inpt, tv_tensors.BoundingBoxes):
            return F.resize(inpt, size)
        return inpt


def shortest_edge_size(h: int, w: int, short_edge_length: int, max_size: int) -> Tuple[int, int]:
    """detectron2's ``ResizeShortestEdge.get_output_shape``: short side to
    ``short_edge_length``, long side at most ``max_size``, sizes rounded half up."""
    size = float(short_edge_length)
    scale = size / min(h, w)
    newh, neww = (size, scale * w) if h < w else (scale * h, size)
    if max(newh, neww) > max_size:
        scale = max_size / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


class ResizeShortestEdge(_Resize):
    """Resize keeping the aspect ratio: shorter side ``short_edge_length``, longer side at
    most ``max_size`` (detectron2's test-time resize; see :func:`shortest_edge_size`)."""

    def __init__(self, short_edge_length: int = 1024, max_size: int = 1024):
        super().__init__()
        self.short_edge_length, self.max_size = int(short_edge_length), int(max_size)

    def output_size(self, h: int, w: int) -> Tuple[int, int]:
        return shortest_edge_size(h, w, self.short_edge_length, self.max_size)


class ResizeScale(_Resize):
    """detectron2's ``ResizeScale``: draw ``s ~ U(min_scale, max_scale)``, fit the image
    into ``s x target`` keeping its aspect ratio, round the size."""

    def __init__(self, min_scale: float, max_scale: float, target_height: int, target_width: int):
        super().__init__()
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.target = (int(target_height), int(target_width))

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = query_size(flat_inputs)
        s = self.min_scale + float(torch.rand(())) * (self.max_scale - self.min_scale)
        scale = min(self.target[0] * s / h, self.target[1] * s / w)
        return {"size": (int(np.round(h * scale)), int(np.round(w * scale)))}


class FixedSizeCrop(v2.Transform):
    """detectron2's ``FixedSizeCrop(crop_size, pad=False)``: where the image is larger than
    ``crop_size`` along an axis, a random crop of that size (one uniform draw places both
    axes' offsets, rounded); where it is smaller, it stays as it is, at the top-left."""

    def __init__(self, crop_size: Tuple[int, int]):
        super().__init__()
        self.crop_size = (int(crop_size[0]), int(crop_size[1]))

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = query_size(flat_inputs)
        u = float(torch.rand(()))
        top = int(np.round(max(h - self.crop_size[0], 0) * u))
        left = int(np.round(max(w - self.crop_size[1], 0) * u))
        return {
            "top": top,
            "left": left,
            "height": min(self.crop_size[0], h - top),
            "width": min(self.crop_size[1], w - left),
        }

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if (
            isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask, tv_tensors.BoundingBoxes))
            or type(inpt) is torch.Tensor
        ):
            return self._call_kernel(F.crop, inpt, **params)
        return inpt


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
    """Replace ``target["boxes"]`` by the tight boxes of ``target["masks"]`` (detectron2's
    ``recompute_boxes`` after a crop). Instances whose mask is empty get a degenerate
    box ``(0, 0, 0, 0)``, so a following ``SanitizeBoundingBoxes`` removes them."""

    def forward(self, image: torch.Tensor, target: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        masks = target["masks"]
        h, w = masks.shape[-2:]
        target = dict(target)
        target["boxes"] = tv_tensors.BoundingBoxes(
            masks_to_tight_boxes(masks), format="XYXY", canvas_size=(int(h), int(w))
        )
        return image, target


def declares_max_side(key: str) -> Callable:
    """Mark a pipeline factory whose keyword ``key`` bounds the longer side of every image it
    returns, so that the input geometry can be checked at start-up (:func:`max_output_side`)."""

    def deco(fn: Callable) -> Callable:
        fn.max_side_key = key
        return fn

    return deco


def max_output_side(section: Mapping[str, Any]) -> Optional[Tuple[str, int]]:
    """The key and value that bound the longer side of a pipeline's images, e.g.
    ``("image_size", 1024)`` for ``lsj``; None for a pipeline that declares no bound.

    Args:
        section: a resolved pipeline section, ``{"name": ..., **kwargs}``.
    """
    fn = PIPELINES.get(str(section["name"]))
    key = getattr(fn, "max_side_key", None)
    if key is None or key not in section:
        return None
    return key, int(section[key])


def _get_labels(inputs) -> torch.Tensor:
    """``labels_getter`` for ``SanitizeBoundingBoxes`` on ``(image, target)``."""
    return inputs[1]["labels"]


@PIPELINES.register("lsj")
@declares_max_side("image_size")
def lsj(image_size: int = 1024, min_scale: float = 0.1, max_scale: float = 2.0, hflip: bool = True) -> v2.Compose:
    """Large-scale jitter (ViTDet's training augmentation, detectron2's LSJ loader).

    Random horizontal flip; resize so the image fits in ``s x image_size`` with
    ``s ~ U(min_scale, max_scale)``; crop to ``image_size`` where larger (the image
    keeps its top-left corner where smaller; the detector pads); boxes recomputed
    as the tight boxes of the cropped masks; instances whose mask became empty dropped.

    Returns:
        ``(image, target) -> (image, target)``: image uint8 ``(3, h, w)`` with
        ``h, w <= image_size``, ``boxes`` ``(N', 4)``, ``masks`` ``(N', h, w)``,
        ``labels`` ``(N',)``; ``image_id`` and ``orig_size`` unchanged.
    """
    if not 0 < min_scale <= max_scale:
        raise ValueError(f"lsj needs 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
    ops: List[Any] = [v2.RandomHorizontalFlip()] if hflip else []
    ops += [
        ResizeScale(min_scale, max_scale, image_size, image_size),
        FixedSizeCrop((image_size, image_size)),
        BoxesFromMasks(),
        v2.SanitizeBoundingBoxes(min_size=1, labels_getter=_get_labels),
    ]
    return v2.Compose(ops)


@PIPELINES.register("resize_shortest_edge")
@declares_max_side("max_size")
def resize_shortest_edge(short_edge_length: int = 1024, max_size: int = 1024) -> v2.Compose:
    """Test-time resize (see :class:`ResizeShortestEdge`); the target's ``orig_size``
    keeps the file's size so that predictions can be mapped back."""
    if short_edge_length < 1 or max_size < short_edge_length:
        raise ValueError(
            f"resize_shortest_edge needs 1 <= short_edge_length <= max_size, got {short_edge_length}, {max_size}"
        )
    return v2.Compose([ResizeShortestEdge(short_edge_length, max_size)])
