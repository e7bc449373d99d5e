"""Kill and resume, through the real tools in subprocesses.

A run killed with SIGKILL at a (seeded) random iteration and restarted with
``--resume`` must end with the same weights, optimizer state and logged metrics as
an uninterrupted run; SIGKILL at random moments of a run that checkpoints every
iteration must always leave ``last_checkpoint`` naming a complete file; SIGTERM
must save a checkpoint at the current iteration and exit with code 143.
"""

import os
import random
import signal
import time

import pytest

from .conftest import (
    assert_same_state,
    completed_iters,
    load,
    metrics_records,
    run_tool,
    signal_at_iteration,
    start_tool,
    write_det_config,
    write_pretrain_config,
)

PRETRAIN_ITERS = 30
DET_ITERS = 16


def _final(out, iters):
    return os.path.join(str(out), f"model_{iters:07d}.pth")


def _assert_same_run(ref_dir, out_dir, iters, final_files):
    """Same final training state (model, optimizer, scaler, counters), same final
    weight files, same per-iteration metrics (losses, lr, ...)."""
    a, b = load(_final(ref_dir, iters)), load(_final(out_dir, iters))
    for key in ("model", "optimizer", "scaler", "iter", "samples_seen", "skipped_steps"):
        assert_same_state(a[key], b[key], key)
    for name in final_files:
        assert_same_state(
            load(os.path.join(str(ref_dir), name))["model"], load(os.path.join(str(out_dir), name))["model"], name
        )
    ra, rb = metrics_records(ref_dir), metrics_records(out_dir)
    assert [r["iter"] for r in rb if "loss" in r] == list(range(iters)) == [r["iter"] for r in ra if "loss" in r]
    assert ra == rb


# ----------------------------------------------------------------- pretraining
@pytest.fixture(scope="module")
def pretrain_cfg(tmp_path_factory, toy):
    d = tmp_path_factory.mktemp("mae")
    return write_pretrain_config(d / "mae.yaml", d / "unused", toy["train_images"])


@pytest.fixture(scope="module")
def pretrain_ref(tmp_path_factory, pretrain_cfg):
    out = tmp_path_factory.mktemp("mae_ref")
    r = run_tool(["tools/pretrain.py", "--config", pretrain_cfg, "--output-dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_pretrain_sigterm_and_sigkills_then_resume_is_bit_exact(tmp_path, pretrain_cfg, pretrain_ref):
    """One run, interrupted four times and resumed each time:

    1. SIGTERM at a seeded random iteration: exit 143, no traceback, a checkpoint
       of exactly that iteration named by ``last_checkpoint``;
    2. SIGKILL at a seeded random iteration between periodic checkpoints (every 3);
    3. twice, SIGKILL at a random moment of a run that checkpoints every iteration
       (about half of such kills land inside a checkpoint or pointer write);

    after each, ``last_checkpoint`` names a complete, loadable file. The final
    resume ends with the weights, optimizer state and per-iteration metrics of the
    uninterrupted run."""
    from maedet.checkpoint.checkpointer import Checkpointer

    rng = random.Random(1)
    out = tmp_path / "run"
    args = ["tools/pretrain.py", "--config", pretrain_cfg, "--output-dir", str(out)]
    reached = 0
    for cycle, period in enumerate([3, 3, 1, 1]):
        log = tmp_path / f"log{cycle}"
        proc = start_tool(args + [f"train.checkpoint_period={period}"] + (["--resume"] if cycle else []), log)
        if cycle == 0:
            signal_at_iteration(proc, log, rng.randint(3, 5), signal.SIGTERM)
            assert proc.wait(60) == 143, log.read_text()[-3000:]
            text = log.read_text()
            assert "Traceback" not in text and "error:" not in text, text[-3000:]
            assert "received SIGTERM" in text and "--resume" in text
            done = completed_iters(out)
            assert (out / "last_checkpoint").read_text().strip() == f"model_{done:07d}.pth"  # this iteration
        else:
            if cycle == 1:
                signal_at_iteration(proc, log, reached + rng.randint(3, 5), signal.SIGKILL)
            else:  # past start-up, then a random moment
                signal_at_iteration(proc, log, reached + 2, signal.SIGCONT)
                time.sleep(rng.uniform(0.0, 0.06))
                proc.kill()
            assert proc.wait(60) == -signal.SIGKILL, log.read_text()[-3000:]
            assert f"resumed from {out}" in log.read_text()
        state = Checkpointer(str(out)).load_last()  # raises if the pointer names a bad file
        assert state is not None and state["_path"].endswith(f"model_{state['iter']:07d}.pth")
        assert state["iter"] >= reached
        reached = state["iter"]
        assert reached < PRETRAIN_ITERS - 2, "the run ended before it was stopped"
    assert not os.path.exists(out / "encoder_final.pth")
    r = run_tool(args + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at iteration {reached}" in r.stdout
    assert not [f for f in os.listdir(out) if f.startswith(".model_")], "temp file of a killed write left"
    _assert_same_run(pretrain_ref, out, PRETRAIN_ITERS, ["encoder_final.pth"])


def test_pretrain_ctrl_c_saves_a_checkpoint_that_resumes_bit_exact(tmp_path, pretrain_cfg, pretrain_ref):
    """Ctrl-C as a terminal sends it (SIGINT to the whole process group, the DataLoader worker
    included): a checkpoint of the iteration it stopped at, a message saying where and how to
    resume, exit 130, no traceback; --resume then ends as the uninterrupted run."""
    out = tmp_path / "run"
    args = ["tools/pretrain.py", "--config", pretrain_cfg, "--output-dir", str(out), "train.num_workers=1"]
    log = tmp_path / "log"
    proc = start_tool(args, log)
    at = random.Random(7).randint(3, 6)
    signal_at_iteration(proc, log, at, signal.SIGCONT)  # wait for the iteration, then interrupt the group
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(60) == 130, log.read_text()[-3000:]
    text = log.read_text()
    assert "Traceback" not in text and "error:" not in text, text[-3000:]
    done = completed_iters(out)
    assert done >= at and "received Ctrl-C (SIGINT)" in text
    assert f"checkpoint {out / f'model_{done:07d}.pth'} written" in text and "--resume" in text
    assert (out / "last_checkpoint").read_text().strip() == f"model_{done:07d}.pth"
    r = run_tool(args + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at iteration {done}" in r.stdout
    _assert_same_run(pretrain_ref, out, PRETRAIN_ITERS, ["encoder_final.pth"])


# ------------------------------------------------------------------- detection
@pytest.fixture(scope="module")
def det_cfg(tmp_path_factory, toy):
    d = tmp_path_factory.mktemp("det")
    return write_det_config(d / "det.yaml", d / "unused", toy)


@pytest.fixture(scope="module")
def det_ref(tmp_path_factory, det_cfg):
    out = tmp_path_factory.mktemp("det_ref")
    r = run_tool(["tools/train_net.py", "--config", det_cfg, "--output-dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_detection_sigkill_then_resume_is_bit_exact(tmp_path, det_cfg, det_ref):
    kill_at = random.Random(4).randint(5, 11)
    out = tmp_path / "run"
    log = tmp_path / "log1"
    proc = start_tool(["tools/train_net.py", "--config", det_cfg, "--output-dir", str(out)], log)
    signal_at_iteration(proc, log, kill_at, signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL
    assert not os.path.exists(out / "model_final.pth")
    r = run_tool(["tools/train_net.py", "--config", det_cfg, "--output-dir", str(out), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    _assert_same_run(det_ref, out, DET_ITERS, ["model_final.pth"])


def _files(out):
    """Bytes of every file of a run folder but its text log (which a later run appends to)
    and its resolved config (here a copied run: it names the folder it was written in)."""
    files = {}
    for root, _, names in os.walk(out):
        for n in names:
            if not n.startswith("log") and n != "config.yaml":
                p = os.path.join(root, n)
                files[os.path.relpath(p, out)] = open(p, "rb").read()
    return files


@pytest.mark.parametrize("tool", ["pretrain", "train_net"])
def test_resume_of_a_finished_run_says_so_and_changes_nothing(
    tmp_path, tool, pretrain_cfg, pretrain_ref, det_cfg, det_ref
):
    """--resume on a run that completed (trained, final weights and evaluation written):
    exit 0, a line saying it is finished, no training, no evaluation, no file rewritten.
    A run whose final steps never completed (no ``finished.json``) runs only those."""
    import shutil

    cfg, ref = (pretrain_cfg, pretrain_ref) if tool == "pretrain" else (det_cfg, det_ref)
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    before = _files(out)
    assert "finished.json" in before
    args = [f"tools/{tool}.py", "--config", cfg, "--output-dir", str(out), "--resume"]
    r = run_tool(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"the run in {out} is finished" in r.stdout
    assert "starting training" not in r.stdout and "evaluation" not in r.stdout
    assert _files(out) == before
    # the final steps interrupted: only they run again (detection: the evaluation)
    os.remove(out / "finished.json")
    final = "encoder_final.pth" if tool == "pretrain" else "model_final.pth"
    os.remove(out / final)
    r = run_tool(args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "starting training" not in r.stdout and (out / final).is_file() and (out / "finished.json").is_file()
    assert (tool == "pretrain") or "evaluation at iteration" in r.stdout
    assert_same_state(load(out / final)["model"], load(ref / final)["model"], final)
