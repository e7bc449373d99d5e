"""The built-in toy instance-segmentation dataset: simple shapes on textured backgrounds.

Three classes (circle, triangle, square) in random colors, sizes, rotations and
positions, overlapping with occlusion; every instance mask is the exact set of its
visible pixels, stored as compressed RLE. Each image is a function of
``(seed, split, index)`` only, so the files are bit-identical across runs and
adding images never changes earlier ones. Nothing is downloaded.

Layout written under ``output_dir``::

    annotations/instances_train.json   annotations/instances_val.json
    train/000001.jpg ...               val/000001.jpg ...
"""

import json
import os
from typing import Dict, List, Optional, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

__all__ = ["TOY_CATEGORIES", "generate_toy_dataset", "render_toy_scene"]

TOY_CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "triangle", "supercategory": "shape"},
    {"id": 3, "name": "square", "supercategory": "shape"},
]

_SPLIT_CODES = {"train": 0, "val": 1}
_MIN_VISIBLE_FRACTION = 0.6


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted textured background: a color gradient, smooth blobs and fine noise. ``(S, S, 3)`` uint8."""
    c0 = rng.uniform(70, 170, size=3)
    c1 = rng.uniform(70, 170, size=3)
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
    coarse = rng.normal(0, 18, size=(6, 6, 3)).astype(np.float32)
    img += cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0, 6, size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(rng: np.random.Generator, category_id: int, size: int) -> np.ndarray:
    """Full (unoccluded) mask of one random shape: ``(S, S)`` uint8 0/1."""
    mask = np.zeros((size, size), dtype=np.uint8)
    r = rng.uniform(0.09, 0.2) * size  # circumradius
    cx, cy = rng.uniform(r * 0.6, size - r * 0.6, size=2)
    theta = rng.uniform(0, 2 * np.pi)
    if category_id == 1:
        cv2.circle(mask, (int(round(cx)), int(round(cy))), int(round(r)), 1, thickness=-1)
    else:
        corners = 3 if category_id == 2 else 4
        angles = theta + np.arange(corners) * 2 * np.pi / corners
        pts = np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], axis=1)
        cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1)
    return mask


def _color(rng: np.random.Generator) -> np.ndarray:
    """A saturated color that stands out from the muted background."""
    hue = rng.integers(0, 180)
    hsv = np.array([[[hue, rng.integers(170, 256), rng.integers(150, 256)]]], dtype=np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def render_toy_scene(
    rng: np.random.Generator, size: int, max_objects: int = 5
) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """Draw one scene.

    Args:
        rng: source of randomness (the scene is a function of its state).
        size: side S of the square image.
        max_objects: at most this many shapes (at least 1).

    Returns:
        ``(image, instances)``: RGB uint8 ``(S, S, 3)`` and a list of
        ``(category_id, visible_mask)`` with masks ``(S, S)`` uint8 0/1, non-empty,
        pairwise disjoint, each showing at least 60% of its shape.
    """
    image = _background(rng, size).astype(np.float32)
    wanted = int(rng.integers(1, max_objects + 1))
    full: List[np.ndarray] = []
    cats: List[int] = []
    for _ in range(wanted):
        for _attempt in range(20):
            cat = int(rng.integers(1, 4))
            m = _shape_mask(rng, cat, size).astype(bool)
            # Placing m on top must leave every earlier shape mostly visible.
            ok = True
            for k, prev in enumerate(full):
                covered = m.copy()
                for later in full[k + 1 :]:
                    covered |= later
                if (prev & ~covered).sum() < _MIN_VISIBLE_FRACTION * prev.sum():
                    ok = False
                    break
            if ok:
                full.append(m)
                cats.append(cat)
                break
    instances: List[Tuple[int, np.ndarray]] = []
    occluder = np.zeros((size, size), dtype=bool)
    visible: List[np.ndarray] = [None] * len(full)
    for k in range(len(full) - 1, -1, -1):  # top-most first
        visible[k] = full[k] & ~occluder
        occluder |= full[k]
    for m in full:  # paint bottom to top
        color = _color(rng)
        shade = rng.normal(0, 8, size=(size, size, 1)).astype(np.float32)
        image = np.where(m[..., None], color[None, None, :] + shade, image)
    image = np.clip(image, 0, 255).astype(np.uint8)
    for k in range(len(full)):
        if visible[k].any():
            instances.append((cats[k], visible[k].astype(np.uint8)))
    return image, instances


def _write_split(output_dir: str, split: str, num_images: int, image_size: int, seed: int) -> str:
    img_dir = os.path.join(output_dir, split)
    os.makedirs(img_dir, exist_ok=True)
    images: List[Dict] = []
    annotations: List[Dict] = []
    ann_id = 1
    for i in range(num_images):
        rng = np.random.default_rng([int(seed), _SPLIT_CODES[split], i])
        image, instances = render_toy_scene(rng, image_size)
        file_name = f"{i + 1:06d}.jpg"
        ok, buf = cv2.imencode(".jpg", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
        if not ok:
            raise RuntimeError(f"cannot encode {file_name}")
        with open(os.path.join(img_dir, file_name), "wb") as f:
            f.write(buf.tobytes())
        images.append({"id": i + 1, "file_name": file_name, "height": image_size, "width": image_size})
        for cat, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask))
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": i + 1,
                    "category_id": cat,
                    "segmentation": {"size": [image_size, image_size], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)),
                    "bbox": [x, y, w, h],
                    "iscrowd": 0,
                }
            )
            ann_id += 1
    data = {
        "info": {"description": f"maedet toy shapes ({split})", "version": "1.0", "seed": int(seed)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": TOY_CATEGORIES,
    }
    ann_dir = os.path.join(output_dir, "annotations")
    os.makedirs(ann_dir, exist_ok=True)
    json_path = os.path.join(ann_dir, f"instances_{split}.json")
    tmp = json_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, json_path)
    return json_path


def generate_toy_dataset(
    output_dir: str,
    num_train: int = 64,
    num_val: int = 16,
    image_size: int = 192,
    seed: int = 0,
) -> Dict[str, Tuple[str, str]]:
    """Write the toy dataset (see the module docstring) under ``output_dir``.

    Args:
        output_dir: destination folder (created; existing files are overwritten).
        num_train, num_val: numbers of images per split.
        image_size: side of the square images, in pixels.
        seed: the dataset is a deterministic function of it.

    Returns:
        ``{"train": (json_file, image_root), "val": (json_file, image_root)}``.
    """
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    out: Dict[str, Tuple[str, str]] = {}
    for split, n in (("train", num_train), ("val", num_val)):
        json_path = _write_split(output_dir, split, int(n), int(image_size), int(seed))
        out[split] = (json_path, os.path.join(output_dir, split))
    return out


def _main(argv: Optional[List[str]] = None) -> None:  # used by datasets/prepare_toy.py
    import argparse
    import time

    parser = argparse.ArgumentParser(description="Generate the maedet toy shapes dataset (COCO format).")
    parser.add_argument(
        "--output",
        default=os.path.join(os.environ.get("MAEDET_DATASETS", "datasets"), "toy"),
        help="output folder (default: $MAEDET_DATASETS/toy, i.e. datasets/toy)",
    )
    parser.add_argument("--num-train", type=int, default=64, help="training images (default 64)")
    parser.add_argument("--num-val", type=int, default=16, help="validation images (default 16)")
    parser.add_argument("--size", type=int, default=192, help="image side in pixels (default 192)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    t0 = time.time()
    paths = generate_toy_dataset(args.output, args.num_train, args.num_val, args.size, args.seed)
    for split, (json_file, image_root) in paths.items():
        print(f"{split}: {json_file} (images in {image_root})")
    print(f"done in {time.time() - t0:.1f} s")
