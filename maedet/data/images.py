"""Image reading and the unlabeled image dataset used for MAE pretraining.

:func:`read_image_rgb` is the one place where image files are decoded; both the
unlabeled :class:`ImageFolderDataset` and the COCO instance dataset use it, so a
corrupt, truncated or non-image file always gives the same clear
:class:`~maedet.utils.errors.DatasetError` naming the file.
"""

import json
import os
import warnings
from typing import Callable, List, Optional

import cv2
import numpy as np
import torch
from torchvision import tv_tensors

from maedet.utils.errors import DatasetError

__all__ = ["IMAGE_EXTENSIONS", "check_complete", "read_image_rgb", "find_images", "ImageFolderDataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_complete(data: bytes, path: str) -> None:
    """Raise if ``data`` is a JPEG or PNG stream that was cut short.

    Depending on the build, OpenCV may decode a truncated JPEG or PNG partially
    (the missing rows become gray) and only print a warning, so truncation is
    detected from the stream itself:

    - JPEG: the end-of-image marker ``FF D9`` must follow the last start-of-scan
      marker ``FF DA`` (entropy-coded data never contains ``FF D9``, and an
      embedded EXIF thumbnail ends before the main image's scans start);
    - PNG: the ``IEND`` chunk must be present.
    """
    if data.startswith(_JPEG_MAGIC):
        last_sos = data.rfind(b"\xff\xda")
        if last_sos < 0 or data.rfind(b"\xff\xd9") < last_sos:
            raise DatasetError(f"corrupt image: {path} (truncated JPEG: no end-of-image marker after the image data)")
    elif data.startswith(_PNG_MAGIC) and data.rfind(b"IEND") < 0:
        raise DatasetError(f"corrupt image: {path} (truncated PNG: no IEND chunk)")


def read_image_rgb(path: str) -> np.ndarray:
    """Read an image file as an RGB array.

    Grayscale, CMYK, 16-bit and alpha images are converted to 8-bit, 3-channel
    RGB. The EXIF orientation of camera photos is applied, as image viewers,
    COCO annotation tools and detectron2 apply it, so pixels and annotations
    agree (a photo tagged "rotated 90 degrees" comes out upright, its width and
    height swapped). This is the one place images are decoded: pretraining,
    training, evaluation and inference all see the same pixels.

    Args:
        path: image file (any format OpenCV decodes: JPEG, PNG, WebP, BMP, ...).

    Returns:
        ``np.ndarray`` of shape ``(H, W, 3)``, dtype ``uint8``, channels RGB.

    Raises:
        DatasetError: the file is missing, empty, truncated or not a decodable
            image; the message names ``path``.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise DatasetError(f"image not found: {path}") from None
    except IsADirectoryError:
        raise DatasetError(f"not an image file (it is a directory): {path}") from None
    except OSError as e:
        raise DatasetError(f"cannot read image: {path} ({e.strerror or e})") from None
    if len(data) == 0:
        raise DatasetError(f"corrupt image: {path} (empty file, 0 bytes)")
    check_complete(data, path)
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR_RGB)  # RGB straight from the decoder; applies the EXIF orientation
    if img is None or img.ndim != 3 or img.shape[2] != 3 or img.shape[0] == 0 or img.shape[1] == 0:
        raise DatasetError(f"corrupt image: {path} (not a decodable image file)")
    return img


def find_images(root: str) -> List[str]:
    """All image files under ``root``, searched recursively.

    Args:
        root: folder to search; files whose extension (case-insensitive) is one
            of :data:`IMAGE_EXTENSIONS` are returned.

    Returns:
        Sorted list of paths (``root`` joined with the relative path), so the
        order is the same on every machine.

    Raises:
        DatasetError: ``root`` does not exist or holds no image.
    """
    if not os.path.isdir(root):
        raise DatasetError(f"image folder not found: {root}")
    paths = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in filenames:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(os.path.join(dirpath, name))
    if not paths:
        raise DatasetError(f"no images (jpg/jpeg/png/webp/bmp) found under {root}")
    rel = sorted(os.path.relpath(p, root) for p in paths)
    return [os.path.join(root, r) for r in rel]


def read_coco_image_entries(coco_json: str, need_id: bool = False) -> List[dict]:
    """The ``images`` entries of a COCO json, each checked to have a ``file_name``
    (and an ``id`` with ``need_id``); any problem is a DatasetError naming the file."""
    try:
        with open(coco_json, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise DatasetError(f"annotation file not found: {coco_json}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"not a valid JSON file: {coco_json} ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{coco_json}: missing key 'images' (expected a COCO json with a list of images)")
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not isinstance(img.get("file_name"), str) or (need_id and "id" not in img):
            need = "'file_name' string and an 'id'" if need_id else "'file_name' string"
            raise DatasetError(f"{coco_json}: images[{i}] has no {need}")
    return data["images"]


def _images_from_coco_json(coco_json: str, image_root: str) -> List[str]:
    """Image paths listed in a COCO json (``images[*].file_name`` under ``image_root``)."""
    paths = [os.path.join(image_root, img["file_name"]) for img in read_coco_image_entries(coco_json)]
    if not paths:
        raise DatasetError(f"{coco_json}: 'images' is empty (expected at least one image)")
    return paths


class ImageFolderDataset(torch.utils.data.Dataset):
    """Unlabeled images for MAE pretraining: a folder tree or the images of a COCO json.

    Args:
        root: folder searched recursively for jpg/jpeg/png/webp/bmp files
            (case-insensitive). Exactly one of ``root`` and ``coco_json`` is given.
        coco_json: a COCO json; its ``images[*].file_name`` are read under ``image_root``.
        image_root: folder of the COCO json's images (default: the json's folder).
        transform: callable applied to the ``tv_tensors.Image`` uint8 ``(3, H, W)``
            tensor, e.g. :func:`maedet.data.transforms.build_mae_transform`.
        on_bad_image: ``"fail"`` raises :class:`DatasetError` naming the bad file;
            ``"skip"`` replaces it by the next readable image (index + 1, + 2, ...),
            counts it in :attr:`num_skipped` and warns once per file per process.

    ``dataset[i]`` returns ``transform(image)``, or the uint8 ``(3, H, W)`` image
    when there is no transform.
    """

    def __init__(
        self,
        root: Optional[str] = None,
        coco_json: Optional[str] = None,
        image_root: Optional[str] = None,
        transform: Optional[Callable] = None,
        on_bad_image: str = "fail",
    ):
        if on_bad_image not in ("fail", "skip"):
            raise DatasetError(f"on_bad_image must be 'fail' or 'skip', got {on_bad_image!r}")
        if (root is None) == (coco_json is None):
            raise DatasetError("ImageFolderDataset needs exactly one of root= (a folder) or coco_json=")
        if root is not None:
            self.paths = find_images(root)
        else:
            if image_root is None:
                image_root = os.path.dirname(os.path.abspath(coco_json))
            if not os.path.isdir(image_root):
                raise DatasetError(f"image folder not found: {image_root} (images of {coco_json})")
            self.paths = _images_from_coco_json(coco_json, image_root)
            if on_bad_image == "fail":
                missing = [p for p in self.paths if not os.path.exists(p)]
                if missing:
                    raise DatasetError(
                        f"{len(missing)} of {len(self.paths)} images listed in {coco_json} are missing;"
                        f" first: {missing[0]}"
                    )
        self.transform = transform
        self.on_bad_image = on_bad_image
        # In shared memory, so increments made in DataLoader worker processes are
        # visible to the main process (fork or spawn); a plain copy when pickled otherwise.
        self._skip_counter = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._warned = set()

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_skipped(self) -> int:
        """How many reads of bad images were replaced so far (all worker processes)."""
        return int(self._skip_counter.item())

    def _load(self, index: int) -> tv_tensors.Image:
        img = read_image_rgb(self.paths[index])
        return tv_tensors.Image(torch.from_numpy(img).permute(2, 0, 1).contiguous())

    def __getitem__(self, index: int):
        n = len(self.paths)
        for attempt in range(n):
            i = (index + attempt) % n
            try:
                image = self._load(i)
                break
            except DatasetError as e:
                if self.on_bad_image == "fail":
                    raise
                self._skip_counter += 1
                path = self.paths[i]
                if path not in self._warned:
                    self._warned.add(path)
                    warnings.warn(f"skipping bad image: {e}", RuntimeWarning, stacklevel=2)
        else:
            raise DatasetError(f"no readable image among the {n} images (first: {self.paths[0]})")
        if self.transform is not None:
            return self.transform(image)
        return image
