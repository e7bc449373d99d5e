"""Instance masks as polygons, transformed with their image and rasterized per RoI.

COCO annotates most instances as polygons. Kept as polygons from the json to the
mask head, they move with the image exactly (a flip, a resize and a crop are
coordinate maps; the crop clips each polygon to the crop window), and a mask target
is rasterized once per RoI, at the head's resolution, inside the RoI's box. This is
detectron2's ``PolygonMasks`` (``detectron2/structures/masks.py``) and what its LSJ
training mapper does; the arithmetic follows it step for step (float64 coordinates,
the same shapely clipping, pycocotools' rasterizer, float32 boxes), so the targets
are the same bits. Rasterizing whole images first and resizing the bitmaps instead
loses thin parts at small scales and costs a full-size bitmap per instance.

An instance is a list of polygons, each a float64 array ``(x0, y0, x1, y1, ...)`` of
at least 3 points in pixel coordinates (pixel ``(i, j)`` covers ``[j, j + 1) x [i, i + 1)``).
Polygons live on the CPU; :meth:`PolygonMasks.to` returns the same object.
"""

from __future__ import annotations

import copy
from typing import Any, List, Sequence, Union

import numpy as np
import pycocotools.mask as mask_util
import torch

__all__ = ["PolygonMasks", "polygons_to_bitmask", "rasterize_polygons_within_box"]


def polygons_to_bitmask(polygons: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """The union of ``polygons`` rasterized by pycocotools: bool ``(height, width)``."""
    if len(polygons) == 0:
        return np.zeros((height, width), dtype=bool)
    rles = mask_util.frPyObjects([np.asarray(p, dtype=np.float64) for p in polygons], height, width)
    return mask_util.decode(mask_util.merge(rles)).astype(bool)


def rasterize_polygons_within_box(polygons: Sequence[np.ndarray], box: np.ndarray, mask_size: int) -> np.ndarray:
    """One instance's polygons rasterized inside ``box`` at ``mask_size x mask_size``.

    The polygons are shifted to the box's corner and scaled by ``mask_size / side``
    (a side below 0.1 px counts as 0.1), then rasterized: bool ``(mask_size, mask_size)``.

    Args:
        polygons: the instance's polygons, float64 ``(2K,)`` each.
        box: float32 ``(4,)`` XYXY (a proposal box); its side lengths are float32, and so
            are the scale factors, as in detectron2 (NumPy's scalar promotion rules).
    """
    box = np.asarray(box, dtype=np.float32)
    w, h = box[2] - box[0], box[3] - box[1]
    polygons = copy.deepcopy(list(polygons))
    for p in polygons:
        p[0::2] = p[0::2] - box[0]
        p[1::2] = p[1::2] - box[1]
    ratio_h = mask_size / max(h, 0.1)
    ratio_w = mask_size / max(w, 0.1)
    if ratio_h == ratio_w:
        for p in polygons:
            p *= ratio_h
    else:
        for p in polygons:
            p[0::2] *= ratio_w
            p[1::2] *= ratio_h
    return polygons_to_bitmask(polygons, mask_size, mask_size)


def _as_polygon(p: Any) -> np.ndarray:
    arr = (p.cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p)).astype(np.float64).reshape(-1)
    if arr.size % 2 or arr.size < 6:
        raise ValueError(f"a polygon needs an even number >= 6 of coordinates, got {arr.size}")
    return arr


class PolygonMasks:
    """The masks of N instances, each a list of polygons.

    Args:
        polygons: per instance, a list of polygons (sequences or arrays of ``2K`` floats,
            ``K >= 3``); an instance may have no polygon (an empty mask).
    """

    def __init__(self, polygons: Sequence[Sequence[Any]]):
        if not isinstance(polygons, (list, tuple)):
            raise ValueError(f"PolygonMasks takes a list of per-instance polygon lists, got {type(polygons).__name__}")
        self.polygons: List[List[np.ndarray]] = [[_as_polygon(p) for p in inst] for inst in polygons]

    def __len__(self) -> int:
        return len(self.polygons)

    def __repr__(self) -> str:
        return f"PolygonMasks(num_instances={len(self)})"

    def __getitem__(self, index: Union[int, slice, Sequence[int], torch.Tensor, np.ndarray]) -> PolygonMasks:
        """The instances selected by an int, a slice, a list of indices or a bool / index tensor."""
        if isinstance(index, int):
            return PolygonMasks([self.polygons[index]])
        if isinstance(index, slice):
            return PolygonMasks(self.polygons[index])
        if isinstance(index, torch.Tensor):
            index = index.cpu().numpy()
        index = np.asarray(index)
        if index.dtype == bool:
            if index.shape != (len(self),):
                raise IndexError(f"bool index of shape {index.shape} for {len(self)} instances")
            index = np.nonzero(index)[0]
        return PolygonMasks([self.polygons[int(i)] for i in index])

    def to(self, *args: Any, **kwargs: Any) -> PolygonMasks:
        """Polygons stay on the CPU (they are small); the same object."""
        return self

    # ------------------------------------------------------------ transforms
    def hflip(self, width: int) -> PolygonMasks:
        """Mirrored in an image of ``width`` columns: ``x -> width - x``."""
        out = copy.deepcopy(self.polygons)
        for inst in out:
            for p in inst:
                p[0::2] = width - p[0::2]
        return PolygonMasks(out)

    def resize(self, height: int, width: int, new_height: int, new_width: int) -> PolygonMasks:
        """Moved with an image resized from ``height x width`` to ``new_height x new_width``."""
        sx, sy = new_width * 1.0 / width, new_height * 1.0 / height
        out = copy.deepcopy(self.polygons)
        for inst in out:
            for p in inst:
                p[0::2] = p[0::2] * sx
                p[1::2] = p[1::2] * sy
        return PolygonMasks(out)

    def crop(self, x0: int, y0: int, width: int, height: int) -> PolygonMasks:
        """Clipped to the window ``[x0, x0 + width] x [y0, y0 + height]`` and moved to its corner.

        Each polygon is intersected with the window by shapely; a polygon may become
        several or none, and lines or points left by the intersection are dropped (an
        instance can end up with no polygon: see :meth:`nonempty`).
        """
        import shapely.geometry as geometry

        window = geometry.box(x0, y0, x0 + width, y0 + height).buffer(0.0)
        out: List[List[np.ndarray]] = []
        for inst in self.polygons:
            kept = []
            for p in inst:
                poly = geometry.Polygon(p.reshape(-1, 2)).buffer(0.0)
                if not poly.is_valid:
                    continue
                cropped = poly.intersection(window)
                if cropped.is_empty:
                    continue
                parts = cropped.geoms if isinstance(cropped, geometry.base.BaseMultipartGeometry) else [cropped]
                for part in parts:
                    if not isinstance(part, geometry.Polygon) or not part.is_valid:
                        continue
                    coords = np.asarray(part.exterior.coords)[:-1]  # the ring repeats its first point
                    coords[:, 0] -= x0
                    coords[:, 1] -= y0
                    kept.append(coords.reshape(-1))
            out.append(kept)
        return PolygonMasks(out)

    # ------------------------------------------------------------ queries
    def nonempty(self) -> torch.Tensor:
        """bool ``(N,)``: the instance has at least one polygon."""
        return torch.tensor([len(inst) > 0 for inst in self.polygons], dtype=torch.bool)

    def bounding_boxes(self) -> torch.Tensor:
        """float32 ``(N, 4)`` XYXY: the extent of each instance's polygon coordinates
        (in float32; an instance without polygons gets ``(inf, inf, 0, 0)``, an empty box)."""
        boxes = torch.zeros(len(self), 4, dtype=torch.float32)
        for i, inst in enumerate(self.polygons):
            lo = torch.full((2,), float("inf"), dtype=torch.float32)
            hi = torch.zeros(2, dtype=torch.float32)
            for p in inst:
                xy = torch.from_numpy(p).view(-1, 2).to(torch.float32)
                lo = torch.minimum(lo, xy.min(dim=0).values)
                hi = torch.maximum(hi, xy.max(dim=0).values)
            boxes[i, :2], boxes[i, 2:] = lo, hi
        return boxes

    def crop_and_resize(self, boxes: torch.Tensor, indices: torch.Tensor, mask_size: int) -> torch.Tensor:
        """Mask targets: instance ``indices[i]`` rasterized inside ``boxes[i]``.

        Args:
            boxes: ``(P, 4)`` XYXY boxes in the image (RoIs).
            indices: ``(P,)`` the instance of each RoI.
            mask_size: side M of the targets.
        Returns:
            float32 ``(P, M, M)`` of 0 / 1, on ``boxes``' device.
        """
        if boxes.shape[0] != indices.shape[0]:
            raise ValueError(f"{boxes.shape[0]} boxes but {indices.shape[0]} instance indices")
        if boxes.shape[0] == 0:
            return boxes.new_zeros((0, mask_size, mask_size), dtype=torch.float32)
        b = boxes.detach().to("cpu", torch.float32).numpy()
        idx = indices.cpu().tolist()
        masks = [rasterize_polygons_within_box(self.polygons[j], b[i], mask_size) for i, j in enumerate(idx)]
        return torch.from_numpy(np.stack(masks)).to(device=boxes.device, dtype=torch.float32)

    def to_bitmasks(self, height: int, width: int) -> torch.Tensor:
        """uint8 ``(N, height, width)``: every instance rasterized over the whole image."""
        if len(self) == 0:
            return torch.zeros((0, height, width), dtype=torch.uint8)
        return torch.from_numpy(
            np.stack([polygons_to_bitmask(inst, height, width) for inst in self.polygons]).astype(np.uint8)
        )
