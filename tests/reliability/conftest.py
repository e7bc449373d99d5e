"""Helpers of the reliability suite: tiny configs, toy data, running the real tools
(in a subprocess or in this process), killing a run at a chosen iteration, and
comparing training states bit for bit."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# Tiny MAE: 64 px images, 16 patches, 2 blocks of width 64.
PRETRAIN_YAML = """
output_dir: {out}
model: {{img_size: 64, patch_size: 16, embed_dim: 64, depth: 2, num_heads: 2,
        decoder_embed_dim: 32, decoder_depth: 1, decoder_num_heads: 2, norm_pix_loss: true}}
data: {{root: {root}, input_size: 64}}
solver: {{max_iter: 30, warmup_iters: 3, lr: 1.0e-3, epochs: 0, warmup_epochs: 0}}
train: {{device: cpu, batch_size: 4, num_workers: 0, checkpoint_period: 3, log_period: 1,
        persistent_workers: false, pin_memory: false}}
"""

# Tiny ViTDet Mask R-CNN on 64 px toy images.
DET_YAML = """
output_dir: {out}
model:
  neck: {{out_channels: 32, square_pad: 64}}
  rpn: {{anchor_sizes: [8, 16, 32, 64, 128], pre_nms_topk_train: 100, post_nms_topk_train: 50,
        pre_nms_topk_test: 100, post_nms_topk_test: 50, batch_size_per_image: 32}}
  roi_heads: {{box_head_conv_dims: [32, 32], box_head_fc_dims: [64], mask_head_conv_dims: [32, 32],
              batch_size_per_image: 16, detections_per_img: 10}}
  backbone: {{img_size: 64, embed_dim: 64, depth: 2, num_heads: 2, window_size: 4, global_blocks: [1],
             drop_path_rate: 0.0, pretrain_img_size: 64}}
data:
  train: {{json: {train_json}, images: {train_images}, pipeline: {{image_size: 64, min_scale: 0.8, max_scale: 1.2}}}}
  test: {{json: {val_json}, images: {val_images}, pipeline: {{short_edge_length: 64, max_size: 64}}}}
solver: {{lr: 1.0e-3, max_iter: 16, warmup_iters: 2, steps: [12]}}
train: {{device: cpu, batch_size: 2, total_batch_size: 0, num_workers: 0, checkpoint_period: 3, log_period: 1,
        persistent_workers: false, pin_memory: false}}
test: {{eval_period: 0, num_workers: 0}}
"""

# Metric keys that measure time; everything else in metrics.jsonl must match exactly.
TIMING_KEYS = {"time", "data_time", "images_per_sec", "eta_seconds"}


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    """The built-in toy dataset, 8 train + 2 val images of 64 px."""
    from maedet.data.toy import generate_toy_dataset

    root = tmp_path_factory.mktemp("toy")
    paths = generate_toy_dataset(str(root), num_train=8, num_val=2, image_size=64, seed=0)
    return {
        "root": str(root),
        "train_json": paths["train"][0],
        "train_images": paths["train"][1],
        "val_json": paths["val"][0],
        "val_images": paths["val"][1],
    }


def write_pretrain_config(path, out, root) -> str:
    with open(path, "w") as f:
        f.write(PRETRAIN_YAML.format(out=out, root=root))
    return str(path)


def write_det_config(path, out, toy: Dict[str, str], **paths) -> str:
    values = {k: toy[k] for k in ("train_json", "train_images", "val_json", "val_images")}
    values.update(paths)
    with open(path, "w") as f:
        f.write(DET_YAML.format(out=out, **values))
    return str(path)


def _env(extra=None):
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **(extra or {}))


def run_tool(args: Sequence[str], timeout: float = 240, env=None) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` from the repository root and wait for it.

    It runs in its own process group, and on a timeout the whole group is killed,
    so that no worker of a multi-process run outlives the test.
    """
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(args)}\n{err[-3000:]}") from None
    finally:
        kill_group(proc)  # workers left behind by a launcher that died
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def start_tool(args: Sequence[str], log_path, env=None) -> subprocess.Popen:
    """Start ``python ARGS`` in the background (own process group), output to ``log_path``."""
    with open(str(log_path), "w") as log:
        proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env=_env(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
    _STARTED.append(proc)
    return proc


_STARTED: List[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _reap_started_tools():
    """After each test, kill whatever is left of the runs it started in the background."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        kill_group(proc)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of the process group that ``proc`` leads (no-op when empty)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def completed_iters(out_dir) -> int:
    """Iterations recorded in ``out_dir/metrics.jsonl`` (log_period 1: one record per iteration)."""
    done = 0
    try:
        with open(os.path.join(str(out_dir), "metrics.jsonl")) as f:
            for line in f:
                try:
                    done = max(done, int(json.loads(line)["iter"]) + 1)
                except (ValueError, KeyError):
                    pass
    except FileNotFoundError:
        pass
    return done


_ITER_LINE = re.compile(r"\] iter (\d+)/\d+ ")


def logged_iteration(log_path) -> int:
    """The last iteration a run has reported on its console (``iter N/M`` lines)."""
    try:
        with open(str(log_path), errors="replace") as f:
            found = _ITER_LINE.findall(f.read())
    except FileNotFoundError:
        return 0
    return int(found[-1]) if found else 0


def signal_at_iteration(
    proc: subprocess.Popen, log_path, iteration: int, sig=signal.SIGKILL, timeout: float = 180
) -> int:
    """Send ``sig`` to ``proc`` as soon as its console (``log_path``, see
    :func:`start_tool`) reports ``iteration`` completed iterations (log_period 1).

    Returns the iteration seen when the signal was sent.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = logged_iteration(log_path)
        if done >= iteration:
            os.kill(proc.pid, sig)
            return done
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before iteration {iteration}")
        time.sleep(0.003)
    proc.kill()
    raise AssertionError(f"run did not reach iteration {iteration} in {timeout}s")


def metrics_records(out_dir) -> List[dict]:
    """metrics.jsonl without the timing entries."""
    with open(os.path.join(str(out_dir), "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in recs]


def assert_same_state(a, b, path="state"):
    """Recursive bit-exact comparison of checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(map(str, set(a) ^ set(b)))}"
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b or (a != a and b != b), f"{path}: {a!r} != {b!r}"


def load(path):
    return torch.load(str(path), map_location="cpu", weights_only=True)


def error_lines(stderr: str) -> List[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# ------------------------------------------------------------ tools in-process


def assert_one_error(r, *needles) -> str:
    """Exit code 2, exactly one ``error:`` line holding every needle, no traceback; the line."""
    assert r.returncode == 2, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    errors = error_lines(r.stderr)
    assert len(errors) == 1, r.stderr[-3000:]
    for n in needles:
        assert str(n) in errors[0], f"{n!r} not in {errors[0]!r}"
    assert "Traceback" not in r.stderr
    return errors[0]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_maedet_tool_{name}", os.path.join(REPO, "tools", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_tool_inprocess(tool: str, argv: Sequence[str], capsys) -> "ToolResult":
    """Run ``tools/TOOL.py ARGV`` in this process through the same top level
    (``run_tool`` / ``launch``) that the command line uses; returns its exit code
    and what it wrote. Much faster than a subprocess (torch is already imported)."""
    from maedet.utils.logger import setup_logger

    mod = _load_tool(tool)
    capsys.readouterr()
    setup_logger()  # console logging to this test's (captured) streams, not an earlier test's
    code: Optional[int] = None
    old_argv = sys.argv
    sys.argv = [f"tools/{tool}.py", *argv]
    try:
        try:
            if tool in ("train_net", "pretrain"):
                a = mod.parse_args(list(argv))
                mod.launch(mod.main, a.num_gpus, (a,))
            elif tool == "infer":
                a = mod.parse_args(list(argv))
                mod.run_tool(lambda: mod.main(a))
            else:
                mod.run_tool(mod.main)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old_argv
        setup_logger()  # drop the run's log.txt handler
    captured = capsys.readouterr()
    return ToolResult(code, captured.out, captured.err)


class ToolResult:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def assert_nothing_half_written(out_dir) -> None:
    """No checkpoint, results or temp file in ``out_dir`` (config/log files may exist)."""
    if not os.path.isdir(str(out_dir)):
        return
    bad = []
    for dirpath, _, files in os.walk(str(out_dir)):
        for f in files:
            if f.endswith((".pth", ".tmp", ".pkl")) or f in (
                "last_checkpoint",
                "coco_instances_results.json",
                "eval_metrics.json",
                "results.json",
            ):
                bad.append(os.path.join(dirpath, f))
    assert not bad, f"left behind: {bad}"
