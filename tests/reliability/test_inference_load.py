"""Inference under load: one Predictor (one model) shared by 4 threads gives the
same results as serial calls, with real instances and masks (score threshold 0)."""

import concurrent.futures
import threading

import numpy as np
import pytest
import torch

from .conftest import write_det_config


@pytest.fixture(scope="module")
def predictor(tmp_path_factory, toy):
    from maedet.builders import build_detection_model, build_predictor, load_detection_config

    d = tmp_path_factory.mktemp("pred")
    cfg = write_det_config(d / "det.yaml", d / "out", toy)
    torch.manual_seed(0)
    model = build_detection_model(load_detection_config(cfg, [], splits=()).model, 3)
    weights = d / "model.pth"
    torch.save({"model": model.state_dict(), "meta": {"class_names": ["circle", "triangle", "square"]}}, weights)
    return build_predictor(cfg, str(weights), device="cpu", score_thresh=0.0)


def _calls(toy):
    import os

    files = sorted(os.path.join(toy["train_images"], f) for f in os.listdir(toy["train_images"]))[:4]
    rng = np.random.default_rng(0)
    arrays = [(rng.random((h, w, 3)) * 255).astype(np.uint8) for h, w in [(64, 64), (96, 128), (120, 80)]]
    calls = []
    for f in files:
        calls.append(((f,), {}))
    for a in arrays:
        calls.append(((a,), {"input_format": "BGR"}))
    calls.append(((files[:2],), {}))  # a batch
    calls.append(((arrays[1],), {"return_rle": True}))
    return calls * 2  # every call twice, so identical calls also run at the same time


def _same(a, b):
    if isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
        return
    assert set(a) == set(b)
    for k in a:
        if isinstance(a[k], np.ndarray):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert np.array_equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_four_threads_share_one_predictor(predictor, toy):
    calls = _calls(toy)
    serial = [predictor(*args, **kw) for args, kw in calls]
    # real work: instances and non-empty masks
    singles = [r for r in serial if isinstance(r, dict) and "masks" in r]
    assert singles and all(len(r["scores"]) > 0 for r in singles)
    assert all(r["masks"].shape == (len(r["scores"]),) + tuple(r["image_size"]) for r in singles)
    assert sum(int(r["masks"].sum()) for r in singles) > 0
    assert all(np.isfinite(r["boxes"]).all() for r in singles)

    start = threading.Barrier(4)
    threads = set()

    def work(i):
        if i < 4:
            start.wait(30)  # the first call of each thread starts together
        threads.add(threading.get_ident())
        args, kw = calls[i]
        return predictor(*args, **kw)

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        threaded = list(pool.map(work, range(len(calls))))
    assert len(threads) == 4
    for a, b in zip(threaded, serial):
        _same(a, b)
    # the shared model is untouched by concurrent use
    assert not predictor.model.training
