"""COCO evaluation on the real coco_mini val2017 annotations (79 images, 624 instances)."""

import contextlib
import copy
import io
import json
import math
import os

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from maedet.evaluation import (
    COCO_METRIC_NAMES,
    COCOEvaluator,
    evaluate_results_file,
    instances_to_coco_json,
    print_coco_table,
)
from maedet.utils.errors import DatasetError

try:
    from conftest import require_data
except ImportError:  # tests/ imported as a package
    from tests.conftest import require_data

# pycocotools' own mask decoding warns under numpy 2; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def val_json():
    return require_data("coco_mini", "annotations", "instances_val2017.json")


@pytest.fixture(scope="module")
def coco_gt(val_json):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(val_json)


@pytest.fixture(scope="module")
def label_maps(coco_gt):
    cat_ids = sorted(coco_gt.getCatIds())
    label_to_cat_id = {i + 1: c for i, c in enumerate(cat_ids)}
    cat_to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
    return label_to_cat_id, cat_to_label


def gt_as_outputs(coco_gt, cat_to_label, image_id, rng=None, masks=True):
    """The non-crowd ground truth of one image in the model output convention.

    With ``rng``: boxes jittered by up to 8 px, masks shifted by a few pixels,
    about 20% of the instances dropped and random scores.
    """
    info = coco_gt.imgs[image_id]
    h, w = info["height"], info["width"]
    anns = [a for a in coco_gt.imgToAnns[image_id] if not a.get("iscrowd", 0)]
    boxes, labels, ms = [], [], []
    for a in anns:
        if rng is not None and rng.random() < 0.2:
            continue
        x, y, bw, bh = a["bbox"]
        box = [x, y, x + bw, y + bh]
        m = coco_gt.annToMask(a)
        if rng is not None:
            box = [v + float(rng.uniform(-8, 8)) for v in box]
            m = np.roll(m, shift=(int(rng.integers(-3, 4)), int(rng.integers(-3, 4))), axis=(0, 1))
        boxes.append(box)
        labels.append(cat_to_label[a["category_id"]])
        ms.append(m)
    n = len(boxes)
    if rng is not None:
        scores = torch.as_tensor(rng.uniform(0.05, 1.0, size=n), dtype=torch.float32)
    else:
        scores = torch.ones(n)
    out = {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": scores,
        "labels": torch.tensor(labels, dtype=torch.int64),
    }
    if masks:
        out["masks"] = torch.from_numpy(np.stack(ms)).float()[:, None] if n else torch.zeros((0, 1, h, w))
    return out


@pytest.fixture(scope="module")
def gt_evaluation(coco_gt, label_maps, tmp_path_factory):
    """Ground truth fed back as predictions through process/evaluate."""
    label_to_cat_id, cat_to_label = label_maps
    out_dir = str(tmp_path_factory.mktemp("gt_eval"))
    ev = COCOEvaluator(coco_gt, label_to_cat_id, output_dir=out_dir)
    ev.reset()
    ids = sorted(coco_gt.getImgIds())
    for i in range(0, len(ids), 4):  # batches of 4 images
        batch = ids[i : i + 4]
        ev.process(batch, [gt_as_outputs(coco_gt, cat_to_label, j) for j in batch])
    return ev.evaluate(), os.path.join(out_dir, "coco_instances_results.json")


def test_ground_truth_as_predictions_gives_ap_100(gt_evaluation):
    results, _ = gt_evaluation
    assert set(results) == {"bbox", "segm"}
    for task in ("bbox", "segm"):
        assert set(results[task]) == set(COCO_METRIC_NAMES)
        assert results[task]["AP"] == pytest.approx(100.0)
        assert results[task]["AP50"] == pytest.approx(100.0)
        assert results[task]["AP75"] == pytest.approx(100.0)
        assert results[task]["AR100"] == pytest.approx(100.0)


def test_results_json_rle_round_trip(gt_evaluation, coco_gt):
    _, path = gt_evaluation
    with open(path) as f:
        records = json.load(f)
    non_crowd = [a for a in coco_gt.dataset["annotations"] if not a.get("iscrowd", 0)]
    assert len(records) == len(non_crowd)
    image_id = sorted(coco_gt.getImgIds())[0]
    mine = [r for r in records if r["image_id"] == image_id]
    gts = [a for a in coco_gt.imgToAnns[image_id] if not a.get("iscrowd", 0)]
    assert len(mine) == len(gts) > 0
    for r, a in zip(mine, gts):  # records keep the instance order of the image
        assert isinstance(r["segmentation"]["counts"], str)
        assert r["category_id"] == a["category_id"]
        np.testing.assert_allclose(r["bbox"], a["bbox"], atol=1e-3)
        decoded = mask_util.decode(r["segmentation"])
        np.testing.assert_array_equal(decoded, coco_gt.annToMask(a))


def _direct_cocoeval(gt_json, results_json, iou_type, img_ids=None):
    """A plain COCOeval run on two files (segm drops 'bbox' so areas come from masks)."""
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_json)
        with open(results_json) as f:
            anns = json.load(f)
        if iou_type == "segm":
            for a in anns:
                a.pop("bbox")
        dt = gt.loadRes(anns)
        e = COCOeval(gt, dt, iou_type)
        if img_ids is not None:
            e.params.imgIds = img_ids
        e.evaluate()
        e.accumulate()
        e.summarize()
    return e.stats


def test_perturbed_predictions_equal_direct_cocoeval(coco_gt, val_json, label_maps, tmp_path):
    label_to_cat_id, cat_to_label = label_maps
    rng = np.random.default_rng(0)
    ev = COCOEvaluator(val_json, label_to_cat_id, output_dir=str(tmp_path))
    ids = sorted(coco_gt.getImgIds())
    for j in ids:
        ev.process([j], [gt_as_outputs(coco_gt, cat_to_label, j, rng=rng)])
    results = ev.evaluate()
    path = str(tmp_path / "coco_instances_results.json")
    assert os.path.isfile(path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]
    for task in ("bbox", "segm"):
        assert 20.0 < results[task]["AP"] < 95.0, results[task]
        stats = _direct_cocoeval(val_json, path, task)
        for name, v in zip(COCO_METRIC_NAMES, stats):
            expected = v * 100 if v >= 0 else float("nan")
            got = results[task][name]
            assert (math.isnan(got) and math.isnan(expected)) or got == expected, (task, name)
    # Scoring the written file again gives the same numbers.
    again = evaluate_results_file(val_json, path, ("bbox", "segm"))
    for task in ("bbox", "segm"):
        for name in COCO_METRIC_NAMES:
            a, b = again[task][name], results[task][name]
            assert (math.isnan(a) and math.isnan(b)) or a == b
    table = print_coco_table(results)
    lines = table.splitlines()
    assert len(lines) == 2 + len(COCO_METRIC_NAMES)
    assert len({len(line) for line in lines}) == 1  # aligned
    assert "bbox" in lines[0] and "segm" in lines[0]
    assert f"{results['bbox']['AP']:.3f}" in table


def test_wrong_category_mapping_gives_low_ap(coco_gt, label_maps):
    label_to_cat_id, cat_to_label = label_maps
    labels = sorted(label_to_cat_id)
    permuted = {lab: label_to_cat_id[labels[(i + 1) % len(labels)]] for i, lab in enumerate(labels)}
    ev = COCOEvaluator(coco_gt, permuted, tasks=("bbox",))
    ids = sorted(coco_gt.getImgIds())
    ev.process(ids, [gt_as_outputs(coco_gt, cat_to_label, j, masks=False) for j in ids])
    res = ev.evaluate()
    assert res["bbox"]["AP"] < 10.0


def test_instances_to_coco_json_maps_categories_and_boxes():
    label_to_cat_id = {1: 7, 2: 90}
    masks = torch.zeros(2, 1, 6, 8)
    masks[0, 0, 1:3, 2:5] = 0.9
    masks[0, 0, 0, 0] = 0.4  # below threshold
    masks[1, 0, 4:6, 0:8] = 1.0
    recs = instances_to_coco_json(
        5,
        torch.tensor([[2.0, 1.0, 5.0, 3.0], [0.0, 4.0, 8.0, 6.0]]),
        torch.tensor([0.9, 0.3]),
        torch.tensor([2, 1]),
        masks,
        label_to_cat_id=label_to_cat_id,
    )
    assert [r["category_id"] for r in recs] == [90, 7]
    assert recs[0]["bbox"] == [2.0, 1.0, 3.0, 2.0]
    assert recs[0]["image_id"] == 5 and recs[1]["score"] == pytest.approx(0.3)
    json.dumps(recs)  # JSON-serializable
    m0 = mask_util.decode(recs[0]["segmentation"])
    assert m0.shape == (6, 8) and m0.sum() == 6 and m0[1:3, 2:5].all()
    assert mask_util.decode(recs[1]["segmentation"]).sum() == 16
    # (N,H,W) bool masks work the same way; unknown labels are a clear error.
    recs_b = instances_to_coco_json(
        5, torch.zeros(2, 4), torch.ones(2), torch.tensor([2, 1]), masks[:, 0] > 0.5, label_to_cat_id=label_to_cat_id
    )
    assert recs_b[0]["segmentation"] == recs[0]["segmentation"]
    with pytest.raises(DatasetError, match="label 3"):
        instances_to_coco_json(5, torch.zeros(1, 4), torch.ones(1), torch.tensor([3]), label_to_cat_id=label_to_cat_id)


def test_detections_map_back_to_the_original_image_exactly():
    """The detector maps boxes to the original image (detectron2's detector_postprocess)."""
    from maedet.models.detectors.rcnn import rescale_detections

    out = {
        "boxes": torch.tensor([[10.0, 20.0, 30.0, 40.0]]),
        "scores": torch.tensor([0.5]),
        "labels": torch.tensor([1]),
        "mask_probs": torch.ones(1, 1, 28, 28),
    }
    # separate x and y factors: (200, 300) -> (500, 450): sy = 2.5, sx = 1.5
    r = rescale_detections(out, (200, 300), (500, 450))
    assert torch.equal(r["boxes"], torch.tensor([[15.0, 50.0, 45.0, 100.0]]))
    assert torch.equal(r["scores"], out["scores"]) and torch.equal(r["mask_probs"], out["mask_probs"])
    # same size: unchanged; boxes clipped to the image, empty ones dropped
    r = rescale_detections(out, (20, 30), (20, 30))
    assert torch.equal(r["boxes"], torch.tensor([[10.0, 20.0, 30.0, 20.0]])[:0]) or r["boxes"].shape[0] == 0
    r = rescale_detections({**out, "boxes": torch.tensor([[10.0, 5.0, 40.0, 15.0]])}, (20, 30), (20, 30))
    assert torch.equal(r["boxes"], torch.tensor([[10.0, 5.0, 30.0, 15.0]]))


def test_processed_subset_restricts_img_ids(coco_gt, label_maps):
    label_to_cat_id, cat_to_label = label_maps
    ids = sorted(coco_gt.getImgIds())[:5]
    ev = COCOEvaluator(coco_gt, label_to_cat_id, tasks=("bbox",))
    outs = [gt_as_outputs(coco_gt, cat_to_label, j, masks=False) for j in ids]
    ev.process(ids, outs)
    res = ev.evaluate()
    assert res["bbox"]["AP"] == pytest.approx(100.0)
    assert ev.coco_evals["bbox"].params.imgIds == ids
    # The same predictions scored against all 79 images miss most of the ground truth.
    ev_all = ev.evaluate(img_ids=sorted(coco_gt.getImgIds()))
    assert ev_all["bbox"]["AR100"] < 20.0


def test_duplicate_images_count_once(coco_gt, label_maps):
    label_to_cat_id, cat_to_label = label_maps
    j = sorted(coco_gt.getImgIds())[0]
    ev = COCOEvaluator(coco_gt, label_to_cat_id, tasks=("bbox",))
    o = gt_as_outputs(coco_gt, cat_to_label, j, masks=False)
    ev.process([j, j], [o, copy.deepcopy(o)])  # e.g. a padded distributed sampler
    assert ev.evaluate()["bbox"]["AP"] == pytest.approx(100.0)


def test_empty_predictions_give_zeros(coco_gt, label_maps, tmp_path):
    label_to_cat_id, _ = label_maps
    ids = sorted(coco_gt.getImgIds())[:3]
    ev = COCOEvaluator(coco_gt, label_to_cat_id, output_dir=str(tmp_path))
    empty = [
        {
            "boxes": torch.zeros(0, 4),
            "scores": torch.zeros(0),
            "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, 1, coco_gt.imgs[j]["height"], coco_gt.imgs[j]["width"]),
        }
        for j in ids
    ]
    ev.process(ids, empty)
    res = ev.evaluate()
    for task in ("bbox", "segm"):
        assert res[task] == dict.fromkeys(COCO_METRIC_NAMES, 0.0)
    with open(tmp_path / "coco_instances_results.json") as f:
        assert json.load(f) == []
    # Nothing processed at all: zeros too.
    ev.reset()
    assert ev.evaluate()["bbox"]["AP"] == 0.0
    assert "0.000" in print_coco_table(res)


def test_bad_inputs_raise_clear_errors(coco_gt, label_maps, tmp_path):
    label_to_cat_id, _ = label_maps
    ev = COCOEvaluator(coco_gt, label_to_cat_id, tasks=("bbox",))
    with pytest.raises(DatasetError, match="image id 123"):
        ev.process([123], [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0)}])
    with pytest.raises(DatasetError, match="not found"):
        COCOEvaluator(str(tmp_path / "missing.json"), label_to_cat_id)
    with pytest.raises(DatasetError, match="category ids"):
        COCOEvaluator(coco_gt, {1: 12345})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="bad.json"):
        evaluate_results_file(coco_gt, str(bad), ("bbox",))
