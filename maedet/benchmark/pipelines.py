"""The data pipeline alone (decode + augment + collate) and DDP's gradient all-reduce alone."""

from __future__ import annotations

import io
import os
import resource
import time
import warnings
from typing import Any, Callable, Dict, List, Sequence

import torch

from maedet.builders.data import build_detection_dataset, build_pretrain_dataset, build_train_loader_fn
from maedet.builders.model import build_detection_model, build_mae_model
from maedet.builders.trainer import per_process_batch
from maedet.engine.ddp import wrap_ddp
from maedet.utils.profiling import Meter, median, rss_bytes

__all__ = ["run_data", "decode_rates", "GradProbe", "ddp_probe"]


def run_data(cfg: Any, kind: str, workers: int, warmup: int, iters: int, decode_images: int) -> Dict[str, Any]:
    """Images/s of the training loader (``workers`` DataLoader workers) after ``warmup`` batches."""
    from omegaconf import OmegaConf

    t = OmegaConf.create(OmegaConf.to_container(cfg.train, resolve=True))
    t.num_workers, t.persistent_workers, t.seed = workers, False, 0
    if kind == "pretrain":
        ds = build_pretrain_dataset(cfg.data, check=False)
        desc = f"MAE transform at {cfg.data.input_size}"
        paths = list(ds.paths)
    else:
        ds = build_detection_dataset(cfg.data, "train", train=True, check=False)
        p = cfg.data.train.pipeline
        desc = f"{ds.dataset_name}: decode + {p.name} {dict(p)} + masks + collate"
        paths = [ds.get_image_info(i)["file_path"] for i in range(len(ds))]
    loader = build_train_loader_fn(ds, kind, per_process_batch(t), t, torch.device("cpu"))(0)
    decode = decode_rates(paths[:decode_images])
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    times, bsz = [], 0
    for _ in range(iters):
        t0 = time.perf_counter()
        b = next(it)
        times.append(time.perf_counter() - t0)
        bsz = len(b[0])
    return {
        "pipeline": desc,
        "dataset_size": len(ds),
        "workers": workers,
        "batch_size": bsz,
        "batches_timed": iters,
        "images_per_s": bsz * iters / sum(times),
        "s_per_batch_median": median(times),
        "note": "mean rate over the timed batches after warm-up batches (workers started and prefetching)",
        "decode": decode,
    }


def decode_rates(paths: Sequence[str]) -> Dict[str, Any]:
    """Decode-only rate (file bytes in memory -> RGB uint8) of OpenCV (used), PIL and torchvision.io
    on ``paths``, one thread, interleaved per image; the decoders must agree on every size."""
    import cv2
    import numpy as np
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    blobs = []
    for p in paths:
        with open(p, "rb") as f:
            blobs.append(f.read())
    decoders: Dict[str, Callable] = {
        "opencv (used)": lambda b: cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1],
        "pil": lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")),
        "torchvision.io": lambda b: decode_image(
            torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB
        ),
    }
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    total = dict.fromkeys(decoders, 0.0)
    pixels = 0
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs (for TorchCodec)
            warnings.simplefilter("ignore", DeprecationWarning)
            for b in blobs:
                shapes = set()
                for name, fn in decoders.items():
                    t0 = time.perf_counter()
                    img = fn(b)
                    total[name] += time.perf_counter() - t0
                    shapes.add(tuple(img.shape[1:]) if isinstance(img, torch.Tensor) else tuple(img.shape[:2]))
                if len(shapes) != 1:
                    raise RuntimeError(f"decoders disagree on the image size: {sorted(shapes)}")
                h, w = shapes.pop()
                pixels += h * w
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv_threads)
    n = len(blobs)
    return {"images": n, "megapixels": pixels / 1e6, "images_per_s": {k: n / t for k, t in total.items() if t > 0}}


class GradProbe(torch.nn.Module):
    """``forward() = sum_i <p_i, s_i>`` over the trainable parameters with fixed random ``s_i``.

    Backward writes ``s_i`` into every parameter's gradient at almost no compute, so
    what a DDP-wrapped probe's backward costs is DDP's own work: bucketing and the
    all-reduce (with its communication hook)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        g = torch.Generator().manual_seed(0)
        self.seeds = [torch.randn(p.shape, generator=g).to(p.device) for p in self.params]

    def forward(self):
        return sum((p * s).sum() for p, s in zip(self.params, self.seeds))


def ddp_probe(cfg: Any, kind: str, device: torch.device, warmup: int, iters: int) -> Dict[str, Any]:
    """In an initialized process group: time the probe's backward under DDP on this rank."""
    model = (
        build_mae_model(cfg.model)
        if kind == "pretrain"
        else build_detection_model(cfg.model, cfg.model.num_classes or 80, load_pretrained=False)
    )
    probe = GradProbe(model.to(device))
    numel = sum(p.numel() for p in probe.params)
    meter = Meter(device)
    rss0 = rss_bytes()
    ddp = wrap_ddp(probe, device, cfg.train.ddp_grad_compression, cfg.train.ddp_bucket_view)

    def step():
        ddp().backward()
        for q in probe.params:
            q.grad = None

    walls: List[float] = []
    peaks: List[float] = []
    for r in range(warmup + iters):
        torch.distributed.barrier()
        wall, _, peak, _, _ = meter(step)
        if r >= warmup:
            walls.append(wall)
            peaks.append(peak)
    peak_all = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0) / 2**20
    return {"numel": numel, "wall": walls, "peak": max(peaks), "peak_since_wrap": peak_all}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_environment(port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
