"""MAE pretraining runs: exact resume, 2-process DDP equals 1 process, CLI errors."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from maedet.builders import load_pretrain_config, run_pretraining
from maedet.data.toy import generate_toy_dataset
from maedet.engine.trainer import HookBase
from maedet.utils.logger import setup_logger

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = """
model: {img_size: 64, patch_size: 16, embed_dim: 64, depth: 2, num_heads: 2,
        decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2, norm_pix_loss: true}
data: {root: %(root)s, input_size: 64}
solver: {max_iter: 8, warmup_iters: 2, lr: 1.0e-3, epochs: 0, warmup_epochs: 0}
train: {device: cpu, batch_size: 4, num_workers: 0, checkpoint_period: 4, log_period: 1, persistent_workers: false}
"""


@pytest.fixture(scope="module")
def image_root(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    generate_toy_dataset(str(out), num_train=12, num_val=2, image_size=80, seed=3)
    return os.path.join(str(out), "train")


def _config(tmp_path, image_root, name, overrides=()):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY % {"root": image_root})
    return load_pretrain_config(str(path), [f"output_dir={tmp_path / name}", *overrides])


class _Crash(HookBase):
    def __init__(self, at):
        self.at = at

    def after_step(self, trainer):
        if trainer.iter == self.at:
            raise RuntimeError("simulated crash")


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [(r["iter"], r["loss"], r["lr"]) for r in map(json.loads, f)]


def test_resume_after_crash_is_bit_exact(tmp_path, image_root):
    setup_logger()
    ref = _config(tmp_path, image_root, "ref")
    torch.manual_seed(0)
    ref_path = run_pretraining(ref, torch.device("cpu"))

    # Crash at iteration 6 (checkpoint at 4), then resume with a different number of workers.
    cfg = _config(tmp_path, image_root, "crashed")
    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_pretraining(cfg, torch.device("cpu"), extra_hooks=[_Crash(6)])
    assert open(os.path.join(cfg.output_dir, "last_checkpoint")).read().strip() == "model_0000004.pth"
    torch.manual_seed(123)  # the resumed run must not depend on the fresh process's RNG
    cfg2 = _config(tmp_path, image_root, "crashed", ["train.num_workers=2"])
    path = run_pretraining(cfg2, torch.device("cpu"), resume=True)

    a, b = torch.load(ref_path)["model"], torch.load(path)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    full_a = torch.load(os.path.join(ref.output_dir, "model_0000008.pth"))
    full_b = torch.load(os.path.join(cfg.output_dir, "model_0000008.pth"))
    sa, sb = full_a["optimizer"]["state"], full_b["optimizer"]["state"]
    for k in sa:
        assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
    assert _losses(ref.output_dir) == _losses(cfg.output_dir)


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _run_tool(args, env_extra=None, timeout=300):
    """Run a tool in its own process group; on timeout the whole group (torchrun's
    workers included) is killed, so nothing is left behind."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_ddp_two_processes_equal_one(tmp_path, image_root):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY % {"root": image_root})
    common = ["--config", str(path), "solver.max_iter=4", "train.checkpoint_period=0"]
    one = _run_tool(["tools/pretrain.py", *common, "--output-dir", str(tmp_path / "one"), "train.batch_size=8"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run_tool(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            free_port(),
            "tools/pretrain.py",
            *common,
            "--output-dir",
            str(tmp_path / "two"),
            "train.batch_size=4",
        ]
    )
    assert two.returncode == 0, two.stderr[-3000:] + two.stdout[-3000:]
    a = torch.load(tmp_path / "one" / "encoder_final.pth")["model"]
    b = torch.load(tmp_path / "two" / "encoder_final.pth")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    la, lb = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [x[0] for x in la] == [x[0] for x in lb]
    for (_, l1, lr1), (_, l2, lr2) in zip(la, lb):
        assert l1 == pytest.approx(l2, rel=1e-4) and lr1 == lr2

    # The same 2-process run with gradients all-reduced in fp16 (train.ddp_grad_compression):
    # close to the uncompressed result, but not bit-equal, so the hook really ran.
    half = _run_tool(
        [
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            free_port(),
            "tools/pretrain.py",
            *common,
            "--output-dir",
            str(tmp_path / "half"),
            "train.batch_size=4",
            "train.ddp_grad_compression=fp16",
        ]
    )
    assert half.returncode == 0, half.stderr[-3000:] + half.stdout[-3000:]
    assert "DDP gradients all-reduced in fp16" in half.stderr + half.stdout
    c = torch.load(tmp_path / "half" / "encoder_final.pth")["model"]
    for k in a:
        torch.testing.assert_close(c[k], a[k], rtol=1e-2, atol=1e-3, msg=k)
    assert any(not torch.equal(c[k], b[k]) for k in b)


@pytest.mark.parametrize(
    "override,needle",
    [
        (["model.depthh=2"], "model.depthh"),
        (["data.root=/nonexistent/images"], "/nonexistent/images"),
    ],
)
def test_cli_bad_input_one_error_line(tmp_path, image_root, override, needle):
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY % {"root": image_root})
    out = tmp_path / "out"
    r = _run_tool(["tools/pretrain.py", "--config", str(path), "--output-dir", str(out), *override])
    assert r.returncode == 2
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert not any(f.endswith(".pth") for f in os.listdir(out)) if out.exists() else True


def test_cli_empty_folder_and_corrupt_image(tmp_path, image_root):
    empty = tmp_path / "empty"
    empty.mkdir()
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY % {"root": str(empty)})
    r = _run_tool(["tools/pretrain.py", "--config", str(path), "--output-dir", str(tmp_path / "o1")])
    assert r.returncode == 2 and "no images" in r.stderr and str(empty) in r.stderr

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in sorted(os.listdir(image_root))[:4]:
        (bad / name).write_bytes(open(os.path.join(image_root, name), "rb").read())
    data = (bad / sorted(os.listdir(bad))[0]).read_bytes()
    (bad / "broken.jpg").write_bytes(data[: len(data) // 2])
    path.write_text(TINY % {"root": str(bad)})
    r = _run_tool(
        [
            "tools/pretrain.py",
            "--config",
            str(path),
            "--output-dir",
            str(tmp_path / "o2"),
            "solver.max_iter=3",
            "train.batch_size=5",
        ]
    )
    assert r.returncode == 2 and "broken.jpg" in r.stderr, r.stderr[-2000:]
    assert not os.path.exists(tmp_path / "o2" / "encoder_final.pth")
    r = _run_tool(
        [
            "tools/pretrain.py",
            "--config",
            str(path),
            "--output-dir",
            str(tmp_path / "o3"),
            "solver.max_iter=3",
            "train.batch_size=5",
            "data.on_bad_image=skip",
        ]
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "broken.jpg" in r.stdout + r.stderr
    assert os.path.exists(tmp_path / "o3" / "encoder_final.pth")
