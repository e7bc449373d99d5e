"""Faults in a 2-process (gloo, CPU) detection run started with ``--num-gpus 2``.

One rank failing mid-training must bring the whole job down within a bounded
time, with that rank's error on stderr, instead of leaving the other rank stuck
in a collective. SIGTERM to the launcher must reach the workers, which save a
checkpoint and exit with 143.
"""

import os
import signal
import time

import pytest

from .conftest import error_lines, load, run_tool, signal_at_iteration, start_tool, write_det_config

BATCH = 2  # per process
WORLD = 2


@pytest.fixture(scope="module")
def toy24(tmp_path_factory):
    """A toy set large enough that some image is first read by rank 1 in iteration >= 2."""
    from maedet.data.toy import generate_toy_dataset

    root = tmp_path_factory.mktemp("toy24")
    p = generate_toy_dataset(str(root), num_train=24, num_val=2, image_size=64, seed=1)
    return {
        "train_json": p["train"][0],
        "train_images": p["train"][1],
        "val_json": p["val"][0],
        "val_images": p["val"][1],
    }


def _first_read_only_by_rank1(size: int, seed: int, min_iter: int):
    """(iteration, dataset index): an index rank 1 reads in ``iteration`` that no
    process has read before and rank 0 does not read in that iteration."""
    from maedet.data.samplers import InfiniteSampler

    streams = []
    for rank in range(WORLD):
        it = iter(InfiniteSampler(size, shuffle=True, seed=seed, rank=rank, world_size=WORLD))
        streams.append([next(it)[0] for _ in range(BATCH * 40)])
    seen = set()
    for i in range(40):
        r0 = streams[0][i * BATCH : (i + 1) * BATCH]
        r1 = streams[1][i * BATCH : (i + 1) * BATCH]
        if i >= min_iter:
            for idx in r1:
                if idx not in seen and idx not in r0:
                    return i, idx
        seen.update(r0 + r1)
    raise AssertionError("no suitable index")


def test_one_rank_failing_brings_the_job_down_with_its_error(tmp_path, toy24):
    from maedet.data.coco import CocoInstanceDataset

    ds = CocoInstanceDataset(toy24["train_json"], toy24["train_images"])
    fail_iter, index = _first_read_only_by_rank1(len(ds), seed=0, min_iter=2)
    bad = ds.get_image_info(index)["file_path"]
    data = open(bad, "rb").read()
    with open(bad, "wb") as f:  # truncated JPEG, read by rank 1 only, mid-training
        f.write(data[: len(data) // 2])
    try:
        cfg = write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy24)
        t0 = time.monotonic()
        # data.check_images=false: the image check before training would find the file at
        # start-up; this test is about a rank failing in the middle of training
        r = run_tool(
            [
                "tools/train_net.py",
                "--config",
                cfg,
                "--num-gpus",
                "2",
                "train.batch_size=2",
                "solver.max_iter=12",
                "solver.steps=[8]",
                "train.checkpoint_period=0",
                "data.check_images=false",
            ],
            timeout=180,
        )
        wall = time.monotonic() - t0
    finally:
        with open(bad, "wb") as f:
            f.write(data)
    assert r.returncode != 0
    assert wall < 60, f"job took {wall:.0f}s to go down"
    errors = error_lines(r.stderr)
    assert any(e.startswith("error: [rank 1] corrupt image:") and bad in e for e in errors), r.stderr[-4000:]
    assert errors[-1].startswith("error: process 1 exited with code 2"), r.stderr[-4000:]
    # it failed where expected: rank 0 logged the iterations before
    assert f"iter {fail_iter}/12" in r.stdout and f"iter {fail_iter + 1}/12" not in r.stdout, r.stdout[-3000:]
    assert not os.path.exists(tmp_path / "out" / "model_final.pth")


def test_sigterm_to_launcher_saves_checkpoint_and_exits_143(tmp_path, toy24):
    cfg = write_det_config(tmp_path / "det.yaml", tmp_path / "out", toy24)
    log = tmp_path / "log"
    proc = start_tool(
        [
            "tools/train_net.py",
            "--config",
            cfg,
            "--num-gpus",
            "2",
            "train.batch_size=2",
            "solver.max_iter=40",
            "solver.steps=[30]",
            "train.checkpoint_period=0",
        ],
        log,
    )
    signal_at_iteration(proc, log, 3, signal.SIGTERM)
    t0 = time.monotonic()
    rc = proc.wait(90)
    text = log.read_text()
    assert rc == 143, text[-4000:]
    assert time.monotonic() - t0 < 30
    assert "Traceback" not in text, text[-4000:]
    name = (tmp_path / "out" / "last_checkpoint").read_text().strip()
    state = load(tmp_path / "out" / name)
    assert 3 <= state["iter"] < 40 and name == f"model_{state['iter']:07d}.pth"
    assert len(state["rng"]) == 2  # both ranks' RNG states: the resume is exact
