"""Box-only detection data: a detector without the mask head (``model.roi_heads.mask_on=false``),
trained and scored on a COCO json without segmentations; a json with some missing refused
with the ids and the ways out."""

import json
import os
import subprocess
import sys

import pytest
import torch
from torchvision import tv_tensors

from maedet.builders.config import load_detection_config
from maedet.builders.model import predicts_masks
from maedet.builders.tasks import best_metric, eval_tasks
from maedet.checkpoint.describe import describe_checkpoint
from maedet.data.coco import CocoInstanceDataset, load_coco_json
from maedet.data.transforms import LargeScaleJitter, LSJParams
from maedet.utils.errors import ConfigError, DatasetError
from tests.conftest import REPO_ROOT, require_data

BOX_CONFIG = "configs/quickstart/faster_rcnn_vit_tiny_fruits_nuts.yaml"
MASK_CONFIG = "configs/quickstart/mask_rcnn_vit_tiny_fruits_nuts.yaml"


def _fruits(tmp_path, drop_every=1):
    """fruits_nuts' json with the segmentation (and area) of every ``drop_every``-th annotation removed."""
    src = require_data("fruits_nuts", "trainval.json")
    with open(src) as f:
        data = json.load(f)
    for a in data["annotations"][::drop_every]:
        a.pop("segmentation")
        a.pop("area", None)
    path = tmp_path / f"fruits_drop{drop_every}.json"
    path.write_text(json.dumps(data))
    return str(path), require_data("fruits_nuts", "images"), data


def test_json_without_segmentations_loads_box_only_and_is_refused_with_masks(tmp_path):
    path, images, data = _fruits(tmp_path)
    coco = load_coco_json(path, require_masks=False)
    a = data["annotations"][0]
    assert coco.anns[a["id"]]["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3])  # box area, no mask
    ds = CocoInstanceDataset(path, images, with_masks=False)
    _, target = ds[0]
    assert "masks" not in target and target["boxes"].shape[0] == ds.num_instances(0) > 0
    with pytest.raises(DatasetError, match=r"no annotation has a 'segmentation' .*model.roi_heads.mask_on=false"):
        CocoInstanceDataset(path, images)


def test_mixed_json_names_the_annotations_and_the_choices(tmp_path):
    path, images, data = _fruits(tmp_path, drop_every=7)
    ids = [a["id"] for a in data["annotations"][::7]]
    with pytest.raises(DatasetError) as e:
        CocoInstanceDataset(path, images)
    msg = str(e.value)
    assert f"{len(ids)} of {len(data['annotations'])} annotations have no 'segmentation'" in msg
    assert "annotation ids " + ", ".join(str(i) for i in ids[:8]) in msg
    assert "mask_on=false" in msg and "strict=False" in msg
    with pytest.warns(RuntimeWarning, match=f"dropped {len(ids)} invalid annotation"):
        lax = CocoInstanceDataset(path, images, strict=False)
    assert len(lax.coco.anns) == len(data["annotations"]) - len(ids)
    assert len(CocoInstanceDataset(path, images, with_masks=False).coco.anns) == len(data["annotations"])


def test_lsj_without_masks_moves_boxes_as_with_masks_without_recompute(fruits_nuts_root):
    ds = CocoInstanceDataset(os.path.join(fruits_nuts_root, "trainval.json"), os.path.join(fruits_nuts_root, "images"))
    image, target = ds[3]
    lsj = LargeScaleJitter(320, 0.4, 1.0, hflip=True, recompute_boxes=False)
    for params in (LSJParams(True, (240, 320), (0, 0)), LSJParams(False, (480, 640), (100, 200))):
        _, with_masks = lsj.apply(image, target, params)
        boxes_only = {k: v for k, v in target.items() if k != "masks"}
        _, without = lsj.apply(image, boxes_only, params)
        assert "masks" not in without
        # the same boxes, minus the instances whose mask the crop emptied
        kept = with_masks["boxes"].as_subclass(torch.Tensor)
        got = without["boxes"].as_subclass(torch.Tensor)
        assert isinstance(without["boxes"], tv_tensors.BoundingBoxes) and got.shape[0] >= kept.shape[0] > 0
        assert all(any(torch.equal(b, g) for g in got) for b in kept)


def test_config_switch_and_metrics():
    for path, masks in ((BOX_CONFIG, False), (MASK_CONFIG, True)):
        cfg = load_detection_config(os.path.join(REPO_ROOT, path), splits=())
        assert predicts_masks(cfg.model) is masks
        assert eval_tasks(cfg.model) == (("bbox", "segm") if masks else ("bbox",))
        assert best_metric(cfg) == ("segm/AP" if masks else "bbox/AP")
    box = load_detection_config(os.path.join(REPO_ROOT, BOX_CONFIG), ["test.best_metric=segm/AP"], splits=())
    with pytest.raises(ConfigError, match="segm/AP.*not computed"):
        best_metric(box)
    box = load_detection_config(os.path.join(REPO_ROOT, MASK_CONFIG), ["model.roi_heads.mask_on=false"], splits=())
    assert best_metric(box) == "bbox/AP" and not predicts_masks(box.model)


def _tool(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, env=env)


BOX_ITERS = 100


def test_box_only_fruits_nuts_trains_evaluates_and_infers(tmp_path):
    """The box-only recipe on fruits_nuts without segmentations, through the tools: bbox AP > 0,
    no segm score, a checkpoint without mask head; --eval-only and infer.py work on it, and
    the Mask R-CNN config refuses it, naming the switch."""
    path, images, _ = _fruits(tmp_path)
    data = [f"data.{s}.json={path}" for s in ("train", "test")] + [
        f"data.{s}.images={images}" for s in ("train", "test")
    ]
    out = tmp_path / "run"
    proc = _tool(
        "tools/train_net.py",
        "--config",
        BOX_CONFIG,
        "--output-dir",
        str(out),
        *data,
        f"solver.max_iter={BOX_ITERS}",
        f"solver.steps=[{BOX_ITERS * 4 // 5}]",
        "test.eval_period=0",
        "train.checkpoint_period=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "metrics.jsonl") as f:
        final = [json.loads(line) for line in f if '"bbox/AP"' in line][-1]
    assert final["bbox/AP"] > 0 and not any(k.startswith("segm/") for k in final), final
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=True)
    assert not any("mask" in k for k in ckpt["model"]) and any(k.startswith("roi_heads.box_") for k in ckpt["model"])
    assert describe_checkpoint(str(out / "model_final.pth")).fields["heads"].startswith("Faster R-CNN (no mask head")
    assert torch.load(out / "model_best.pth", map_location="cpu", weights_only=True)["meta"]["bbox/AP"] > 0

    weights = f"model.weights={out / 'model_final.pth'}"
    proc = _tool("tools/train_net.py", "--config", BOX_CONFIG, "--eval-only", "--output-dir", str(out), *data, weights)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "eval" / "eval_metrics.json") as f:
        scores = json.load(f)
    assert scores["bbox"]["AP"] == pytest.approx(final["bbox/AP"], abs=1e-6) and "segm" not in scores

    pics = tmp_path / "pics"
    proc = _tool(
        "tools/infer.py",
        "--config",
        BOX_CONFIG,
        "--weights",
        str(out / "model_final.pth"),
        "--input",
        images,
        "--output",
        str(pics),
        "--json",
        str(pics / "results.json"),
        "--score-thresh",
        "0.05",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(pics / "results.json") as f:
        dets = json.load(f)
    assert dets and all("bbox" in d and "segmentation" not in d for d in dets)

    proc = _tool("tools/train_net.py", "--config", MASK_CONFIG, "--output-dir", str(tmp_path / "masks"), *data)
    assert proc.returncode == 2 and "model.roi_heads.mask_on=false" in proc.stderr.strip().splitlines()[-1]
    proc = _tool("tools/train_net.py", "--config", MASK_CONFIG, "--eval-only", "--output-dir", str(out), weights)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2 and "has no mask head" in last and "Faster R-CNN (no mask head" in last, last
