"""maedet's training data path against detectron2's ``DatasetMapper``, on the same images.

``tools/benchmark.py --task data --reference`` maps the same COCO images with the same
LSJ recipe in both frameworks (one process, one image at a time, the frameworks
alternating image by image, so load changes hit both alike):

- maedet: :class:`~maedet.data.coco.CocoInstanceDataset` with the config's training
  pipeline: decode, flip / resize / crop, polygons clipped, boxes recomputed;
- detectron2: ``DatasetMapper(is_train=True, image_format="RGB", use_instance_mask=True,
  recompute_boxes=True)`` on the dicts of its own ``load_coco_json``, its augmentation
  giving the flip, resize and crop that maedet drew for the image (what
  ``RandomFlip`` + ``ResizeScale`` + ``FixedSizeCrop(pad=False)`` of ViTDet's LSJ loader
  return), so both do the same work.

A DataLoader worker does exactly this per image, so the rate is a worker's rate.
Peak memory per worker: each framework maps the images alone in a fresh process;
the figure is that process's resident-set peak above its size once both frameworks
are imported and the annotation file is loaded. Only detectron2's Python data code
is needed (no compiled ops); without it :func:`detectron2_data_status` says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from maedet.builders.data import build_detection_dataset
from maedet.utils.profiling import PeakRSS, median, rss_bytes

__all__ = ["detectron2_data_status", "compare_mappers"]


def detectron2_data_status() -> Optional[str]:
    """None when detectron2's data code (and shapely, which it crops polygons with) imports."""
    try:
        import shapely  # noqa: F401
        from detectron2.data import DatasetMapper  # noqa: F401
    except Exception as e:
        return (
            f"detectron2's data code is not importable ({type(e).__name__}: {e}); a source checkout on "
            "PYTHONPATH is enough, no build: git clone https://github.com/facebookresearch/detectron2 && "
            "PYTHONPATH=detectron2 python tools/benchmark.py ... (docs/BENCHMARKS.md, 'Data loading')"
        )
    return None


def _mappers(cfg: Any) -> Tuple[int, Callable[[int], Any], Callable[[int], Any]]:
    """(number of images, maedet's map(i), detectron2's map(i)) for the config's training split.

    Both apply the same jitter to image ``i``: maedet's draw with seed ``i``, given to
    detectron2 as its ``HFlipTransform`` / ``ResizeTransform`` / ``CropTransform``, so the
    two do the same work (the same resized sizes and crops)."""
    import detectron2.data.transforms as T
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json

    p = cfg.data.train.pipeline
    if p.name != "lsj":
        raise ValueError(f"the detectron2 data reference mirrors the lsj pipeline, not {p.name!r}")
    ds = build_detection_dataset(cfg.data, "train", train=True, check=False)
    lsj = ds.transforms
    ds.transforms = None
    dicts = load_coco_json(cfg.data.train.json, cfg.data.train.images)
    by_id = {d["image_id"]: d for d in dicts}
    dicts = [by_id[i] for i in ds.image_ids]  # the same images in the same order
    params = []
    for i, d in enumerate(dicts):
        torch.manual_seed(i)
        params.append(lsj.get_params(d["height"], d["width"]))

    class Given(T.Augmentation):
        """The transforms of the image being mapped (set before each call)."""

        transforms: List[Any] = []

        def get_transform(self, image: np.ndarray) -> Any:
            return T.TransformList(list(self.transforms))

    given = Given()
    mapper = DatasetMapper(
        is_train=True,
        augmentations=[given],
        image_format="RGB",
        use_instance_mask=True,
        recompute_boxes=p.recompute_boxes,
    )

    def ours(i: int) -> Any:
        image, target = ds[i]
        return lsj.apply(image, target, params[i])

    def theirs(i: int) -> Any:
        d, q = dicts[i], params[i]
        (h, w), (y0, x0), side = q.size, q.crop, p.image_size
        given.transforms = [T.HFlipTransform(d["width"])] if q.hflip else []
        given.transforms += [T.ResizeTransform(d["height"], d["width"], h, w)]
        given.transforms += [T.CropTransform(x0, y0, side, side, w, h)]
        return mapper(d)

    return len(ds), ours, theirs


def compare_mappers(cfg: Any, images: int, rounds: int) -> Dict[str, Any]:
    """Seconds per image of each framework's mapper, alternating per image over ``images``
    images, ``rounds`` times (medians over rounds), and each one's peak memory alone."""
    with torch.no_grad():
        n, ours, theirs = _mappers(cfg)
        images = min(images, n)
        for i in range(min(2, images)):  # warm-up: imports, first decodes
            ours(i), theirs(i)
        per: Dict[str, List[float]] = {"maedet": [], "detectron2": []}
        instances = {"maedet": 0, "detectron2": 0}
        for r in range(rounds):
            total = {"maedet": 0.0, "detectron2": 0.0}
            for i in range(images):
                order = (("maedet", ours), ("detectron2", theirs))
                for name, fn in order if (i + r) % 2 == 0 else order[::-1]:
                    t0 = time.perf_counter()
                    out = fn(i)
                    total[name] += time.perf_counter() - t0
                    if r == 0:
                        instances[name] += len(out[1]["labels"]) if name == "maedet" else len(out["instances"])
            for name in per:
                per[name].append(total[name] / images)
    result = {
        "images": images,
        "rounds": rounds,
        "instances": instances,
        "s_per_image": {k: median(v) for k, v in per.items()},
        "s_per_image_all": per,
    }
    result["images_per_s"] = {k: 1.0 / v for k, v in result["s_per_image"].items()}
    result["peak_mem_mb"] = {k: _peak_memory_alone(cfg, k, images) for k in per}
    return result


def _peak_memory_alone(cfg: Any, framework: str, images: int) -> float:
    """Peak RSS (MB) of mapping ``images`` images with one framework in a fresh process."""
    from omegaconf import OmegaConf

    cfg_json = json.dumps(OmegaConf.to_container(cfg, resolve=True))
    p = subprocess.run(
        [sys.executable, os.path.abspath(__file__), cfg_json, framework, str(images)],
        capture_output=True,
        text=True,
        env=dict(os.environ),
    )
    if p.returncode != 0:
        raise RuntimeError(f"memory measurement of {framework} failed: {p.stderr.strip()[-2000:]}")
    return float(json.loads(p.stdout.strip().splitlines()[-1])["peak_mb"])


def _memory_child(cfg: Any, framework: str, images: int) -> Dict[str, float]:
    torch.set_num_threads(1)  # a DataLoader worker runs with one thread
    n, ours, theirs = _mappers(cfg)  # both built: the baseline holds both frameworks' imports
    fn = ours if framework == "maedet" else theirs
    base = rss_bytes()
    with PeakRSS(0.001) as peak:
        for i in range(min(images, n)):
            fn(i)
    return {"peak_mb": (peak.peak - base) / 2**20}


if __name__ == "__main__":  # the fresh process of _peak_memory_alone: CONFIG_JSON FRAMEWORK IMAGES
    from omegaconf import OmegaConf

    print(json.dumps(_memory_child(OmegaConf.create(json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3]))))
