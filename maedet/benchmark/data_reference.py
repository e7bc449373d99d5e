"""maedet's training data path against detectron2's ``DatasetMapper``, on the same images.

``tools/benchmark.py --task data --reference`` maps the same COCO images with the same
LSJ recipe in both frameworks (one process, one image at a time, the frameworks
alternating image by image, so load changes hit both alike):

- maedet: :class:`~maedet.data.coco.CocoInstanceDataset` with the config's training
  pipeline: decode, flip / resize / crop, polygons clipped, boxes recomputed;
- detectron2: ``DatasetMapper(is_train=True, augmentations=[RandomFlip, ResizeScale,
  FixedSizeCrop(pad=False)], image_format="RGB", use_instance_mask=True,
  recompute_boxes=True)`` on the dicts of its own ``load_coco_json`` (the ViTDet LSJ
  loader of ``projects/ViTDet/configs/common/coco_loader_lsj.py``).

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
from maedet.data.samplers import SeededDataset
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
    """(number of images, maedet's map(i), detectron2's map(i)) for the config's training split."""
    import detectron2.data.transforms as T
    from detectron2.data import DatasetMapper
    from detectron2.data.datasets import load_coco_json

    p = cfg.data.train.pipeline
    if p.name != "lsj":
        raise ValueError(f"the detectron2 data reference mirrors the lsj pipeline, not {p.name!r}")
    ds = build_detection_dataset(cfg.data, "train", train=True, check=False)
    seeded = SeededDataset(ds)
    dicts = load_coco_json(cfg.data.train.json, cfg.data.train.images)
    by_id = {d["image_id"]: d for d in dicts}
    dicts = [by_id[i] for i in ds.image_ids]  # the same images in the same order
    augs = [T.RandomFlip(horizontal=True)] if p.hflip else []
    augs += [
        T.ResizeScale(p.min_scale, p.max_scale, p.image_size, p.image_size),
        T.FixedSizeCrop((p.image_size, p.image_size), pad=False),
    ]
    mapper = DatasetMapper(
        is_train=True,
        augmentations=augs,
        image_format="RGB",
        use_instance_mask=True,
        recompute_boxes=p.recompute_boxes,
    )

    def d2(i: int) -> Any:
        np.random.seed(i)
        return mapper(dicts[i])

    return len(ds), (lambda i: seeded[(i, 0)]), d2


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

    code = (
        "import json, sys; from omegaconf import OmegaConf; "
        "from maedet.benchmark.data_reference import _memory_child; "
        "print(json.dumps(_memory_child(OmegaConf.create(json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3]))))"
    )
    cfg_json = json.dumps(OmegaConf.to_container(cfg, resolve=True))
    p = subprocess.run(
        [sys.executable, "-c", code, cfg_json, framework, str(images)],
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
