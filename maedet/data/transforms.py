"""Augmentation pipelines, registered by name (:data:`maedet.utils.registry.PIPELINES`).

Detection pipelines take and return ``(image, target)`` where ``image`` is a
``tv_tensors.Image`` uint8 (3, H, W) and ``target`` the dict of
:class:`maedet.data.coco.CocoInstanceDataset` (``boxes`` as ``BoundingBoxes``,
``masks`` as :class:`~maedet.structures.PolygonMasks` or a bitmap ``Mask``).
Images are resized with PIL's bilinear filter on the uint8 pixels, as detectron2's
``ResizeTransform`` does, so the pixels match detectron2's exactly. Randomness
comes from torch's global generator, which :class:`maedet.data.samplers.SeededDataset`
seeds per sample.

Built-in pipelines:

- ``lsj``: ViTDet's large-scale jitter for training (detectron2
  ``RandomFlip`` + ``ResizeScale`` + ``FixedSizeCrop(pad=False)``,
  :class:`LargeScaleJitter`): the image is left at the top-left corner, never
  padded; the detector pads the batch bottom/right to its square;
- ``resize_shortest_edge``: ViTDet's test-time resize (detectron2
  ``ResizeShortestEdge(short_edge_length, max_size)``).

A new pipeline is a function returning a callable, registered with
``@PIPELINES.register("name")``; its keyword arguments are its config keys. A
pipeline whose images never exceed a size given by one of its keys says so with
``@declares_max_side(key)``: the config loader then checks that size against the
detector's square padding (:func:`max_output_side`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F
from torchvision.transforms.v2._utils import query_size

from maedet.structures import PolygonMasks
from maedet.utils.registry import PIPELINES

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "build_mae_transform",
    "resize_image_pil",
    "shortest_edge_size",
    "ResizeShortestEdge",
    "LSJParams",
    "LargeScaleJitter",
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
    """A uint8 (3, H, W) image resized to ``size`` = (h, w) with PIL's bilinear filter.

    The result is a (3, h, w) view of (h, w, 3) memory, as PIL returns it: no copy is made
    to reorder it (an image read by the datasets is laid out the same way)."""
    h, w = int(size[0]), int(size[1])
    if tuple(image.shape[-2:]) == (h, w):
        return image
    arr = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    return torch.from_numpy(np.asarray(Image.fromarray(arr).resize((w, h), Image.BILINEAR))).permute(2, 0, 1)


class _Resize(v2.Transform):
    """Base of the resizes: images with PIL bilinear (uint8), masks nearest, boxes scaled,
    polygons moved (:meth:`PolygonMasks.resize`)."""

    _transformed_types = (torch.Tensor, Image.Image, PolygonMasks)

    def output_size(self, h: int, w: int) -> Tuple[int, int]:
        raise NotImplementedError

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = query_size(flat_inputs)
        return {"size": self.output_size(int(h), int(w)), "input_size": (int(h), int(w))}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        size = list(params["size"])
        if isinstance(inpt, PolygonMasks):
            return inpt.resize(*params["input_size"], *size)
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


def _resize_bitmasks(masks: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """uint8 ``(N, h, w)`` masks resized with PIL's nearest neighbour (detectron2's
    ``ResizeTransform.apply_segmentation``; torch's nearest modes pick other pixels)."""
    h, w = int(size[0]), int(size[1])
    if masks.shape[0] == 0:
        return masks.new_zeros((0, h, w))
    out = [np.asarray(Image.fromarray(np.ascontiguousarray(m.numpy())).resize((w, h), Image.NEAREST)) for m in masks]
    return torch.from_numpy(np.stack(out))


@dataclass(frozen=True)
class LSJParams:
    """One draw of large-scale jitter: the flip, the size after the resize ``(h, w)``
    and the corner ``(y0, x0)`` of the crop window (detectron2 logs the same three
    transforms: ``HFlipTransform``, ``ResizeTransform``, ``CropTransform``)."""

    hflip: bool
    size: Tuple[int, int]
    crop: Tuple[int, int]


class LargeScaleJitter:
    """ViTDet's training augmentation: detectron2's ``RandomFlip`` + ``ResizeScale`` +
    ``FixedSizeCrop(pad=False)`` applied as its ``DatasetMapper`` applies them.

    Draws (:meth:`get_params`): a horizontal flip with probability 0.5; a scale
    ``s ~ U(min_scale, max_scale)``, the image resized to fit ``s x image_size`` keeping
    its aspect ratio (sizes rounded half to even, as ``np.round``); one uniform ``u``
    placing the crop window at ``round(u * max(side - image_size, 0))`` on both axes.
    Randomness comes from torch's global generator, which
    :class:`maedet.data.samplers.SeededDataset` seeds per sample.

    Applying them (:meth:`apply`, given parameters, so that a run can be replayed):
    the image is flipped, resized with PIL's bilinear filter on uint8 pixels and
    cropped (an image smaller than the window stays at the top-left, unpadded; the
    detector pads the batch). Polygon masks move with it and are clipped to the crop
    window (:class:`~maedet.structures.PolygonMasks`); bitmap masks are flipped,
    resized with PIL's nearest neighbour and cropped. Boxes: with ``recompute_boxes``
    (detectron2's setting whenever it crops) the extent of each instance's polygons,
    or the tight box of its bitmap; otherwise the json box moved and clipped to the
    image. Instances whose box has a side <= 1e-5 px or whose mask has no polygon
    (bitmaps: no pixel) are dropped, as detectron2's ``filter_empty_instances``.
    """

    def __init__(
        self,
        image_size: int = 1024,
        min_scale: float = 0.1,
        max_scale: float = 2.0,
        hflip: bool = True,
        recompute_boxes: bool = True,
    ):
        if not 0 < min_scale <= max_scale:
            raise ValueError(f"lsj needs 0 < min_scale <= max_scale, got {min_scale}, {max_scale}")
        self.image_size, self.min_scale, self.max_scale = int(image_size), float(min_scale), float(max_scale)
        self.hflip, self.recompute_boxes = bool(hflip), bool(recompute_boxes)

    def get_params(self, height: int, width: int) -> LSJParams:
        flip = self.hflip and float(torch.rand(())) < 0.5
        s = self.min_scale + float(torch.rand(())) * (self.max_scale - self.min_scale)
        scale = min(self.image_size * s / height, self.image_size * s / width)
        h, w = int(np.round(height * scale)), int(np.round(width * scale))
        u = float(torch.rand(()))
        y0 = int(np.round(max(h - self.image_size, 0) * u))
        x0 = int(np.round(max(w - self.image_size, 0) * u))
        return LSJParams(hflip=flip, size=(h, w), crop=(y0, x0))

    def __call__(self, image: torch.Tensor, target: Dict[str, Any]) -> Tuple[torch.Tensor, Dict[str, Any]]:
        return self.apply(image, target, self.get_params(int(image.shape[-2]), int(image.shape[-1])))

    def apply(
        self, image: torch.Tensor, target: Dict[str, Any], params: LSJParams
    ) -> Tuple[torch.Tensor, Dict[str, Any]]:
        """The jitter ``params`` applied to ``image`` (uint8 ``(3, H, W)``) and ``target``
        (``boxes``, ``labels``, ``masks`` if present; other keys are kept as they are).
        Without masks (box-only data) the boxes are transformed and clipped, never
        recomputed (detectron2's ``transform_instance_annotations``)."""
        H, W = int(image.shape[-2]), int(image.shape[-1])
        (h, w), (y0, x0), side = params.size, params.crop, self.image_size
        boxes = target["boxes"].as_subclass(torch.Tensor).to(torch.float64).reshape(-1, 4)
        masks = target.get("masks")
        polygons = isinstance(masks, PolygonMasks)
        if masks is not None and not polygons:
            masks = masks.as_subclass(torch.Tensor).to(torch.uint8)
        # The image goes through PIL once: resized, mirrored (after the resize: the same
        # pixels as before it, PIL's filter is symmetric), cropped, then read out.
        pil = Image.fromarray(np.ascontiguousarray(image.as_subclass(torch.Tensor).permute(1, 2, 0).numpy()))
        if (h, w) != (H, W):
            pil = pil.resize((w, h), Image.BILINEAR)
        if params.hflip:
            pil = pil.transpose(Image.FLIP_LEFT_RIGHT)
        pil = pil.crop((x0, y0, min(x0 + side, w), min(y0 + side, h)))
        img = torch.from_numpy(np.ascontiguousarray(np.asarray(pil).transpose(2, 0, 1)))
        if params.hflip:
            boxes = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], dim=1)
        boxes = boxes * torch.tensor([w * 1.0 / W, h * 1.0 / H] * 2, dtype=torch.float64)
        out_h, out_w = int(img.shape[-2]), int(img.shape[-1])
        boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=torch.float64)
        boxes = torch.minimum(boxes.clamp(min=0), torch.tensor([out_w, out_h] * 2, dtype=torch.float64))
        if masks is not None:
            if params.hflip:
                masks = masks.hflip(W) if polygons else masks.flip(-1)
            masks = masks.resize(H, W, h, w) if polygons else _resize_bitmasks(masks, (h, w))
            masks = masks.crop(x0, y0, side, side) if polygons else masks[:, y0 : y0 + side, x0 : x0 + side]
            if self.recompute_boxes:
                boxes = masks.bounding_boxes() if polygons else masks_to_tight_boxes(masks)
        boxes = boxes.to(torch.float32)
        keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)
        if masks is not None:
            keep &= masks.nonempty() if polygons else masks.flatten(1).bool().any(dim=1)
        out = dict(target)
        out["boxes"] = tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(out_h, out_w))
        out["labels"] = target["labels"][keep]
        if masks is not None:
            out["masks"] = masks[keep] if polygons else tv_tensors.Mask(masks[keep].contiguous())
        if isinstance(image, tv_tensors.Image):
            img = tv_tensors.Image(img)
        return img, out


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


@PIPELINES.register("lsj")
@declares_max_side("image_size")
def lsj(
    image_size: int = 1024,
    min_scale: float = 0.1,
    max_scale: float = 2.0,
    hflip: bool = True,
    recompute_boxes: bool = True,
) -> LargeScaleJitter:
    """Large-scale jitter (ViTDet's training augmentation, detectron2's LSJ loader); see
    :class:`LargeScaleJitter`.

    Returns:
        ``(image, target) -> (image, target)``: image uint8 ``(3, h, w)`` with
        ``h, w <= image_size``, ``boxes`` ``(N', 4)``, ``masks`` (polygons or
        ``(N', h, w)`` bitmaps), ``labels`` ``(N',)``; ``image_id`` and ``orig_size``
        unchanged.
    """
    return LargeScaleJitter(image_size, min_scale, max_scale, hflip, recompute_boxes)


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
