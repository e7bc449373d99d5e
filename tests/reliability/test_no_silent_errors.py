"""Cases that once gave a wrong answer with exit code 0, or failed hours too late.

Each runs through the command-line tools (in this process through their real top
level, or as a subprocess where memory or the exit path matters) and asserts the
exit code, the one-line message and what is (not) left in the output directory.
"""

import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tests.conftest import require_data

from .conftest import (
    REPO,
    assert_nothing_half_written,
    assert_one_error,
    run_tool,
    run_tool_inprocess,
    write_det_config,
)

EXIF_ORIENTATION = 0x0112
# A two-iteration run of the tiny config (its lr steps at 12 otherwise fall outside it).
SHORT = ["solver.max_iter=2", "solver.steps=[1]", "solver.warmup_iters=1"]


def _logs(out_dir) -> str:
    """Everything the runs wrote to ``log*.txt`` in ``out_dir``."""
    names = sorted(f for f in os.listdir(out_dir) if f.startswith("log") and f.endswith(".txt"))
    return "".join(open(os.path.join(out_dir, f)).read() for f in names)


@pytest.fixture(autouse=True)
def _own_image_cache(tmp_path, monkeypatch):
    """Each test its own image-check cache (a result cached by another test must not hide a check)."""
    monkeypatch.setenv("MAEDET_CACHE", str(tmp_path / "cache"))


def _copy_split(toy, split, dst):
    """A private copy of a toy split (json + images) that a test may damage."""
    root = dst / split
    shutil.copytree(toy[f"{split}_images"], root)
    with open(toy[f"{split}_json"]) as f:
        data = json.load(f)
    return data, root


def _write_json(data, path):
    path.write_text(json.dumps(data))
    return str(path)


# ----------------------------------------------------------------- EXIF photos
@pytest.fixture(scope="module")
def exif_photo(tmp_path_factory):
    """A real photo stored the way phones store it: raw pixels turned 90 degrees and an
    EXIF orientation tag (6: rotate 90 clockwise to display), with its real annotations
    in the displayed frame. Returns the json, image folder and the displayed pixels."""
    root = require_data("fruits_nuts")
    with open(os.path.join(root, "trainval.json")) as f:
        data = json.load(f)
    img = data["images"][0]
    displayed = np.array(Image.open(os.path.join(root, "images", img["file_name"])).convert("RGB"))
    assert displayed.shape[:2] == (img["height"], img["width"]) == (600, 800)
    d = tmp_path_factory.mktemp("exif")
    (d / "images").mkdir()
    raw = Image.fromarray(np.ascontiguousarray(np.rot90(displayed, k=1)))  # what the sensor wrote: 800 tall
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    path = d / "images" / "phone.jpg"
    raw.save(path, quality=97, exif=exif.tobytes())
    # reference: PIL's own EXIF transpose gives the displayed photo back
    with Image.open(path) as im:
        assert im.size == (600, 800) and im.getexif().get(EXIF_ORIENTATION) == 6
        shown = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    assert shown.shape == displayed.shape and np.abs(shown.astype(int) - displayed).mean() < 2.5
    anns = [dict(a) for a in data["annotations"] if a["image_id"] == img["id"]]
    assert len(anns) >= 5
    coco = {
        "images": [dict(img, file_name="phone.jpg")],
        "annotations": anns,
        "categories": data["categories"],
    }
    json_path = _write_json(coco, d / "phone.json")
    return {"json": json_path, "images": str(d / "images"), "path": str(path), "displayed": displayed}


def test_exif_photo_loads_upright_with_its_masks_on_the_objects(exif_photo):
    from pycocotools.coco import COCO

    from maedet.data.coco import CocoInstanceDataset

    ds = CocoInstanceDataset(exif_photo["json"], exif_photo["images"], load_targets=True)
    image, target = ds[0]
    image = image.permute(1, 2, 0).numpy().astype(int)
    shown = exif_photo["displayed"].astype(int)
    assert image.shape == shown.shape  # (600, 800, 3): displayed, not raw (800, 600)
    assert np.abs(image - shown).mean() < 2.5  # same pixels up to JPEG noise
    masks = target["masks"].to_bitmasks(*shown.shape[:2]).numpy().astype(bool)
    gt = COCO(exif_photo["json"])
    raw = cv2.imread(exif_photo["path"], cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)[:, :, ::-1]
    assert raw.shape[:2] == (800, 600)  # the file's own pixel order really is rotated
    raw_crop = raw[:600, :600].astype(int)
    for m, ann in zip(masks, gt.loadAnns(gt.getAnnIds())):
        assert (m == gt.annToMask(ann).astype(bool)).all()
        # the mask, drawn on the loaded image, covers the object's pixels...
        inside = image[m].mean(0)
        np.testing.assert_allclose(inside, shown[m].mean(0), atol=3.0)
        # ...and they are not the pixels at that position in the raw (rotated) order
        sq = m[:600, :600]
        if sq.sum() > 200:
            assert (
                np.abs(raw_crop[sq].mean(0) - shown[:600, :600][sq].mean(0)).max()
                > 3 * np.abs(image[:600, :600][sq].mean(0) - shown[:600, :600][sq].mean(0)).max()
            )


def test_exif_photo_trains_evaluates_and_is_drawn_upright(tmp_path, toy, exif_photo, capsys):
    cfg = write_det_config(
        tmp_path / "det.yaml",
        tmp_path / "out",
        toy,
        train_json=exif_photo["json"],
        train_images=exif_photo["images"],
        val_json=exif_photo["json"],
        val_images=exif_photo["images"],
    )
    r = run_tool_inprocess("train_net", ["--config", cfg, *SHORT], capsys)
    assert r.returncode in (0, None), r.stderr[-3000:]
    weights = tmp_path / "out" / "model_final.pth"
    assert weights.is_file()
    assert (tmp_path / "out" / "eval_metrics.json").is_file() or "bbox" in r.stdout + r.stderr
    pics = tmp_path / "pics"
    r = run_tool_inprocess(
        "infer",
        [
            "--config",
            cfg,
            "--weights",
            str(weights),
            "--input",
            exif_photo["path"],
            "--output",
            str(pics),
            "--json",
            str(pics / "results.json"),
            "--score-thresh",
            "0",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert r.returncode in (0, None), r.stderr[-3000:]
    pic = cv2.imread(str(pics / "phone.png"))
    assert pic.shape == (600, 800, 3)  # as every viewer shows the photo
    with open(pics / "results.json") as f:
        recs = json.load(f)
    assert recs and all(list(x["segmentation"]["size"]) == [600, 800] for x in recs)


# ------------------------------------------------------------ bad images early
def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


@pytest.mark.parametrize("split", ["train", "val"])
def test_bad_image_stops_the_run_before_the_first_iteration(tmp_path, toy, capsys, split):
    data, root = _copy_split(toy, split, tmp_path)
    bad = root / data["images"][1]["file_name"]
    _truncate(bad)
    paths = {f"{split}_json": toy[f"{split}_json"], f"{split}_images": str(root)}
    cfg = write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy, **paths)
    r = run_tool_inprocess("train_net", ["--config", cfg], capsys)
    assert_one_error(r, str(bad), "truncated", "data.on_bad_image=skip")
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl") or not open(tmp_path / "out" / "metrics.jsonl").read()
    assert_nothing_half_written(tmp_path / "out")
    # the error also reaches the log a person reads after a cluster job died
    assert "error:" in _logs(tmp_path / "out") and str(bad) in _logs(tmp_path / "out")


def test_bad_images_listed_together_or_skipped_and_counted(tmp_path, toy, capsys):
    data, root = _copy_split(toy, "train", tmp_path)
    truncated = root / data["images"][0]["file_name"]
    _truncate(truncated)
    resized = root / data["images"][3]["file_name"]
    cv2.imwrite(str(resized), np.zeros((48, 64, 3), np.uint8))  # the json says 64 x 64
    cfg = write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy, train_images=str(root))
    r = run_tool_inprocess("train_net", ["--config", cfg], capsys)
    line = assert_one_error(r, "2 of 8 train images", str(truncated), str(resized), "size mismatch")
    assert "64x48" in line
    r = run_tool_inprocess("train_net", ["--config", cfg, "data.on_bad_image=skip", *SHORT], capsys)
    assert r.returncode in (0, None), r.stderr[-3000:]
    logs = _logs(tmp_path / "out")
    assert "skipping 2 of 8 train images" in logs
    # the second run read the check results from the cache (same files, sizes, mtimes)
    assert "checked 8 train images" in logs and "(8 from the cache" in logs
    assert (tmp_path / "out" / "model_final.pth").is_file()


def test_model_final_is_written_before_the_final_evaluation(tmp_path, toy, capsys):
    data, root = _copy_split(toy, "val", tmp_path)
    bad = root / data["images"][0]["file_name"]
    _truncate(bad)
    cfg = write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy, val_images=str(root))
    # the image check is off, so the bad test image is found only by the final evaluation
    r = run_tool_inprocess("train_net", ["--config", cfg, "data.check_images=false", *SHORT], capsys)
    assert_one_error(r, str(bad))
    state = torch.load(tmp_path / "out" / "model_final.pth", weights_only=True)
    assert "model" in state and state["meta"]["class_names"]
    assert not (tmp_path / "out" / "coco_instances_results.json").exists()


# --------------------------------------------------------------- wrong classes
@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy):
    """A tiny detector trained 2 iterations on the toy set (its checkpoint stores the classes).
    A subprocess: a module-scoped fixture cannot use ``capsys``."""
    d = tmp_path_factory.mktemp("trained")
    cfg = write_det_config(d / "det.yaml", d / "out", toy)
    r = run_tool(["tools/train_net.py", "--config", cfg, *SHORT])
    assert r.returncode == 0, r.stderr[-3000:]
    return {"config": cfg, "weights": str(d / "out" / "model_final.pth")}


def test_checkpoint_stores_classes_and_eval_refuses_other_ones(tmp_path, toy, trained, capsys):
    meta = torch.load(trained["weights"], weights_only=True)["meta"]
    with open(toy["val_json"]) as f:
        data = json.load(f)
    assert meta["class_names"] == [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
    other = dict(data, categories=[dict(c, name=n) for c, n in zip(data["categories"], ["date", "fig", "hazelnut"])])
    other_json = _write_json(other, tmp_path / "other_classes.json")
    args = ["--config", trained["config"], "--eval-only", f"model.weights={trained['weights']}"]
    args += [f"data.test.json={other_json}", f"output_dir={tmp_path / 'out'}"]
    r = run_tool_inprocess("train_net", args, capsys)
    line = assert_one_error(r, trained["weights"], other_json, "date", "test.class_mismatch=by_position")
    for name in meta["class_names"]:
        assert name in line
    assert not list((tmp_path / "out").glob("eval*/coco_instances_results.json"))
    # the documented override scores label i as the test set's i-th category
    r = run_tool_inprocess("train_net", args + ["test.class_mismatch=by_position"], capsys)
    assert r.returncode in (0, None), r.stderr[-3000:]
    assert len(list((tmp_path / "out").glob("eval*/coco_instances_results.json"))) == 1


# ------------------------------------------------------------ bad annotations
def _outside_bbox(data):
    ann = data["annotations"][2]
    img = next(i for i in data["images"] if i["id"] == ann["image_id"])
    ann["bbox"] = [img["width"] + 10.0, 5.0, 12.0, 9.0]
    return ann["id"], ann["image_id"]


def _duplicate_file_name(data):
    data["images"][4]["file_name"] = data["images"][1]["file_name"]
    return data["images"][1]["id"], data["images"][4]["id"]


@pytest.mark.parametrize(
    "case,edit,needles",
    [
        ("bbox outside", _outside_bbox, ["entirely outside its image"]),
        ("same file_name", _duplicate_file_name, ["have the same file_name"]),
    ],
)
def test_annotations_that_cannot_be_right(tmp_path, toy, capsys, case, edit, needles):
    with open(toy["train_json"]) as f:
        data = json.load(f)
    ids = edit(data)
    bad = _write_json(data, tmp_path / "bad.json")
    cfg = write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy, train_json=bad)
    r = run_tool_inprocess("train_net", ["--config", cfg], capsys)
    assert_one_error(r, bad, *needles, *[str(i) for i in ids], "strict=False")
    assert_nothing_half_written(tmp_path / "out")
    r = run_tool_inprocess("train_net", ["--config", cfg, "data.train.strict=false", *SHORT], capsys)
    assert r.returncode in (0, None), r.stderr[-3000:]
    logs = _logs(tmp_path / "out")
    assert "dropped" in logs and needles[0] in logs
    if case == "same file_name":
        assert "1 image(s) with a duplicate file_name" in logs


# --------------------------------------------------------- json + images win
def test_json_and_images_replace_a_named_dataset(tmp_path, toy, capsys):
    require_data("fruits_nuts")
    cfg = os.path.join(REPO, "configs", "quickstart", "mask_rcnn_vit_tiny_fruits_nuts.yaml")
    out = tmp_path / "out"
    args = ["--config", cfg, f"output_dir={out}", *SHORT, "test.eval_period=0"]
    args += [f"data.train.json={toy['train_json']}", f"data.train.images={toy['train_images']}"]
    args += [f"data.test.json={toy['val_json']}", f"data.test.images={toy['val_images']}"]
    args += ["data.train.pipeline.image_size=64", "train.num_workers=0", "model.backbone.img_size=64"]
    args += ["model.neck.square_pad=64", "data.test.pipeline.short_edge_length=64", "data.test.pipeline.max_size=64"]
    r = run_tool_inprocess("train_net", args, capsys)
    assert r.returncode in (0, None), r.stderr[-3000:]
    from omegaconf import OmegaConf

    used = OmegaConf.load(out / "config.yaml")
    assert used.data.train.json == toy["train_json"] and used.data.train.images == toy["train_images"]
    assert used.data.train.name in ("", None)
    assert "the catalog name 'fruits_nuts' is not used" in r.stdout + r.stderr


# ------------------------------------------------------------ out of range
@pytest.mark.parametrize(
    "tool,args,needles",
    [
        ("infer", ["--score-thresh", "2"], ["--score-thresh", "2", "[0, 1]"]),
        ("infer", ["--alpha", "-0.5"], ["--alpha", "[0, 1]"]),
        ("train_net", ["solver.lr=-0.1"], ["solver.lr", "-0.1"]),
        ("train_net", ["model.roi_heads.score_thresh=1.5"], ["model.roi_heads", "score_thresh", "1.5", "[0, 1]"]),
        ("train_net", ["model.rpn.nms_thresh=-1"], ["model.rpn", "nms_thresh", "-1", "[0, 1]"]),
        ("train_net", ["model.rpn.fg_iou_thresh=0.2"], ["model.rpn", "bg_iou_thresh", "fg_iou_thresh"]),
        ("pretrain", ["model.mask_ratio=1.0"], ["model.mask_ratio", "1.0"]),
    ],
)
def test_values_out_of_range_fail_at_start(tmp_path, toy, trained, capsys, tool, args, needles):
    if tool == "infer":
        base = ["--config", trained["config"], "--weights", trained["weights"], "--input", toy["val_images"]]
        base += ["--output", str(tmp_path / "out")]
    elif tool == "train_net":
        base = ["--config", write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy)]
    else:
        base = [
            "--config",
            os.path.join(REPO, "configs", "quickstart", "mae_tiny.yaml"),
            f"output_dir={tmp_path / 'out'}",
        ]
    r = run_tool_inprocess(tool, base + args, capsys)
    line = assert_one_error(r, *needles)
    assert "range" in line or "must be" in line or "expected" in line
    assert_nothing_half_written(tmp_path / "out")


# ------------------------------------------------------------ large photos
def _peak_rss_of_tool(args):
    """Run a tool in a fresh interpreter; returns (exit code, stdout+stderr, peak RSS MB)."""
    code = (
        "import resource, runpy, sys\n"
        f"sys.argv = {args!r}\n"
        "rc = 0\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)\n"
        "print('PEAK_RSS_MB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, flush=True)\n"
        "sys.exit(rc)\n"
    )
    r = run_tool(["-c", code], timeout=600)
    peak = float(r.stdout.rsplit("PEAK_RSS_MB", 1)[1].split()[0])
    return r, peak


# Measured (docs/RELIABILITY.md): 6000 x 6000 photo, 100 detections at score 0.
LARGE_PHOTO_PEAK_MB = 1500


def test_inference_on_a_6000x6000_photo_stays_within_memory(tmp_path, trained):
    src = os.path.join(require_data("fruits_nuts"), "images", "0.jpg")
    big = cv2.resize(cv2.imread(src), (6000, 6000), interpolation=cv2.INTER_LINEAR)
    path = tmp_path / "big.jpg"
    cv2.imwrite(str(path), big, [cv2.IMWRITE_JPEG_QUALITY, 90])
    del big
    out = tmp_path / "pics"
    args = ["tools/infer.py", "--config", trained["config"], "--weights", trained["weights"]]
    args += ["--output", str(out), "--json", str(out / "r.json"), "--score-thresh", "0", "--device", "cpu"]
    args += ["model.roi_heads.detections_per_img=100", "model.roi_heads.score_thresh=0", "--input", str(path)]
    r, peak = _peak_rss_of_tool(args)
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out / "r.json") as f:
        recs = json.load(f)
    assert len(recs) == 100 and all(list(x["segmentation"]["size"]) == [6000, 6000] for x in recs)
    assert cv2.imread(str(out / "big.png")).shape == (6000, 6000, 3)
    assert peak < LARGE_PHOTO_PEAK_MB, f"peak RSS {peak:.0f} MB"


def test_a_photo_that_does_not_fit_is_reported_and_the_run_goes_on(tmp_path, toy, trained, capsys, monkeypatch):
    from maedet.inference import predictor as predictor_mod

    call = predictor_mod.Predictor.__call__
    first = sorted(os.listdir(toy["val_images"]))[0]
    calls = []

    def oom_on_first(self, inputs, *a, **k):  # the first image (files go in sorted order, one per batch)
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9437184000 bytes")
        return call(self, inputs, *a, **k)

    monkeypatch.setattr(predictor_mod.Predictor, "__call__", oom_on_first)
    out = tmp_path / "pics"
    r = run_tool_inprocess(
        "infer",
        ["--config", trained["config"], "--weights", trained["weights"], "--input", toy["val_images"]]
        + ["--output", str(out), "--score-thresh", "0", "--device", "cpu"],
        capsys,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    failed = [x for x in r.stderr.splitlines() if x.startswith("failed:")]
    assert len(failed) == 1 and first in failed[0] and "out of memory" in failed[0]
    assert "Traceback" not in r.stderr
    assert (
        sorted(os.listdir(out)) == [os.path.splitext(n)[0] + ".png" for n in sorted(os.listdir(toy["val_images"]))][1:]
    )


# ------------------------------------------------------------- error in log.txt
def test_fatal_error_reaches_log_txt_as_a_subprocess(tmp_path, toy):
    with open(toy["train_json"]) as f:
        data = json.load(f)
    data["annotations"][0]["category_id"] = 77
    bad = _write_json(data, tmp_path / "bad.json")
    cfg = write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy, train_json=bad)
    r = run_tool([os.path.join("tools", "train_net.py"), "--config", cfg])
    line = assert_one_error(r, bad, "category_id 77")
    log = (tmp_path / "out" / "log.txt").read_text()
    assert line in log
