"""Detection training: layer-wise lr decay groups, exact resume, DDP equivalence, --eval-only."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from maedet.builders import build_detection_model, load_detection_config
from maedet.builders import run_detection_training as run_training
from maedet.data.toy import generate_toy_dataset
from maedet.engine.optim import build_optimizer, param_groups
from maedet.engine.trainer import HookBase
from maedet.utils.logger import setup_logger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = """
_base_: %(repo)s/configs/coco/mask_rcnn_vitdet_base.yaml
model:
  backbone: {img_size: 64, embed_dim: 64, depth: 2, num_heads: 2, drop_path_rate: 0.0, window_size: 2,
             global_blocks: [1], pretrain_img_size: 64}
  neck: {out_channels: 32, square_pad: 64}
  rpn:
    anchor_sizes: [8, 16, 32, 64, 128]
    pre_nms_topk_train: 200
    post_nms_topk_train: 100
    pre_nms_topk_test: 100
    post_nms_topk_test: 50
    # take every anchor / proposal: sampling is then deterministic, so runs on any
    # number of processes see the same training targets
    batch_size_per_image: 100000
  roi_heads:
    box_head_conv_dims: [32, 32]
    box_head_fc_dims: [64]
    mask_head_conv_dims: [32, 32]
    detections_per_img: 20
    batch_size_per_image: 100000
data:
  train:
    name: ""
    json: %(root)s/annotations/instances_train.json
    images: %(root)s/train
    pipeline: {image_size: 64, min_scale: 0.8, max_scale: 1.2}
  test:
    name: ""
    json: %(root)s/annotations/instances_val.json
    images: %(root)s/val
    pipeline: {short_edge_length: 64, max_size: 64}
solver: {lr: 2.0e-4, layer_decay: 0.8, max_iter: 6, warmup_iters: 2, steps: [4]}
train: {device: cpu, total_batch_size: 0, batch_size: 2, num_workers: 0, checkpoint_period: 3, log_period: 1,
        amp: "off", persistent_workers: false}
test: {eval_period: 0, num_workers: 0}
"""


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("toydet"))
    generate_toy_dataset(out, num_train=8, num_val=3, image_size=64, seed=5)
    return out


def _cfg_file(tmp_path, toy_root):
    path = tmp_path / "det.yaml"
    path.write_text(TINY % {"root": toy_root, "repo": REPO})
    return str(path)


def _cfg(tmp_path, toy_root, name, overrides=()):
    return load_detection_config(_cfg_file(tmp_path, toy_root), [f"output_dir={tmp_path / name}", *overrides])


def test_layer_decay_groups_follow_formula(tmp_path, toy_root):
    cfg = _cfg(tmp_path, toy_root, "ld", ["model.backbone.depth=3", "model.backbone.global_blocks=[2]"])
    model = build_detection_model(cfg.model, num_classes=3)
    depth, decay, lr = 3, 0.8, 1e-4
    groups = param_groups(model, 0.1, layer_decay=decay, num_layers=depth, layer_id_fn=model.layer_id)
    opt = build_optimizer(groups, "adamw", lr=lr)
    seen = set()
    for g in opt.param_groups:
        for name in g["names"]:
            seen.add(name)
            if name.startswith("backbone.net.patch_embed") or name == "backbone.net.pos_embed":
                layer = 0
            elif name.startswith("backbone.net.blocks."):
                layer = int(name.split(".")[3]) + 1
            else:
                layer = depth + 1  # pyramid and heads: x1
            assert g["lr"] == pytest.approx(lr * decay ** (depth + 1 - layer)), name
            assert g["weight_decay"] == 0.1, name  # exemptions are per recipe (test_optim_groups.py)
    assert seen == {n for n, p in model.named_parameters() if p.requires_grad}


class _Crash(HookBase):
    def after_step(self, trainer):
        if trainer.iter == 5:
            raise RuntimeError("simulated crash")


def test_detection_resume_after_crash_is_exact(tmp_path, toy_root, monkeypatch):
    setup_logger()
    torch.manual_seed(0)
    ref = _cfg(tmp_path, toy_root, "ref")
    run_training(ref, torch.device("cpu"))

    import maedet.builders.tasks as det

    real_eval_hook = det.EvalHook

    class CrashingEvalHook(real_eval_hook):
        def after_step(self, trainer):
            super().after_step(trainer)
            _Crash().after_step(trainer)

    monkeypatch.setattr(det, "EvalHook", CrashingEvalHook)
    cfg = _cfg(tmp_path, toy_root, "crash")
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(cfg, torch.device("cpu"))
    monkeypatch.setattr(det, "EvalHook", real_eval_hook)
    torch.manual_seed(99)
    run_training(cfg, torch.device("cpu"), resume=True)

    a = torch.load(os.path.join(ref.output_dir, "model_final.pth"))["model"]
    b = torch.load(os.path.join(cfg.output_dir, "model_final.pth"))["model"]
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la = [json.loads(x) for x in open(os.path.join(ref.output_dir, "metrics.jsonl"))]
    lb = [json.loads(x) for x in open(os.path.join(cfg.output_dir, "metrics.jsonl"))]
    key = ("iter", "loss", "loss_mask", "lr")
    assert [tuple(r.get(k) for k in key) for r in la] == [tuple(r.get(k) for k in key) for r in lb]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_ddp_two_processes_equal_one_with_same_global_batch(tmp_path, toy_root):
    cfg = _cfg_file(tmp_path, toy_root)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    common = [
        "tools/train_net.py",
        "--config",
        cfg,
        "solver.max_iter=3",
        "solver.steps=[2]",
        "train.checkpoint_period=0",
        "train.batch_size=1",
    ]
    # One process: global batch 2 as two accumulated micro-batches, so each image's loss
    # is normalized over its own samples, exactly as on two processes.
    one = subprocess.run(
        [sys.executable, *common, "--output-dir", str(tmp_path / "one"), "train.accum_steps=2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            _free_port(),
            *common,
            "--output-dir",
            str(tmp_path / "two"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a = torch.load(tmp_path / "one" / "model_final.pth")["model"]
    b = torch.load(tmp_path / "two" / "model_final.pth")["model"]
    changed = 0
    init = build_detection_model(load_detection_config(cfg, []).model, 3).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    for k in a:
        if a[k].dtype.is_floating_point and a[k].shape == init[k].shape and not torch.equal(a[k], init[k]):
            changed += 1
    assert changed > 0
    ra = [json.loads(x) for x in open(tmp_path / "one" / "metrics.jsonl")]
    rb = [json.loads(x) for x in open(tmp_path / "two" / "metrics.jsonl")]
    for x, y in zip(ra, rb):
        if "loss" in x:
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)


def test_eval_only_reports_ap_and_writes_results(tmp_path, toy_root):
    cfg = _cfg(tmp_path, toy_root, "train", ["solver.max_iter=2", "solver.steps=[1]"])
    setup_logger()
    run_training(cfg, torch.device("cpu"))
    weights = os.path.join(cfg.output_dir, "model_final.pth")
    r = subprocess.run(
        [
            sys.executable,
            "tools/train_net.py",
            "--config",
            _cfg_file(tmp_path, toy_root),
            "--output-dir",
            str(tmp_path / "eval"),
            "--eval-only",
            f"model.weights={weights}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout + r.stderr
    assert "| AP " in out and "bbox" in out and "segm" in out
    metrics = json.load(open(tmp_path / "eval" / "eval" / "eval_metrics.json"))  # the evaluation's own folder
    assert set(metrics["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100"}
    assert os.path.exists(tmp_path / "eval" / "eval" / "coco_instances_results.json")
