"""COCO-format instance segmentation dataset with strict validation of the json.

The json is checked once, at construction, so that a training run never starts on
a dataset it cannot read: every problem gives one :class:`~maedet.utils.errors.DatasetError`
naming the file and the offending image/annotation id.
"""

import contextlib
import io
import json
import logging
import os
import warnings
from typing import Any, Callable, Dict, List, Literal, Optional, Set, Union

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torchvision import tv_tensors

from maedet.data.images import read_image_rgb
from maedet.structures import PolygonMasks
from maedet.utils.errors import DatasetError

__all__ = ["load_coco_json", "CocoInstanceDataset"]

logger = logging.getLogger(__name__)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _read_json(json_file: str, where: str) -> Dict[str, Any]:
    try:
        with open(json_file, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"annotation file not found: {where}") from None
    except IsADirectoryError:
        raise DatasetError(f"annotation file is a directory: {where}") from None
    except json.JSONDecodeError as e:
        raise DatasetError(f"not a valid JSON file: {where} (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except UnicodeDecodeError:
        raise DatasetError(f"not a valid JSON file: {where} (not UTF-8 text)") from None
    except OSError as e:
        raise DatasetError(f"cannot read annotation file: {where} ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{where}: expected a JSON object with 'images', 'annotations' and 'categories'")
    return data


def _segmentation_problem(segm, height: int, width: int) -> Optional[str]:
    """Why ``segm`` is unusable, or None. ``height``/``width`` are the image's."""
    if isinstance(segm, list):
        if len(segm) == 0:
            return "an empty segmentation (expected polygons or RLE)"
        for k, poly in enumerate(segm):
            if not isinstance(poly, list) or not all(_is_number(v) for v in poly):
                return f"segmentation polygon {k} that is not a list of numbers"
            if len(poly) < 6 or len(poly) % 2:
                return (
                    f"a degenerate polygon (polygon {k} has {len(poly)} coordinates;"
                    f" expected an even number >= 6, i.e. at least 3 points)"
                )
        return None
    if isinstance(segm, dict):
        counts, size = segm.get("counts"), segm.get("size")
        if counts is None or size is None:
            return "an RLE segmentation without 'counts' and 'size'"
        if not (isinstance(size, list) and len(size) == 2 and list(size) == [height, width]):
            return f"an RLE segmentation of size {size} (expected [height, width] = [{height}, {width}])"
        if not (isinstance(counts, str) or (isinstance(counts, list) and all(_is_int(c) for c in counts))):
            return "an RLE segmentation whose 'counts' is neither a string nor a list of integers"
        return None
    return f"a segmentation of type {type(segm).__name__} (expected polygons or RLE)"


def _entry_id(where: str, section: str, k: int, entry: Any, seen, kind: str) -> int:
    """The integer ``id`` of ``section[k]``; a DatasetError if it is missing or already in ``seen``."""
    if not isinstance(entry, dict) or not _is_int(entry.get("id")):
        raise DatasetError(f"{where}: {section}[{k}] has no integer 'id'")
    if entry["id"] in seen:
        raise DatasetError(f"{where}: duplicate {kind} id {entry['id']} ({section}[{k}])")
    return entry["id"]


def load_coco_json(
    json_file: str, strict: bool = True, dataset_name: Optional[str] = None, require_masks: bool = True
) -> COCO:
    """Read and validate a COCO instances json.

    Checks: valid JSON object; lists ``images``, ``annotations``, ``categories``;
    unique image, category and annotation ids and image file names; every annotation refers to a known
    image and category, has a ``bbox`` with width and height > 0 and (with
    ``require_masks``) a usable segmentation (polygons with >= 3 points, or an RLE
    of the image's size).
    Missing ``info``/``licenses`` are filled with empty values, a missing ``iscrowd``
    with 0 and a missing ``area`` with the mask area (the box area for an annotation
    without a segmentation), so that ``COCO.loadRes`` and ``COCOeval`` work on the result.

    Args:
        json_file: path of the json.
        strict: if True, a zero-area box, a box entirely outside its image, a
            degenerate segmentation or two images with the same ``file_name`` raise
            (naming the ids); if False such annotations (and the later of two
            same-named images) are dropped with one warning giving their number.
        dataset_name: name used in messages.
        require_masks: every annotation must have a segmentation (a model with a mask
            head); False: box-only data, segmentations are neither needed nor checked.
            A json without any segmentation, or (``strict``) with some annotations
            lacking one, raises naming them and the ways out.

    Returns:
        A ``pycocotools.coco.COCO`` indexed on the validated data.

    Raises:
        DatasetError: with one message naming the file and the offending id.
    """
    where = json_file if dataset_name is None else f"{json_file} (dataset {dataset_name})"
    data = _read_json(json_file, where)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise DatasetError(
                f"{where}: missing key '{key}' (a COCO instances json has 'images', 'annotations' and 'categories')"
            )
        if not isinstance(data[key], list):
            raise DatasetError(f"{where}: '{key}' must be a list, got {type(data[key]).__name__}")

    images: Dict[int, dict] = {}
    dropped: List[str] = []
    dropped_images = set()
    by_name: Dict[str, int] = {}
    seen_ids = set()
    for k, img in enumerate(data["images"]):
        iid = _entry_id(where, "images", k, img, seen_ids, "image")
        seen_ids.add(iid)
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise DatasetError(f"{where}: image id {iid} has no 'file_name'")
        for key in ("height", "width"):
            if not _is_int(img.get(key)) or img[key] <= 0:
                raise DatasetError(f"{where}: image id {iid} has no positive integer '{key}'")
        name = os.path.normpath(img["file_name"])
        if name in by_name:
            problem = f"image ids {by_name[name]} and {iid} have the same file_name {img['file_name']!r}"
            if strict:
                raise DatasetError(
                    f"{where}: {problem}; strict=False (config: data.train.strict / "
                    "data.test.strict) drops the later image and its annotations with a warning"
                )
            dropped.append(problem + f" (image id {iid} dropped)")
            dropped_images.add(iid)
            continue
        by_name[name] = iid
        images[iid] = img
    data["images"] = [img for img in data["images"] if img["id"] not in dropped_images]

    cat_ids = set()
    cat_names: Dict[str, int] = {}
    for k, cat in enumerate(data["categories"]):
        _entry_id(where, "categories", k, cat, cat_ids, "category")
        if not isinstance(cat.get("name"), str):
            raise DatasetError(f"{where}: category id {cat['id']} has no 'name'")
        if cat["name"] in cat_names:
            # class names label the predictions, the pictures and the checkpoint's classes
            raise DatasetError(
                f"{where}: category ids {cat_names[cat['name']]} and {cat['id']} have the same name "
                f"{cat['name']!r} (class names must be distinct; rename one in 'categories')"
            )
        cat_names[cat["name"]] = cat["id"]
        cat_ids.add(cat["id"])
    if not cat_ids:
        raise DatasetError(f"{where}: 'categories' is empty (expected at least one category)")

    ann_ids = set()
    kept = []
    no_segm: List[int] = []  # annotations without a segmentation (``require_masks``)
    for k, ann in enumerate(data["annotations"]):
        aid = _entry_id(where, "annotations", k, ann, ann_ids, "annotation")
        ann_ids.add(aid)
        if ann.get("image_id") in dropped_images:
            continue
        img = images.get(ann.get("image_id"))
        if img is None:
            raise DatasetError(
                f"{where}: annotation id {aid} refers to image_id {ann.get('image_id')!r}, which is not in 'images'"
            )
        if ann.get("category_id") not in cat_ids:
            raise DatasetError(
                f"{where}: annotation id {aid} has category_id {ann.get('category_id')!r}, which is not in"
                f" 'categories' (known ids: {sorted(cat_ids)})"
            )
        iscrowd = ann.setdefault("iscrowd", 0)
        if iscrowd not in (0, 1):
            raise DatasetError(f"{where}: annotation id {aid} has iscrowd={iscrowd!r} (expected 0 or 1)")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DatasetError(f"{where}: annotation id {aid} has bbox {bbox!r} (expected [x, y, width, height])")
        problem = None
        if bbox[2] <= 0 or bbox[3] <= 0:
            problem = f"a bbox with non-positive width or height {bbox} (expected width and height > 0)"
        elif bbox[0] >= img["width"] or bbox[1] >= img["height"] or bbox[0] + bbox[2] <= 0 or bbox[1] + bbox[3] <= 0:
            problem = f"a bbox {bbox} entirely outside its image ({img['width']}x{img['height']}, width x height)"
        elif require_masks and "segmentation" not in ann:
            no_segm.append(aid)
            continue
        elif require_masks:
            problem = _segmentation_problem(ann["segmentation"], img["height"], img["width"])
        if problem is not None:
            if strict:
                raise DatasetError(
                    f"{where}: annotation id {aid} (image id {img['id']}) has {problem}; "
                    "strict=False (config: data.train.strict / data.test.strict) drops such "
                    "annotations with a warning"
                )
            dropped.append(f"annotation id {aid} has {problem}")
            continue
        kept.append(ann)
    if no_segm:
        _missing_segmentations(where, no_segm, len(kept) + len(no_segm), strict, dropped)
    if dropped:
        n_img = len(dropped_images)
        what = f"{len(dropped) - n_img} invalid annotation(s)"
        if n_img:
            what = f"{n_img} image(s) with a duplicate file_name and " + what
        msg = f"{where}: dropped {what}; first: {dropped[0]}"
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        logger.warning(msg)
        data["annotations"] = kept

    data.setdefault("info", {})
    data.setdefault("licenses", [])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    for ann in data["annotations"]:
        if not _is_number(ann.get("area")):
            if "segmentation" in ann and require_masks:
                ann["area"] = float(mask_utils.area(coco.annToRLE(ann)))
            else:
                ann["area"] = float(ann["bbox"][2] * ann["bbox"][3])
    return coco


def _missing_segmentations(where: str, ids: List[int], total: int, strict: bool, dropped: List[str]) -> None:
    """Refuse (or, not ``strict``, drop) annotations without a segmentation for a model with masks."""
    off = "model.roi_heads.mask_on=false (a detector without the mask head, scored by bbox AP)"
    if len(ids) == total:
        raise DatasetError(
            f"{where}: no annotation has a 'segmentation' (box-only data); the model has a mask head: "
            f"train and evaluate box-only with {off}"
        )
    shown = ", ".join(str(i) for i in ids[:8]) + (", ..." if len(ids) > 8 else "")
    if strict:
        raise DatasetError(
            f"{where}: {len(ids)} of {total} annotations have no 'segmentation' (annotation ids {shown}) and the "
            f"model has a mask head; either add their masks, use every box without masks with {off}, or drop "
            "these annotations with strict=False (config: data.train.strict / data.test.strict)"
        )
    dropped.extend(f"annotation id {i} has no 'segmentation' (the model has a mask head)" for i in ids)


def decode_masks(rles: List[dict], height: int, width: int) -> np.ndarray:
    """Decode RLEs (as returned by ``COCO.annToRLE``) to uint8 masks of shape ``(N, H, W)``."""
    if not rles:
        return np.zeros((0, height, width), dtype=np.uint8)
    with warnings.catch_warnings():
        # pycocotools' decode trips NumPy 2's __array__(copy=...) deprecation; harmless.
        warnings.filterwarnings("ignore", message=r"__array__ implementation", category=DeprecationWarning)
        masks = mask_utils.decode(rles)  # (H, W, N), Fortran order
    return np.ascontiguousarray(masks.transpose(2, 0, 1))


class CocoInstanceDataset(torch.utils.data.Dataset):
    """Instance segmentation samples from a COCO-format json.

    Categories are mapped to contiguous labels ``1..K`` in the order of their sorted
    ids (label 0 is background, torchvision's convention). Crowd annotations
    (``iscrowd=1``) are never targets; they stay in :attr:`coco` for evaluation.

    Args:
        json_file: COCO instances json (polygons, compressed or uncompressed RLE).
        image_root: folder that ``images[*].file_name`` are relative to.
        transforms: callable ``(image, target) -> (image, target)`` applied last,
            e.g. :func:`maedet.data.transforms.lsj`.
        filter_empty: training mode: skip images without any non-crowd instance.
            Use False for evaluation (every image is kept).
        dataset_name: name used in error messages.
        strict: see :func:`load_coco_json`.
        load_targets: decode boxes, labels and masks (training); False (evaluation)
            gives targets with ``image_id`` and ``orig_size`` only.
        mask_format: ``"polygon"`` (detectron2's default): an image whose instances are
            all polygons gets :class:`~maedet.structures.PolygonMasks`, transformed as
            polygons and rasterized per RoI; an image with an RLE instance gets bitmaps
            for all its instances. ``"bitmask"``: always bitmaps.
        with_masks: targets carry ``masks`` and every annotation needs a
            segmentation; False: box-only (no ``masks`` key; see :func:`load_coco_json`).

    ``dataset[i]`` returns ``(image, target)`` (before ``transforms``):

    - ``image``: ``tv_tensors.Image`` uint8 ``(3, H, W)``, RGB;
    - ``target["boxes"]``: ``tv_tensors.BoundingBoxes`` float32 ``(N, 4)``, XYXY, canvas ``(H, W)``;
    - ``target["labels"]``: int64 ``(N,)`` in ``1..K``;
    - ``target["masks"]`` (``with_masks``): :class:`~maedet.structures.PolygonMasks` of N
      instances, or ``tv_tensors.Mask`` uint8 ``(N, H, W)`` with values 0/1 (see ``mask_format``);
    - ``target["image_id"]``: ``int``, the COCO image id;
    - ``target["orig_size"]``: ``(H, W)`` ints, the size of the image file.

    Raises:
        DatasetError: invalid json (see :func:`load_coco_json`), missing image files
            (checked at construction), or an image whose decoded size differs from the json.
    """

    def __init__(
        self,
        json_file: str,
        image_root: str,
        transforms: Optional[Callable] = None,
        filter_empty: bool = True,
        dataset_name: Optional[str] = None,
        strict: bool = True,
        load_targets: bool = True,
        mask_format: Literal["polygon", "bitmask"] = "polygon",
        with_masks: bool = True,
    ):
        if mask_format not in ("polygon", "bitmask"):
            raise ValueError(f"mask_format must be 'polygon' or 'bitmask', got {mask_format!r}")
        self.mask_format, self.with_masks = mask_format, bool(with_masks)
        self.json_file, self.image_root, self.dataset_name = json_file, image_root, dataset_name
        self.transforms, self.filter_empty, self.load_targets = transforms, filter_empty, load_targets
        where = json_file if dataset_name is None else f"{json_file} (dataset {dataset_name})"
        self._where = where
        if not os.path.isdir(image_root):
            raise DatasetError(f"image folder not found: {image_root} (images of {where})")
        self.coco = load_coco_json(json_file, strict=strict, dataset_name=dataset_name, require_masks=self.with_masks)

        self.cat_ids: List[int] = sorted(self.coco.cats.keys())
        self.cat_id_to_label: Dict[int, int] = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat_id: Dict[int, int] = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.class_names: List[str] = [self.coco.cats[c]["name"] for c in self.cat_ids]

        image_ids = []
        self._instances: Dict[int, List[dict]] = {}
        for iid in sorted(self.coco.imgs.keys()):
            anns = [a for a in self.coco.imgToAnns.get(iid, []) if not a.get("iscrowd", 0)]
            if filter_empty and not anns:
                continue
            image_ids.append(iid)
            self._instances[iid] = anns
        if not image_ids:
            what = "with a non-crowd annotation" if filter_empty else "listed"
            raise DatasetError(f"{where}: no images {what} (expected at least one)")
        self.image_ids: List[int] = image_ids

        missing = [p for p in (self._path(iid) for iid in image_ids) if not os.path.isfile(p)]
        if missing:
            raise DatasetError(
                f"{len(missing)} of {len(image_ids)} images listed in {where} are missing; first: {missing[0]}"
            )

    def remove_images(self, image_ids: Set[int]) -> None:
        """Leave these images out (e.g. files found unreadable before training)."""
        self.image_ids = [i for i in self.image_ids if i not in image_ids]
        if not self.image_ids:
            raise DatasetError(f"{self._where}: no usable image left after leaving out {len(image_ids)} bad ones")

    @property
    def num_classes(self) -> int:
        """Number of categories K (labels are 1..K)."""
        return len(self.cat_ids)

    def _path(self, image_id: int) -> str:
        return os.path.join(self.image_root, self.coco.imgs[image_id]["file_name"])

    def __len__(self) -> int:
        return len(self.image_ids)

    def get_image_info(self, index: int) -> Dict[str, Any]:
        """The json's image record of item ``index`` plus ``file_path`` (full path)."""
        iid = self.image_ids[index]
        info = dict(self.coco.imgs[iid])
        info["file_path"] = self._path(iid)
        return info

    def image_categories(self, index: int) -> Set[int]:
        """Category ids of every annotation of item ``index`` (crowd regions included, as
        detectron2's repeat factors count them)."""
        return {int(a["category_id"]) for a in self.coco.imgToAnns.get(self.image_ids[index], [])}

    def class_image_counts(self) -> List[int]:
        """Per label 1..K, the number of this dataset's images that show the category."""
        counts = [0] * len(self.cat_ids)
        for i in range(len(self)):
            for cat in self.image_categories(i):
                counts[self.cat_id_to_label[cat] - 1] += 1
        return counts

    def num_instances(self, index: int) -> int:
        """Number of target instances (non-crowd annotations) of item ``index``."""
        return len(self._instances[self.image_ids[index]])

    def load_target(self, index: int, height: int, width: int) -> Dict[str, Any]:
        """Target dict of item ``index`` (see the class docstring) for an ``height x width`` image."""
        iid = self.image_ids[index]
        anns = self._instances[iid]
        if anns:
            xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
            boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
            boxes = boxes.to(torch.float32)
            labels = torch.tensor([self.cat_id_to_label[a["category_id"]] for a in anns], dtype=torch.int64)
        else:
            boxes = torch.zeros((0, 4), dtype=torch.float32)
            labels = torch.zeros((0,), dtype=torch.int64)
        target: Dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": labels,
        }
        if self.with_masks:
            target["masks"] = self._masks(anns, height, width)
        target.update(image_id=int(iid), orig_size=(int(height), int(width)))
        return target

    def _masks(self, anns: List[dict], height: int, width: int) -> Union[PolygonMasks, tv_tensors.Mask]:
        if anns and self.mask_format == "polygon" and all(isinstance(a["segmentation"], list) for a in anns):
            return PolygonMasks([a["segmentation"] for a in anns])
        rles = [self.coco.annToRLE(a) for a in anns]
        return tv_tensors.Mask(torch.from_numpy(decode_masks(rles, height, width)))

    def __getitem__(self, index: int):
        iid = self.image_ids[index]
        info = self.coco.imgs[iid]
        path = self._path(iid)
        array = read_image_rgb(path)
        height, width = array.shape[:2]
        if (height, width) != (info["height"], info["width"]):
            raise DatasetError(
                f"image size mismatch: {path} is {width}x{height} (width x height) but {self._where}"
                f" says {info['width']}x{info['height']} for image id {iid}"
            )
        # (3, H, W) over the decoder's (H, W, 3) memory: the transforms resize it in that layout
        image = tv_tensors.Image(torch.from_numpy(array).permute(2, 0, 1))
        if not self.load_targets:
            target = {"image_id": int(iid), "orig_size": (int(height), int(width))}
        else:
            target = self.load_target(index, height, width)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target
