"""A run never writes into a folder that holds another run, and evaluation never touches
the training run it evaluates (through the tools, in this process)."""

import os

from .conftest import assert_one_error, load, run_tool_inprocess, write_det_config, write_pretrain_config


def _files(out):
    """Bytes of every file under ``out``."""
    files = {}
    for root, _, names in os.walk(out):
        for n in names:
            p = os.path.join(root, n)
            files[os.path.relpath(p, out)] = open(p, "rb").read()
    return files


def test_a_fresh_run_refuses_a_folder_holding_another_run(tmp_path, toy, capsys):
    out = tmp_path / "out"
    cfg = write_pretrain_config(tmp_path / "c.yaml", out, toy["train_images"])
    r = run_tool_inprocess("pretrain", ["--config", cfg], capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    first = _files(out)
    assert "encoder_final.pth" in first and "last_checkpoint" in first
    # the same command again, without --resume: refused before anything is written
    r = run_tool_inprocess("pretrain", ["--config", cfg, "train.seed=1"], capsys)
    line = assert_one_error(r, f"output directory {out} holds another run", "--resume", "--overwrite")
    assert "encoder_final.pth" in line and "last_checkpoint" in line
    assert _files(out) == first
    # --overwrite: the previous run's files are replaced by the new run's, nothing of it is left
    (out / "notes.txt").write_text("mine")
    r = run_tool_inprocess("pretrain", ["--config", cfg, "train.seed=1", "--overwrite"], capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    after = _files(out)
    old_events = {p for p in first if p.startswith("tb")}
    assert after["notes.txt"] == b"mine" and set(first) - old_events <= set(after)
    assert not old_events & set(after)  # the old run's tensorboard events are gone
    assert b"seed: 1" in after["config.yaml"] and after["encoder_final.pth"] != first["encoder_final.pth"]
    assert after["log.txt"].count(b"starting training") == 1  # the old log went with the old run


def test_eval_only_writes_its_own_folder_and_leaves_the_training_run_alone(tmp_path, toy, capsys):
    out = tmp_path / "out"
    cfg = write_det_config(tmp_path / "det.yaml", out, toy)
    short = ["solver.max_iter=2", "solver.steps=[1]", "test.eval_period=0"]
    r = run_tool_inprocess("train_net", ["--config", cfg, *short], capsys)
    assert r.returncode == 0, r.stderr[-2000:]
    run = _files(out)
    weights = str(out / "model_final.pth")
    for sub in ("eval", "eval_2"):  # each evaluation in a folder of its own
        r = run_tool_inprocess("train_net", ["--config", cfg, "--eval-only", f"model.weights={weights}"], capsys)
        assert r.returncode == 0, r.stderr[-2000:]
        assert (out / sub / "eval_metrics.json").is_file() and (out / sub / "config.yaml").is_file()
        assert {p: b for p, b in _files(out).items() if not p.startswith("eval")} == run  # config.yaml too
    assert load(out / "model_final.pth")["meta"]["iter"] == 2
