"""Bad input matrix: every case gives exactly one ``error:`` line naming the file or
key, exit code 2, no traceback, and nothing half-written (no checkpoint, results
or temp file) in the output directory.

The tools run in this process through the same top level as on the command line
(``run_tool`` / ``launch``), which is much faster than a subprocess; one case per
tool also runs as a real subprocess.
"""

import errno
import json
import os
import re
import shutil

import cv2
import numpy as np
import pytest
import torch

from .conftest import (
    assert_nothing_half_written,
    assert_one_error,
    load,
    run_tool,
    run_tool_inprocess,
    write_det_config,
    write_pretrain_config,
)

# --------------------------------------------------------------------- configs
CONFIG_CASES = {
    # name: (extra yaml lines or files, overrides, needles)
    "unknown key in file": ({"c.yaml": "_base_: base.yaml\nmodel: {depthh: 3}\n"}, [], ["depthh", "c.yaml"]),
    "unknown key override": ({}, ["train.batchsize=4"], ["train.batchsize"]),
    "wrong type in file": (
        {"c.yaml": "_base_: base.yaml\ntrain: {batch_size: many}\n"},
        [],
        ["batch_size", "many", "c.yaml"],
    ),
    "wrong type override": ({}, ["solver.lr=fast"], ["solver.lr", "fast"]),
    "missing _base_": ({"c.yaml": "_base_: nowhere.yaml\n"}, [], ["_base_", "nowhere.yaml"]),
    "_base_ cycle": ({"c.yaml": "_base_: d.yaml\n", "d.yaml": "_base_: c.yaml\n"}, [], ["cycle", "c.yaml", "d.yaml"]),
    "not yaml": ({"c.yaml": "model: [unclosed\n"}, [], ["c.yaml", "YAML"]),
    "bad amp value": ({}, ["train.amp=fp32"], ["train.amp", "fp32"]),
    "bad nonfinite value": ({}, ["train.nonfinite=ignore"], ["train.nonfinite", "ignore"]),
    "bad ddp_grad_compression value": ({}, ["train.ddp_grad_compression=int8"], ["train.ddp_grad_compression", "int8"]),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_config(tmp_path, toy, capsys, case):
    files, overrides, needles = CONFIG_CASES[case]
    write_pretrain_config(tmp_path / "base.yaml", tmp_path / "out", toy["train_images"])
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    cfg = tmp_path / ("c.yaml" if files else "base.yaml")
    r = run_tool_inprocess("pretrain", ["--config", str(cfg), "solver.max_iter=2", *overrides], capsys)
    assert_one_error(r, *needles)
    assert_nothing_half_written(tmp_path / "out")


# Values only checkable once the run knows max_iter or the pyramid: still one error line.
@pytest.mark.parametrize(
    "override,needle",
    [
        ("solver.steps=[99]", "solver.steps"),
        ("solver.schedule=linear", "solver.schedule"),
        ("solver.optimizer=adam", "solver.optimizer"),
        ("solver.fused=fast", "solver.fused"),
        ("model.anchor_sizes=[8,16]", "model.anchor_sizes"),
    ],
)
def test_bad_config_value_checked_late(tmp_path, toy, capsys, override, needle):
    cfg = write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy)
    r = run_tool_inprocess("train_net", ["--config", cfg, override], capsys)
    assert_one_error(r, needle)


# ------------------------------------------------------------ images (MAE data)
def _bad_jpeg(src):
    data = open(src, "rb").read()
    return data[: len(data) // 2]


def _bad_png(src):
    ok, buf = cv2.imencode(".png", cv2.imread(src))
    return buf.tobytes()[:-40]


IMAGE_CASES = {
    "truncated jpeg": ("broken.jpg", _bad_jpeg),
    "truncated png": ("broken.png", _bad_png),
    "zero-byte file": ("empty.jpg", lambda src: b""),
    "text with image extension": ("notes.png", lambda src: b"these are notes, not pixels\n" * 20),
    "random bytes": ("noise.jpg", lambda src: np.random.default_rng(0).bytes(2000)),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_image_in_pretraining(tmp_path, toy, capsys, case):
    name, make = IMAGE_CASES[case]
    root = tmp_path / "images"
    root.mkdir()
    good = sorted(os.listdir(toy["train_images"]))[:3]
    for g in good:
        shutil.copy(os.path.join(toy["train_images"], g), root / g)
    (root / name).write_bytes(make(os.path.join(toy["train_images"], good[0])))
    cfg = write_pretrain_config(tmp_path / "c.yaml", tmp_path / "out", str(root))
    # batch of 4 = every image in the first iteration
    r = run_tool_inprocess(
        "pretrain",
        ["--config", cfg, "solver.max_iter=2", "train.checkpoint_period=1", "data.on_bad_image=fail"],
        capsys,
    )
    assert_one_error(r, "corrupt image", str(root / name))
    assert_nothing_half_written(tmp_path / "out")


@pytest.mark.parametrize("case", ["missing", "empty", "no image files"])
def test_bad_image_folder(tmp_path, capsys, case):
    root = tmp_path / "images"
    if case != "missing":
        root.mkdir()
    if case == "no image files":
        (root / "readme.txt").write_text("nothing here")
    cfg = write_pretrain_config(tmp_path / "c.yaml", tmp_path / "out", str(root))
    r = run_tool_inprocess("pretrain", ["--config", cfg], capsys)
    assert_one_error(r, str(root), "not found" if case == "missing" else "no images")
    assert_nothing_half_written(tmp_path / "out")


# ------------------------------------------------------- annotations (detection)
def _edit(fn):
    def edit(data):
        fn(data)
        return json.dumps(data)

    return edit


def _dup_image(d):
    d["images"].append(dict(d["images"][0], file_name=d["images"][1]["file_name"]))


def _box(w, h):
    def f(d):
        d["annotations"][2]["bbox"][2:] = [w, h]

    return f


JSON_CASES = {
    "not json": (lambda d: "{'images': [", ["not a valid JSON file"]),
    "not an object": (lambda d: "[1, 2, 3]", ["expected a JSON object"]),
    "no images": (_edit(lambda d: d.pop("images")), ["missing key 'images'"]),
    "no annotations": (_edit(lambda d: d.pop("annotations")), ["missing key 'annotations'"]),
    "no categories": (_edit(lambda d: d.pop("categories")), ["missing key 'categories'"]),
    "duplicate image id": (_edit(_dup_image), ["duplicate image id 1"]),
    "missing image file": (_edit(lambda d: d["images"][4].update(file_name="gone.jpg")), ["missing", "gone.jpg"]),
    "unknown image id": (_edit(lambda d: d["annotations"][2].update(image_id=999)), ["image_id 999", "'images'"]),
    "negative box": (_edit(_box(-3.0, 5.0)), ["annotation id 3", "bbox"]),
    "zero-area box": (_edit(_box(4.0, 0.0)), ["annotation id 3", "non-positive width or height"]),
    "duplicate category name": (
        _edit(lambda d: d["categories"][1].update(name=d["categories"][0]["name"])),
        ["category ids 1 and 2 have the same name", "'circle'"],
    ),
    "unknown category": (
        _edit(lambda d: d["annotations"][2].update(category_id=77)),
        ["category_id 77", "'categories'"],
    ),
}


@pytest.mark.parametrize("case", sorted(JSON_CASES))
def test_bad_annotation_json(tmp_path, toy, capsys, case):
    make, needles = JSON_CASES[case]
    with open(toy["train_json"]) as f:
        data = json.load(f)
    bad = tmp_path / "instances_bad.json"
    bad.write_text(make(data))
    cfg = write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy, train_json=str(bad))
    r = run_tool_inprocess("train_net", ["--config", cfg], capsys)
    assert_one_error(r, str(bad), *needles)
    assert_nothing_half_written(tmp_path / "out")


def test_non_strict_split_drops_bad_annotations(tmp_path, toy, capsys):
    """data.train.strict=false: the zero-area box is dropped with a warning and training runs."""
    with open(toy["train_json"]) as f:
        data = json.load(f)
    bad = tmp_path / "instances_bad.json"
    bad.write_text(_edit(_box(4.0, 0.0))(data))
    cfg = write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy, train_json=str(bad))
    r = run_tool_inprocess("train_net", ["--config", cfg, "data.train.strict=false"], capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "out" / "model_final.pth").is_file()
    logs = "".join(p.read_text() for p in (tmp_path / "out").glob("log*.txt"))
    assert "dropped 1 invalid annotation(s)" in logs and "annotation id 3" in logs
    # the start of the log says what runs: threads, trainable and total parameters
    assert re.search(r"\d+ torch threads per process", logs)
    assert re.search(r"parameters: [\d,]+ trainable of [\d,]+ \(100\.0%\)", logs)


def test_bad_annotation_json_subprocess(tmp_path, toy):
    """The same through a real process: exit 2, one line, no traceback."""
    bad = tmp_path / "instances_bad.json"
    bad.write_text('{"images": [}')
    cfg = write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy, train_json=str(bad))
    r = run_tool(["tools/train_net.py", "--config", cfg])
    assert_one_error(r, str(bad), "not a valid JSON file")
    assert_nothing_half_written(tmp_path / "out")


# ----------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, toy):
    """Good and bad encoder / detection checkpoints for the tiny detection config."""
    from maedet.builders import build_detection_model, load_detection_config
    from maedet.models.mae import MaskedAutoencoderViT

    d = tmp_path_factory.mktemp("ckpts")
    cfg_path = write_det_config(d / "det.yaml", d / "unused", toy)
    out = {}
    torch.manual_seed(0)
    enc = MaskedAutoencoderViT(
        img_size=64,
        patch_size=16,
        embed_dim=64,
        depth=2,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    torch.save({"model": enc.encoder_state_dict()}, d / "enc.pth")
    big = MaskedAutoencoderViT(
        img_size=64,
        patch_size=16,
        embed_dim=96,
        depth=2,
        num_heads=2,
        decoder_embed_dim=32,
        decoder_depth=1,
        decoder_num_heads=2,
    )
    torch.save({"model": big.encoder_state_dict()}, d / "enc_other_size.pth")
    det = build_detection_model(load_detection_config(cfg_path, [], splits=()).model, 3)
    torch.save({"model": det.state_dict()}, d / "det.pth")
    det96 = build_detection_model(load_detection_config(cfg_path, ["model.backbone.embed_dim=96"], splits=()).model, 3)
    torch.save({"model": det96.state_dict()}, d / "det_other_size.pth")
    for name in ("enc", "det"):
        data = (d / f"{name}.pth").read_bytes()
        (d / f"{name}_truncated.pth").write_bytes(data[: len(data) // 2])
    (d / "notes.pth").write_text("not a checkpoint\n")
    shutil.copy(toy["train_json"], d / "annotations.pth")
    (d / "empty.pth").write_bytes(b"")
    out.update(
        {
            k: str(d / f"{k}.pth")
            for k in (
                "enc",
                "enc_other_size",
                "det",
                "det_other_size",
                "enc_truncated",
                "det_truncated",
                "notes",
                "annotations",
                "empty",
            )
        }
    )
    out["missing"] = str(d / "nowhere.pth")
    return out


CKPT_CASES = {
    # name: (key, file, needles)
    "pretrained truncated": ("model.backbone.pretrained", "enc_truncated", ["truncated or not a checkpoint"]),
    "pretrained other size": ("model.backbone.pretrained", "enc_other_size", ["shape", "model size"]),
    "pretrained text file": ("model.backbone.pretrained", "notes", ["not a checkpoint"]),
    "pretrained json file": ("model.backbone.pretrained", "annotations", ["not a checkpoint"]),
    "pretrained empty": ("model.backbone.pretrained", "empty", ["empty"]),
    "pretrained missing": ("model.backbone.pretrained", "missing", ["not found"]),
    "weights truncated": ("model.weights", "det_truncated", ["truncated or not a checkpoint"]),
    "weights other size": ("model.weights", "det_other_size", ["shape", "model size"]),
    "weights text file": ("model.weights", "notes", ["not a checkpoint"]),
    "weights encoder only": ("model.weights", "enc", ["not a detection checkpoint", "model.backbone.pretrained="]),
    "weights missing": ("model.weights", "missing", ["not found"]),
}


@pytest.mark.parametrize("case", sorted(CKPT_CASES))
def test_bad_checkpoint(tmp_path, toy, checkpoints, capsys, case):
    key, which, needles = CKPT_CASES[case]
    cfg = write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy)
    argv = ["--config", cfg, f"{key}={checkpoints[which]}"]
    if key == "model.weights":
        argv.append("--eval-only")
    r = run_tool_inprocess("train_net", argv, capsys)
    assert_one_error(r, checkpoints[which], *needles)
    assert_nothing_half_written(tmp_path / "out")


def test_good_checkpoints_are_accepted(tmp_path, toy, checkpoints, capsys):
    """Control: the same paths with good files get past loading (eval-only runs to the end)."""
    cfg = write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy)
    r = run_tool_inprocess(
        "train_net",
        [
            "--config",
            cfg,
            "--eval-only",
            f"model.weights={checkpoints['det']}",
            f"model.backbone.pretrained={checkpoints['enc']}",
        ],
        capsys,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(tmp_path / "out" / "eval" / "eval_metrics.json")


@pytest.mark.parametrize("case", ["truncated", "pointer to missing file", "not a training checkpoint"])
def test_resume_from_bad_last_checkpoint(tmp_path, toy, checkpoints, capsys, case):
    out = tmp_path / "out"
    out.mkdir()
    if case == "truncated":
        shutil.copy(checkpoints["enc_truncated"], out / "model_0000004.pth")
    elif case == "not a training checkpoint":
        shutil.copy(checkpoints["enc"], out / "model_0000004.pth")
    (out / "last_checkpoint").write_text("model_0000004.pth\n")
    cfg = write_pretrain_config(tmp_path / "c.yaml", out, toy["train_images"])
    r = run_tool_inprocess("pretrain", ["--config", cfg, "--resume"], capsys)
    assert_one_error(r, "model_0000004.pth")
    assert not os.path.exists(out / "encoder_final.pth")


# ------------------------------------------------------------------ output dir
@pytest.mark.parametrize("tool", ["pretrain", "train_net"])
def test_output_dir_not_writable(tmp_path, toy, capsys, tool):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where a folder is expected")
    out = blocker / "out"  # cannot be created, even by root
    if tool == "pretrain":
        cfg = write_pretrain_config(tmp_path / "c.yaml", out, toy["train_images"])
    else:
        cfg = write_det_config(tmp_path / "c.yaml", out, toy)
    r = run_tool_inprocess(tool, ["--config", cfg], capsys)
    assert_one_error(r, str(out), "not writable")
    assert blocker.read_text() == "a file where a folder is expected"


# ----------------------------------------------------------------- disk full
def _enospc_on_call(monkeypatch, n):
    """torch.save writes part of the file, then fails with ENOSPC, from its n-th call on."""
    real = torch.save
    calls = []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) >= n:
            f.write(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    return calls


def test_disk_full_during_checkpoint_write_in_training(tmp_path, toy, capsys, monkeypatch):
    out = tmp_path / "out"
    cfg = write_pretrain_config(tmp_path / "c.yaml", out, toy["train_images"])
    _enospc_on_call(monkeypatch, 2)  # model_0000003.pth succeeds, model_0000006.pth fails
    r = run_tool_inprocess("pretrain", ["--config", cfg], capsys)
    assert_one_error(r, "cannot write checkpoint", str(out / "model_0000006.pth"), "No space left on device")
    monkeypatch.undo()
    assert (out / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    assert load(out / "model_0000003.pth")["iter"] == 3
    assert sorted(f for f in os.listdir(out) if f.endswith((".pth", ".tmp"))) == ["model_0000003.pth"]


def test_disk_full_reported_by_torchs_zip_writer_names_the_room_needed(tmp_path, toy, capsys, monkeypatch):
    """A full disk as torch's zip writer reports it (a RuntimeError about the stream position,
    not ENOSPC): one line naming the file, the bytes needed and free; the previous checkpoint
    and the pointer stay valid."""
    import shutil

    out = tmp_path / "out"
    cfg = write_pretrain_config(tmp_path / "c.yaml", out, toy["train_images"])
    real_save, real_usage = torch.save, shutil.disk_usage
    calls = []

    def save(obj, f, *a, **k):
        calls.append(1)
        if len(calls) >= 2:
            f.write(b"PK\x03\x04partial")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8270464 vs 8270352")
        return real_save(obj, f, *a, **k)

    def usage(path):  # 64 kB left on the output's filesystem
        u = real_usage(path)
        return type(u)(u.total, u.total - 65536, 65536) if str(out) in str(path) else u

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", usage)
    r = run_tool_inprocess("pretrain", ["--config", cfg], capsys)
    assert_one_error(r, "cannot write checkpoint", str(out / "model_0000006.pth"), "No space left on device")
    assert re.search(r"\(\d+\.\d MB needed, 0\.1 MB free in ", r.stderr), r.stderr
    monkeypatch.undo()
    assert (out / "last_checkpoint").read_text().strip() == "model_0000003.pth"
    assert load(out / "model_0000003.pth")["iter"] == 3


def test_disk_full_and_kill_inside_checkpointer(tmp_path, monkeypatch):
    """Checkpointer alone: ENOSPC in the data write, ENOSPC in the pointer write, an
    abort (KeyboardInterrupt) in the middle of a write, and the temp file a SIGKILL
    leaves behind. The previous checkpoint stays usable and named by the pointer."""
    from maedet.checkpoint import checkpointer as ckmod
    from maedet.checkpoint.checkpointer import Checkpointer
    from maedet.utils.errors import CheckpointError

    c = Checkpointer(str(tmp_path), max_to_keep=2)
    state = {"model": {"w": torch.arange(1000.0)}, "iter": 1}
    c.save("model_0000001.pth", state)

    def check_previous_intact():
        assert c.last_checkpoint_name() == "model_0000001.pth"
        s = c.load_last()
        assert s["iter"] == 1 and torch.equal(s["model"]["w"], torch.arange(1000.0))
        assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]

    calls = _enospc_on_call(monkeypatch, 1)
    with pytest.raises(CheckpointError, match="No space left on device"):
        c.save("model_0000002.pth", dict(state, iter=2))
    monkeypatch.undo()
    assert calls and not os.path.exists(tmp_path / "model_0000002.pth")
    check_previous_intact()

    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckmod, "atomic_write_text", no_space)
    with pytest.raises(CheckpointError, match="last_checkpoint.*No space left"):
        c.save("model_0000002.pth", dict(state, iter=2))
    monkeypatch.undo()
    check_previous_intact()  # model_0000002.pth is complete but not named: harmless
    os.remove(tmp_path / "model_0000002.pth")

    def abort(obj, f, *a, **k):
        f.write(b"PK\x03\x04partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", abort)
    with pytest.raises(KeyboardInterrupt):
        c.save("model_0000002.pth", dict(state, iter=2))
    monkeypatch.undo()
    check_previous_intact()

    # a SIGKILL leaves its temp file: ignored by resume, removed by the next save
    (tmp_path / ".model_0000002.pth.k1ll3d.tmp").write_bytes(b"PK\x03\x04partial")
    (tmp_path / ".last_checkpoint.k1ll3d.tmp").write_bytes(b"model_00")
    assert c.load_last()["iter"] == 1
    c.save("model_0000003.pth", dict(state, iter=3))
    assert c.last_checkpoint_name() == "model_0000003.pth"
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
