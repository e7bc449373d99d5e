"""Predictor and tools/infer.py: original-image coordinates, masks/RLE, input formats,
batching, threads, and the command line end to end (tiny CPU model)."""

import concurrent.futures
import copy
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from torch import nn

from maedet.builders import build_predictor
from maedet.inference import Predictor
from maedet.utils.errors import ConfigError, DatasetError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFER = os.path.join(REPO_ROOT, "tools", "infer.py")

# A tiny ViTDet Mask R-CNN. The test resize (96/128) is smaller than the test
# images, so they are resized before the model; score threshold 0 so that an
# untrained model still returns instances.
TINY_YAML = """
output_dir: {out}
model:
  num_classes: 3
  backbone:
    img_size: 128
    embed_dim: 64
    depth: 2
    num_heads: 2
    window_size: 4
    global_blocks: [1]
    drop_path_rate: 0.0
    pretrain_img_size: 128
  neck: {{out_channels: 32, square_pad: 128}}
  rpn: {{pre_nms_topk_test: 200, post_nms_topk_test: 50}}
  roi_heads: {{score_thresh: 0.0, detections_per_img: 10}}
data:
  test:
    pipeline: {{name: resize_shortest_edge, short_edge_length: 96, max_size: 128}}
"""


def _random_image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    img = (rng.random((h, w, 3)) * 255).astype(np.uint8)
    # some structure: a bright disc and a dark square
    cv2.circle(img, (w // 3, h // 2), min(h, w) // 5, (250, 40, 40), -1)
    cv2.rectangle(img, (w // 2, h // 4), (w // 2 + w // 4, h // 4 + h // 3), (20, 200, 30), -1)
    return img


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(config path, weights path, class names, label_to_cat_id, toy dataset split) on disk."""
    from maedet.builders import build_detection_model, load_detection_config
    from maedet.data.toy import generate_toy_dataset

    d = tmp_path_factory.mktemp("tiny_det")
    cfg_path = str(d / "tiny.yaml")
    with open(cfg_path, "w") as f:
        f.write(TINY_YAML.format(out=str(d / "out")))
    toy = generate_toy_dataset(str(d / "toy"), num_train=1, num_val=3, image_size=64, seed=0)
    with open(toy["val"][0]) as f:
        cats = sorted(json.load(f)["categories"], key=lambda c: c["id"])
    class_names = [c["name"] for c in cats]
    label_to_cat_id = {i + 1: int(c["id"]) for i, c in enumerate(cats)}
    torch.manual_seed(0)
    model = build_detection_model(load_detection_config(cfg_path, [], splits=()).model, len(class_names))
    weights = str(d / "model_final.pth")
    torch.save(
        {
            "model": model.state_dict(),
            "meta": {"class_names": class_names, "label_to_cat_id": label_to_cat_id, "num_classes": len(class_names)},
        },
        weights,
    )
    return {
        "config": cfg_path,
        "weights": weights,
        "class_names": class_names,
        "label_to_cat_id": label_to_cat_id,
        "toy_val": toy["val"],
        "dir": d,
    }


@pytest.fixture(scope="module")
def predictor(tiny):
    return build_predictor(tiny["config"], tiny["weights"], device="cpu")


def assert_same(a, b):
    assert len(a["scores"]) == len(b["scores"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
    np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3)
    np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-5)
    assert a["class_names"] == b["class_names"]
    if "masks" in a or "masks" in b:
        assert a["masks"].shape == b["masks"].shape
        assert (a["masks"] != b["masks"]).mean() <= 1e-4


# --------------------------------------------------------------- a fake model
class FakeModel(nn.Module):
    """Returns known instances in the frame of ``output_sizes``; records its inputs."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, images, output_sizes=None):
        outs = []
        for img, (h, w) in zip(images, output_sizes):
            self.seen.append(img.detach().clone())
            boxes = torch.tensor(
                [[0.1 * w, 0.2 * h, 0.5 * w, 0.9 * h], [0.0, 0.0, w, h], [0.6 * w, 0.1 * h, w + 7.0, 0.3 * h]]
            )  # sticks out on the right
            mask_probs = torch.full((3, 1, 28, 28), 0.8)  # each mask fills its box
            outs.append(
                {
                    "boxes": boxes,
                    "scores": torch.tensor([0.9, 0.3, 0.7]),
                    "labels": torch.tensor([2, 1, 3]),
                    "mask_probs": mask_probs,
                }
            )
        return outs


def test_fake_model_outputs_in_original_coordinates():
    fake = FakeModel()
    p = Predictor(fake, class_names=["cat", "dog", "bird"], label_to_cat_id={1: 17, 2: 18, 3: 44}, score_thresh=0.5)
    h, w = 70, 110
    img = _random_image(h, w)
    out = p(img)
    # the model saw the RGB image as uint8 at its own size (no transform given)
    seen = fake.seen[-1]
    assert seen.dtype == torch.uint8 and tuple(seen.shape) == (3, h, w)
    torch.testing.assert_close(seen, torch.from_numpy(img).permute(2, 0, 1))
    # score filter, order kept, labels -> names and COCO ids
    np.testing.assert_allclose(out["scores"], [0.9, 0.7])
    assert out["scores"].dtype == np.float32 and out["boxes"].dtype == np.float32
    assert out["labels"].tolist() == [2, 3]
    assert out["class_names"] == ["dog", "bird"]
    assert out["class_ids"].tolist() == [18, 44]
    # boxes unchanged (clipped to the image), masks pasted into their boxes
    np.testing.assert_allclose(
        out["boxes"], [[0.1 * w, 0.2 * h, 0.5 * w, 0.9 * h], [0.6 * w, 0.1 * h, w, 0.3 * h]], rtol=1e-6
    )
    assert out["masks"].dtype == np.bool_ and out["masks"].shape == (2, h, w)
    expected = np.zeros((2, h, w), dtype=bool)
    expected[0, int(0.2 * h) : int(0.9 * h), int(0.1 * w) : int(0.5 * w)] = True
    expected[1, int(0.1 * h) : int(0.3 * h), int(0.6 * w) :] = True
    np.testing.assert_array_equal(out["masks"], expected)
    # the same image as BGR array, as uint8 / float tensors, and as a file
    assert_same(p(np.ascontiguousarray(img[:, :, ::-1]), input_format="BGR"), out)
    assert_same(p(torch.from_numpy(img).permute(2, 0, 1)), out)
    assert_same(p(torch.from_numpy(img).permute(2, 0, 1).float() / 255), out)
    rle = p(img, return_rle=True)
    assert "masks" not in rle
    decoded = np.stack([mask_util.decode(r) for r in rle["masks_rle"]]).astype(bool)
    np.testing.assert_array_equal(decoded, expected)


def test_bad_inputs_and_options(tmp_path):
    p = Predictor(FakeModel(), class_names=["a", "b", "c"])
    with pytest.raises(ValueError):
        p(np.zeros((5, 5), dtype=np.uint8))
    with pytest.raises(ValueError):
        p(np.zeros((5, 5, 3), dtype=np.uint8), input_format="HSV")
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="bad.jpg"):
        p(str(bad))
    with pytest.raises(ConfigError, match="amp='fp32'"):
        Predictor(FakeModel(), amp="fp32", device="cpu")
    assert p([]) == []
    # no names: labels as text; no mapping: identity category ids
    q = Predictor(FakeModel())
    out = q(np.zeros((20, 30, 3), dtype=np.uint8))
    assert out["class_names"] == ["2", "1", "3"] and out["class_ids"].tolist() == [2, 1, 3]


# --------------------------------------------------------------- the real model
def test_real_model_nonsquare_image_original_coordinates(predictor, tiny):
    h, w = 150, 200  # non-square, larger than the test resize 96/128: resized before the model
    out = predictor(_random_image(h, w))
    assert tuple(predictor.transform(torch.zeros(3, h, w, dtype=torch.uint8)).shape) == (3, 96, 128)
    n = len(out["scores"])
    assert n > 0
    assert out["boxes"].shape == (n, 4) and out["boxes"].dtype == np.float32
    assert out["scores"].shape == (n,) and out["scores"].dtype == np.float32
    assert out["labels"].dtype == np.int64 and set(out["labels"].tolist()) <= {1, 2, 3}
    assert out["masks"].shape == (n, h, w) and out["masks"].dtype == np.bool_
    b = out["boxes"]
    assert (b[:, 0] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 1] >= 0).all() and (b[:, 3] <= h).all()
    assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()
    # the pasted masks lie inside their boxes (up to the paste padding): same coordinate frame
    for m, (x1, y1, x2, y2) in zip(out["masks"], b):
        if not m.any():
            continue
        ys, xs = np.nonzero(m)
        tol_x, tol_y = 2 + (x2 - x1) * 2 / 28, 2 + (y2 - y1) * 2 / 28
        assert xs.min() >= x1 - tol_x and xs.max() <= x2 + tol_x
        assert ys.min() >= y1 - tol_y and ys.max() <= y2 + tol_y
    assert any(m.any() for m in out["masks"])
    # class names and COCO ids come from the checkpoint meta (the toy dataset's categories)
    assert predictor.class_names == tiny["class_names"] == ["circle", "triangle", "square"]
    assert out["class_names"] == [tiny["class_names"][lab - 1] for lab in out["labels"]]
    assert out["class_ids"].tolist() == [tiny["label_to_cat_id"][lab] for lab in out["labels"].tolist()]


def test_rle_decodes_to_the_bool_masks(predictor):
    img = _random_image(130, 170, seed=3)
    out = predictor(img)
    rle = predictor(img, return_rle=True)
    assert len(rle["masks_rle"]) == len(out["scores"]) > 0
    for r, m in zip(rle["masks_rle"], out["masks"]):
        assert isinstance(r["counts"], str) and list(r["size"]) == [130, 170]
        np.testing.assert_array_equal(mask_util.decode(r).astype(bool), m)


def test_bgr_rgb_tensor_and_file_inputs_agree(predictor, tmp_path):
    img = _random_image(140, 110, seed=1)
    ref = predictor(img)
    assert_same(predictor(np.ascontiguousarray(img[:, :, ::-1]), input_format="BGR"), ref)
    assert_same(predictor(torch.from_numpy(img).permute(2, 0, 1)), ref)
    path = str(tmp_path / "img.png")
    cv2.imwrite(path, img[:, :, ::-1])
    assert_same(predictor(path), ref)
    # a BGR array read as RGB is a different image: the format matters
    swapped = predictor(np.ascontiguousarray(img[:, :, ::-1]))
    assert not (len(swapped["scores"]) == len(ref["scores"]) and np.allclose(swapped["scores"], ref["scores"]))


def test_batch_equals_single_calls(predictor):
    imgs = [_random_image(150, 200, 0), _random_image(120, 90, 1), _random_image(100, 100, 2)]
    batch = predictor(imgs)
    assert isinstance(batch, list) and len(batch) == 3
    for img, res in zip(imgs, batch):
        assert res["masks"].shape[1:] == img.shape[:2]
        assert_same(res, predictor(img))


def test_threads_share_one_predictor(predictor):
    imgs = [_random_image(100 + 10 * i, 140 - 10 * i, seed=10 + i) for i in range(4)]
    serial = [predictor(img) for img in imgs]
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(predictor, imgs))
    for a, b in zip(threaded, serial):
        assert_same(a, b)


def test_bf16_autocast_on_cpu(predictor, tiny):
    p = Predictor(
        copy.deepcopy(predictor.model),
        transform=predictor.transform,
        class_names=tiny["class_names"],
        label_to_cat_id=tiny["label_to_cat_id"],
        amp="bf16",
    )
    out = p(_random_image(120, 160))
    n = len(out["scores"])
    assert out["boxes"].dtype == np.float32 and out["masks"].shape == (n, 120, 160)


def test_score_thresh_and_checkpoint_class_names(tiny):
    """A threshold keeps exactly the detections scoring above it (a random model's scores
    spread around 1 / (K + 1), so the threshold is set between two of its scores), named
    by the checkpoint's classes unless class_names renames them."""
    img = _random_image(96, 128)
    low = build_predictor(tiny["config"], tiny["weights"], score_thresh=0.0)(img)
    scores = np.sort(np.unique(low["scores"]))
    assert len(scores) >= 4, low["scores"]
    k = len(scores) // 2
    thresh = float(scores[k - 1] + scores[k]) / 2
    high = build_predictor(tiny["config"], tiny["weights"], score_thresh=thresh)(img)
    keep = low["scores"] > thresh
    assert 0 < len(high["scores"]) == int(keep.sum()) < len(low["scores"])
    np.testing.assert_allclose(np.sort(high["scores"]), np.sort(low["scores"][keep]), rtol=1e-6)
    assert set(high["class_names"]) <= set(tiny["class_names"])
    assert list(high["class_names"]) == [tiny["class_names"][i - 1] for i in high["labels"]]
    renamed = build_predictor(tiny["config"], tiny["weights"], score_thresh=thresh, class_names=["x", "y", "z"])(img)
    assert list(renamed["class_names"]) == [["x", "y", "z"][i - 1] for i in renamed["labels"]]


# ------------------------------------------------------------ tools/infer.py
def _run_infer(*args, cwd=None):
    return subprocess.run(
        [sys.executable, INFER, *args], capture_output=True, text=True, timeout=300, cwd=cwd or REPO_ROOT
    )


def test_infer_tool_end_to_end(tiny, predictor, tmp_path):
    val_json, val_dir = tiny["toy_val"]
    sub = tmp_path / "more" / "sub"
    sub.mkdir(parents=True)
    nonsquare = _random_image(90, 150, seed=5)
    extra = str(sub / "000001.png")  # same stem as a toy image: must not overwrite its picture
    cv2.imwrite(extra, nonsquare[:, :, ::-1])
    broken = str(tmp_path / "broken.jpg")
    with open(broken, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    out_dir = tmp_path / "pictures"
    results = str(out_dir / "results.json")
    r = _run_infer(
        "--config",
        tiny["config"],
        "--weights",
        tiny["weights"],
        "--input",
        os.path.join(val_dir, "*.jpg"),
        str(tmp_path / "more"),
        broken,
        "--output",
        str(out_dir),
        "--json",
        results,
        "--coco-json",
        val_json,
        "--score-thresh",
        "0.0",
        "--device",
        "cpu",
        "--batch-size",
        "2",
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert broken in r.stderr
    # the last line sums up (score threshold 0: every readable image gets detections)
    last = r.stdout.strip().splitlines()[-1]
    n = len(json.load(open(results)))
    where = f"pictures in {out_dir}, detections in {results}"
    assert last == f"5 images, 1 failed, {n} detections, 0 images with none; {where}"
    toy_names = sorted(os.listdir(val_dir))
    sizes = {os.path.join(val_dir, n): (64, 64) for n in toy_names}
    sizes[extra] = (90, 150)
    pngs = sorted(os.listdir(out_dir))
    assert pngs == sorted(["000001.png", "000001_1.png", "000002.png", "000003.png", "results.json"])
    for name, shape in [("000001.png", (64, 64)), ("000001_1.png", (90, 150)), ("000003.png", (64, 64))]:
        pic = cv2.imread(str(out_dir / name))
        assert pic is not None and pic.shape == shape + (3,)
    with open(results) as f:
        recs = json.load(f)
    assert isinstance(recs, list) and recs
    with open(val_json) as f:
        coco_ids = {im["file_name"]: im["id"] for im in json.load(f)["images"]}
    for rec in recs:
        assert set(rec) >= {"image_id", "category_id", "bbox", "score", "segmentation", "file_name"}
        assert rec["category_id"] in tiny["label_to_cat_id"].values()
        assert list(rec["segmentation"]["size"]) == list(sizes[rec["file_name"]])
        base = os.path.basename(rec["file_name"])
        if rec["file_name"] == extra:
            assert rec["image_id"] > max(coco_ids.values())
        else:
            assert rec["image_id"] == coco_ids[base]
    # the JSON's RLE masks decode to the Predictor's bool masks for the same image
    first = os.path.join(val_dir, toy_names[0])
    mine = predictor(first)
    theirs = sorted((r for r in recs if r["file_name"] == first), key=lambda r: -r["score"])
    assert len(theirs) == len(mine["scores"]) > 0
    np.testing.assert_allclose([r["score"] for r in theirs], mine["scores"], atol=1e-5)
    decoded = np.stack([mask_util.decode(r["segmentation"]) for r in theirs]).astype(bool)
    assert (decoded != mine["masks"]).mean() <= 1e-4
    # results can be loaded by pycocotools as detections for the COCO json
    from pycocotools.coco import COCO

    gt = COCO(val_json)
    dt = gt.loadRes([r for r in recs if r["file_name"] != extra])
    assert len(dt.getAnnIds()) == len(recs) - sum(r["file_name"] == extra for r in recs)


def test_infer_tool_no_input_matched(tiny, tmp_path):
    r = _run_infer(
        "--config",
        tiny["config"],
        "--weights",
        tiny["weights"],
        "--input",
        str(tmp_path / "nothing" / "*.png"),
        "--output",
        str(tmp_path / "o"),
    )
    assert r.returncode == 2, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no input image matched" in errors[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_infer_tool_says_which_images_got_no_detection(tiny, tmp_path):
    images = tmp_path / "in"
    images.mkdir()
    for k in range(2):
        cv2.imwrite(str(images / f"{k}.png"), np.full((48, 64, 3), 40 * k, np.uint8))
    args = ["--config", tiny["config"], "--weights", tiny["weights"], "--input", str(images), "--device", "cpu"]
    r = _run_infer(*args, "--score-thresh", "1.0", "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-2].startswith("no detection above --score-thresh 1.0 in: ") and str(images / "0.png") in lines[-2]
    assert lines[-1] == f"2 images, 0 failed, 0 detections, 2 images with none; detections in {tmp_path / 'r.json'}"
