"""Smoke test of tools/benchmark.py: every task on a tiny config, one timed run, JSON fields."""

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DET = os.path.join(ROOT, "configs", "quickstart", "mask_rcnn_vit_tiny.yaml")
MAE = os.path.join(ROOT, "configs", "quickstart", "mae_tiny.yaml")
# A smaller detector than the quickstart one (narrow heads, few RoIs, 64x64 inputs).
TINY_DET = [
    "model.backbone.embed_dim=48",
    "model.backbone.num_heads=2",
    "model.backbone.depth=2",
    "model.backbone.global_blocks=[1]",
    "model.backbone.window_size=2",
    "model.neck.out_channels=16",
    "model.roi_heads.box_head_conv_dims=[16]",
    "model.roi_heads.box_head_fc_dims=[32]",
    "model.roi_heads.mask_head_conv_dims=[16]",
    "model.rpn.pre_nms_topk_test=200",
    "model.rpn.post_nms_topk_test=200",
    "model.roi_heads.batch_size_per_image=32",
    "model.num_classes=5",
]


def _load_tool():
    spec = importlib.util.spec_from_file_location("maedet_benchmark_tool", os.path.join(ROOT, "tools", "benchmark.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tool():
    return _load_tool()


def _run(tool, tmp_path, argv):
    out = tmp_path / "bench.json"
    assert tool.main(argv + ["--iters", "1", "--warmup", "0", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["threads"] >= 1 and data["meta"]["device"] == "cpu"
    return data["results"]


def test_pretrain(tool, tmp_path):
    res = _run(
        tool,
        tmp_path,
        [
            "--config",
            MAE,
            "--task",
            "pretrain",
            "--batch-size",
            "2",
            "--image-size",
            "32",
            "--amp",
            "off",
            "--flops",
            "model.depth=1",
            "model.decoder_depth=1",
        ],
    )
    (r,) = res
    for key in (
        "ms_per_step",
        "images_per_s",
        "s_per_iter",
        "cpu_s_per_iter",
        "peak_mem_mb",
        "params_total_m",
        "flops_per_image_g",
        "optimizer_ms",
    ):
        assert isinstance(r[key], float) and r[key] >= 0, key
    assert r["optimizer_ms"] < r["ms_per_step"]
    assert r["batch_size"] == 2 and r["image_size"] == 32 and "loss_mae" in r["loss"]


def test_train_with_compare_and_act_checkpoint(tool, tmp_path):
    res = _run(
        tool,
        tmp_path,
        [
            "--config",
            DET,
            "--task",
            "train",
            "--batch-size",
            "1",
            "--image-size",
            "64",
            "--amp",
            "off",
            "--compare",
            "kernels=fast,reference",
        ]
        + TINY_DET,
    )
    names = [r["variant"] for r in res]
    assert len(res) == 4 and any("reference" in n and "act_checkpoint=true" in n for n in names)
    saved = {
        (("reference" in r["variant"]), ("act_checkpoint=true" in r["variant"])): r["saved_activations_mb"] for r in res
    }
    # the reference attention keeps the (N x N) probabilities; checkpointing keeps only block inputs
    assert saved[(True, False)] > saved[(False, False)] > saved[(False, True)] > 0
    assert saved[(True, False)] > saved[(True, True)]
    for r in res:
        assert r["s_per_iter"] > 0 and r["peak_mem_mb"] >= 0
        assert 0 < r["optimizer_ms"] < 1000 * r["s_per_iter"]
        assert set(r["losses"]) == {
            "loss_cls",
            "loss_box_reg",
            "loss_mask",
            "loss_rpn_cls",
            "loss_rpn_loc",
        }


def test_compare_two_configs_mask_rcnn_and_cascade(tool, tmp_path):
    cascade = os.path.join(ROOT, "configs", "quickstart", "cascade_mask_rcnn_vit_tiny.yaml")
    argv = ["--config", DET, "--task", "train", "--batch-size", "1", "--image-size", "64", "--amp", "off"]
    argv += ["--no-act-checkpoint-variant", "--compare", f"config={DET},{cascade}"] + TINY_DET
    res = _run(tool, tmp_path, argv)
    assert [r["variant"] for r in res] == [f"config={DET}", f"config={cascade}"]
    plain, casc = (set(r["losses"]) for r in res)
    assert "loss_box_reg" in plain and "loss_box_reg_stage2" in casc and "loss_box_reg" not in casc
    assert all(r["s_per_iter"] > 0 for r in res)


def test_infer_runs_mask_head_on_100_detections(tool, tmp_path):
    res = _run(
        tool,
        tmp_path,
        ["--config", DET, "--task", "infer", "--image-size", "64", "--amp", "off", "--infer-batches", "1,2", "--flops"]
        + TINY_DET,
    )
    assert [r["batch_size"] for r in res] == [1, 2]
    for r in res:
        assert r["detections_per_image"] == [100] * r["batch_size"]
        assert r["mask_shape"][0][0] == 100
        assert r["s_per_image"] > 0 and r["images_per_s"] > 0
        assert r["flops_full_inference_g"] > r["flops_backbone_pyramid_g"] > r["flops_vit_g"] > 0
        assert r["params_total_m"] > r["params_vit_m"] > 0


def test_data_pipeline(tool, tmp_path):
    from maedet.data.catalog import DatasetCatalog

    json_file, images = DatasetCatalog.get("fruits_nuts")
    if not os.path.isfile(json_file):
        pytest.skip(f"shared test data not found ({json_file})")
    res = _run(
        tool,
        tmp_path,
        [
            "--config",
            DET,
            "--task",
            "data",
            "--workers",
            "0",
            "--batch-size",
            "2",
            "data.train.name=fruits_nuts",
            "data.train.pipeline.image_size=128",
            "model.neck.square_pad=128",
            "--decode-images",
            "3",
            "--mapper-images",
            "2",
        ],
    )
    (r,) = res
    ref = r["detectron2"]  # the comparison with detectron2's DatasetMapper, or why it did not run
    if isinstance(ref, str):
        assert "detectron2" in ref and "PYTHONPATH" in ref
    else:
        assert ref["images"] == 2 and all(v > 0 for v in ref["images_per_s"].values())
    assert r["images_per_s"] > 0 and r["batch_size"] == 2 and r["workers"] == 0 and r["dataset_size"] == 18
    d = r["decode"]  # the three decoders ran on the same 3 files and agreed on every size
    assert d["images"] == 3 and set(d["images_per_s"]) == {"opencv (used)", "pil", "torchvision.io"}
    assert d["megapixels"] > 0 and all(v > 0 for v in d["images_per_s"].values())


def test_ddp_allreduce_two_processes(tmp_path):
    """--task ddp spawns its process groups, so it runs as a user would run it (a subprocess)."""
    import subprocess
    import sys

    out = tmp_path / "ddp.json"
    p = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "tools", "benchmark.py"),
            "--config",
            MAE,
            "--task",
            "ddp",
            "--procs",
            "2",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
            "--compare",
            "train.ddp_grad_compression=none,bf16",
            "model.depth=1",
            "model.decoder_depth=1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(out.read_text())["results"]
    assert [r["ddp_grad_compression"] for r in res] == ["none", "bf16"]
    full, half = res
    assert full["procs"] == 2 and full["backend"] == "gloo" and full["params_m"] > 0
    assert half["allreduce_mb_per_iter"] == pytest.approx(full["allreduce_mb_per_iter"] / 2)
    assert full["allreduce_mb_per_iter"] == pytest.approx(full["params_m"] * 1e6 * 4 / 2**20)
    for r in res:
        assert r["s_per_iter"] > 0 and len(r["s_per_iter_all"]) == 2 and r["peak_mem_since_wrap_mb"] >= 0


# ------------------------------------------------------------------ reference mode
def test_reference_mode_says_plainly_when_detectron2_is_missing(tool, capsys):
    reason = tool._sibling("benchmark_detectron2").detectron2_status()
    if reason is None:
        pytest.skip("detectron2 is importable here: the reference mode runs (docs/BENCHMARKS.md)")
    code = tool.main(["--config", DET, "--task", "reference", "--iters", "1", "--warmup", "0"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "detectron2 is not importable" in lines[0] and "pip install" in lines[0]


def test_matmul_flops_counts_products_and_convolutions_forward_and_backward():
    import torch

    from maedet.benchmark.arithmetic import matmul_flops

    a, b = torch.randn(2, 8, 16), torch.randn(2, 16, 4)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)

    def run():
        torch.zeros(2, 8, 4).baddbmm_(a, b)  # in place: not in torch's own table
        y = torch.nn.functional.conv2d(x, w, padding=1)
        y.relu().exp().sum().backward()  # element-wise work is not counted

    conv = 2 * (8 * 8) * 4 * (3 * 3 * 3)  # 2 FLOPs per multiply-add, 64 outputs x 4 channels x 27 taps
    # forward, then the input and the weight gradients cost one convolution each
    assert matmul_flops(run) == 2 * 2 * 8 * 16 * 4 + 3 * conv


def test_product_time_splits_the_run_between_products_and_the_rest():
    import torch

    from maedet.benchmark.arithmetic import product_time

    a = torch.randn(384, 384)
    x = torch.randn(1, 8, 32, 32, requires_grad=True)
    w = torch.randn(8, 8, 3, 3, requires_grad=True)

    def elementwise():
        y = a
        for _ in range(20):
            y = y.exp().tanh()

    def products():
        for _ in range(20):
            torch.mm(a, a)
        torch.nn.functional.conv2d(x, w, padding=1).sum().backward()

    none = product_time(elementwise)
    assert none["products_s"] == 0.0 and none["rest_s"] == none["profiled_s"] > 0
    most = product_time(products)
    assert 0 < most["products_s"] <= most["profiled_s"]
    assert abs(most["products_s"] + most["rest_s"] - most["profiled_s"]) < 1e-9


def test_reference_table_sets_the_flops_against_the_gemm_rate():
    format_comparison = _load_tool()._sibling("benchmark_detectron2").format_comparison

    rate = 100e9
    results = [
        {"framework": fw, "task": task, "s_per_iter": t, "flops": f, "gemm_flop_s": rate}
        for fw, task, t, f in (
            ("detectron2", "train", 40.0, 2.0e12),
            ("maedet", "train", 30.0, 2.4e12),
            ("detectron2", "infer", 20.0, 1.0e12),
            ("maedet", "infer", 12.0, 0.9e12),
        )
    ]
    lines = format_comparison(results)
    assert "| matrix products + convolutions, training step (GFLOP) | 2,000 | 2,400 | 1.20x |" in lines
    # 2.4 TFLOP at 100 GFLOP/s = 24 s = 0.60 of detectron2's 40 s; 20 s is 50% of detectron2's step
    assert (
        "| training step at this machine's GEMM rate, 100 GFLOP/s (s) | 20.00 | 24.00 | 0.60x of detectron2's time |"
        in lines
    )
    assert "| inference: share of the time at that rate | 50% | 75% | |" in lines
    assert not any("profiled run" in line for line in lines)  # no product_time split given

    for r, (profiled, products) in zip(results, ((44.0, 30.0), (32.0, 26.0), (21.0, 12.0), (13.0, 10.0))):
        r.update(profiled_s=profiled, products_s=products, rest_s=profiled - products)
    lines = format_comparison(results)
    assert "| training step, one profiled run (s) | 44.00 | 32.00 | 0.73x |" in lines
    # maedet's products alone take 26 s = 0.59 of detectron2's profiled 44 s
    row = "| of which in matrix products + convolutions (s) | 30.00 | 26.00 | 0.59x of detectron2's profiled run |"
    assert row in lines
    assert "| of which everything else (s) | 14.00 | 6.00 | 0.14x of detectron2's profiled run |" in lines
    # 2.4 TFLOP in 26 s; detectron2's 2.0 TFLOP in 30 s
    assert "| rate achieved in the products (GFLOP/s) | 67 | 92 | |" in lines
