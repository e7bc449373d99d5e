#!/usr/bin/env python
"""Speed, memory, parameters and FLOPs of the model a config builds.

Tasks:
  pretrain  MAE step (forward + backward + optimizer step): ms/step, images/s, peak memory,
            the optimizer step's own time (optimizer_ms, part of the step) and the activation
            memory autograd keeps for backward (saved_activations_mb, allocator-independent)
  train     ViTDet Mask R-CNN training iteration: s/iter, peak memory, loss breakdown,
            optimizer_ms, saved_activations_mb; with and without activation checkpointing
            (model.backbone.act_checkpoint)
  infer     ViTDet Mask R-CNN inference at batch 1 and a larger batch with the mask head
            exercised (box_score_thresh=0, detections_per_img=100): s/image, images/s,
            detections per image, peak memory
  data      the training data pipeline alone (decode + augment + collate) on data.train
            (detection) or data.* (pretrain configs) with --workers W: images/s
  ddp       DistributedDataParallel's gradient all-reduce for the config's model with --procs P
            processes (gloo on CPU, NCCL on CUDA): ms per backward of a probe loss that gives every
            parameter a gradient at almost no compute, bytes all-reduced, peak memory per process;
            e.g. --compare train.ddp_grad_compression=none,bf16 --compare train.ddp_bucket_view=true,false

Examples:
  python tools/benchmark.py --config configs/mae/mae_vit_base_patch16.yaml --task pretrain \\
      --batch-size 8 --amp off --iters 5 --warmup 1 --flops
  python tools/benchmark.py --config configs/coco/mask_rcnn_vit_b_100ep.yaml --task train \\
      --batch-size 1 --amp off --iters 2 --warmup 1 --compare model.backbone.attn_impl=sdpa,explicit
  python tools/benchmark.py --config configs/coco/mask_rcnn_vit_b_100ep.yaml --task data \\
      --workers 2 data.train.name=coco128

Every measurement is the median of --iters timed runs after --warmup untimed ones.
``--compare KEY=V1,V2`` (or ``--ab``; may repeat: the variants are the product) builds
one model per value in this one process and interleaves their runs, so load changes
hit all variants alike; the ratio to the first variant is printed.

Timing: CUDA work is synchronized before each clock read; on CPU the torch thread
count is set (--threads, else train.threads, else torch's default) and reported, and
process CPU time is reported next to wall time (on a loaded machine wall time
stretches, CPU time much less).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` (reset before each run),
reported as the peak above what was allocated before the run and as the absolute peak.
On CPU a sampling thread reads this process's resident set (/proc/self/statm, every
2 ms) during each run and reports the peak above the RSS before the run (torch's
large CPU buffers are mmap'ed and returned to the OS when freed, so this sees each
run's own peak even with several variants in one process). ``--isolate`` instead runs
each variant in a fresh subprocess and also reports ``ru_maxrss`` minus the RSS
before the first run (variants then run one after another, not interleaved).

FLOPs (--flops): fvcore ``FlopCountAnalysis`` (fvcore counts one multiply-add as one
flop) of the model in eval mode at the benchmark image size, with
attn_impl=explicit because fvcore does not count ``scaled_dot_product_attention``;
parameters by ``fvcore.nn.parameter_count``. On CUDA, model FLOP utilization =
2 x fvcore flops x (3 for training, 1 for inference) / time / --peak-tflops.
"""
from __future__ import annotations

import argparse
import copy
import io
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

TASKS = ("pretrain", "train", "infer", "data", "ddp")


# ----------------------------------------------------------------------------- helpers
def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: fall back to the (monotonic) max RSS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _PeakRSS:
    """Samples the process RSS in a thread; ``peak`` is the maximum seen."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self):
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


class Meter:
    """Runs a step function with timing and peak-memory accounting."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, fn: Callable[[], Any]) -> Tuple[float, float, float, float, Any]:
        """Returns (wall s, process CPU s, peak MB above the start, absolute peak MB, fn's result)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            torch.cuda.synchronize(self.device)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            peak = torch.cuda.max_memory_allocated(self.device)
            return wall, cpu, (peak - before) / 2**20, peak / 2**20, out
        with _PeakRSS() as m:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return wall, cpu, (m.peak - m.start) / 2**20, m.peak / 2**20, out


def _autocast(device: torch.device, amp: str):
    from maedet.engine.amp import amp_dtype, autocast

    return autocast(device, amp_dtype(amp, device))


def _amp_mode(args, cfg, device: torch.device) -> str:
    """--amp, else the config's train.amp, resolved for ``device`` (``auto`` -> off / bf16 / fp16)."""
    from maedet.engine.amp import resolve_amp

    return resolve_amp(args.amp or cfg.train.amp, device, key="--amp" if args.amp else "train.amp")


def _median(xs: Sequence[float]) -> Optional[float]:
    return float(statistics.median(xs)) if xs else None


# ----------------------------------------------------------------------------- config
def load_cfg(config: str, overrides: Sequence[str], task: str, args) -> Any:
    from maedet.config import DetectionConfig, PretrainConfig, load_config

    ov = list(overrides)
    if task == "pretrain" or (task in ("data", "ddp") and _is_pretrain_config(config)):
        if args.image_size:
            ov = [f"model.img_size={args.image_size}", f"data.input_size={args.image_size}"] + ov
        if args.batch_size:
            ov = [f"train.batch_size={args.batch_size}"] + ov
        return load_config(config, ov, PretrainConfig), "pretrain"
    if args.image_size:
        s = args.image_size
        ov = [f"data.image_size={s}", f"model.min_size={s}", f"model.max_size={s}",
              f"model.backbone.img_size={s}"] + ov
    if args.batch_size and task != "infer":
        ov = ["train.total_batch_size=0", f"train.batch_size={args.batch_size}"] + ov
    if task == "infer" and not args.keep_thresholds:
        ov = ["model.box_score_thresh=0.0", f"model.detections_per_img={args.detections}"] + ov
    return load_config(config, ov, DetectionConfig), "detection"


def _is_pretrain_config(path: str) -> bool:
    from maedet.config import load_yaml_with_bases

    keys = set()
    for _, part in load_yaml_with_bases(path):
        keys.update((part.get("model") or {}).keys())
    return "backbone" not in keys and "decoder_depth" in keys


# ----------------------------------------------------------------------------- workloads
def _synthetic_detection_batch(batch: int, size: int, num_classes: int, seed: int = 0):
    """uint8 images (3, S, S) and targets with 8 box-shaped instances each (reproducible)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))
        n = 8
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        wh = (torch.rand(n, 2, generator=g) * 0.25 + 0.05) * size
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1).floor()
        masks = torch.zeros(n, size, size, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1 + 1, x0:x1 + 1] = 1
        labels = torch.randint(1, num_classes + 1, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


class SavedActivations:
    """Counts the bytes autograd saves for backward during a forward pass.

    A ``saved_tensors_hooks`` context records every tensor saved for backward
    (by built-in ops and custom autograd functions alike), deduplicated by
    storage; parameters are left out. The sum is the activation memory the
    backward pass holds on to, independent of the allocator (unlike RSS)."""

    def __init__(self, model: torch.nn.Module, enabled: bool = True):
        self._params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: Dict[int, int] = {}
        self.enabled = enabled  # off under torch.compile, whose graphs save tensors their own way

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in self._params:
            self.storages[st.data_ptr()] = st.nbytes()
        return t

    def __enter__(self):
        self.storages.clear()
        if self.enabled:
            self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
            self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._ctx.__exit__(*exc)

    @property
    def mb(self) -> Optional[float]:
        return sum(self.storages.values()) / 2**20 if self.enabled else None


class Workload:
    """One variant: a built model and its step function."""

    name: str
    info: Dict[str, Any]

    def step(self) -> Dict[str, Any]:
        raise NotImplementedError

    def _saved_counter(self) -> "SavedActivations":
        """Counts saved activations on the first step only (the graph is the same every step),
        so the timed steps run without the hooks."""
        first = not getattr(self, "_counted", False)
        self._counted = True
        return SavedActivations(self.model, first and not self.cfg.train.compile)

    def optimizer_step(self) -> float:
        """``scaler.step`` + ``update`` + ``zero_grad``; returns its wall time in ms (CUDA synchronized)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return 1000 * (time.perf_counter() - t0)


class PretrainWorkload(Workload):
    def __init__(self, cfg, device, amp):
        from maedet.engine.optim import build_optimizer, param_groups
        from maedet.engine.pretrain import build_mae_model
        from maedet.models.mae import masking_noise

        self.cfg, self.device, self.amp = cfg, device, amp
        self.model = build_mae_model(cfg.model).to(device).train()
        self.net = torch.compile(self.model) if cfg.train.compile else self.model
        s = cfg.solver
        self.opt = build_optimizer(param_groups(self.model, s.weight_decay), s.optimizer, 1e-4, s.betas,
                                   s.momentum, s.fused, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
        b, size = cfg.train.batch_size, cfg.model.img_size
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(b, 3, size, size, generator=g).to(device)
        self.noise = masking_noise(list(range(b)), self.model.patch_embed.num_patches, device=device)
        self.batch = b
        self.info = {"batch_size": b, "image_size": size}

    def step(self):
        with _autocast(self.device, self.amp), self._saved_counter() as saved:
            loss, _, _ = self.net(self.images, mask_ratio=self.cfg.model.mask_ratio, noise=self.noise)
        self.scaler.scale(loss).backward()
        return {"loss_mae": float(loss.detach()), "optimizer_ms": self.optimizer_step(),
                "saved_activations_mb": saved.mb}

    def flops(self):
        from fvcore.nn import FlopCountAnalysis

        m = copy.deepcopy(self.model).float().eval()
        fca = FlopCountAnalysis(m, (self.images[:1].float(), self.cfg.model.mask_ratio, self.noise[:1]))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        # per image; training = forward + backward (x3) at this batch
        return {"flops_per_image_g": fca.total() / 1e9}


def _build_det(cfg, num_classes, device):
    from maedet.engine.detection import build_detection_model

    return build_detection_model(cfg, num_classes).to(device)


def _num_classes(cfg) -> int:
    return cfg.model.num_classes or 80


class DetTrainWorkload(Workload):
    def __init__(self, cfg, device, amp):
        from maedet.engine.detection import detection_loss_fn
        from maedet.engine.detection import per_process_batch
        from maedet.engine.optim import build_optimizer, param_groups
        from maedet.models.vit import get_vit_layer_id

        self.cfg, self.device, self.amp = cfg, device, amp
        self.model = _build_det(cfg, _num_classes(cfg), device).train()
        if cfg.train.compile:
            self.model.backbone.net = torch.compile(self.model.backbone.net)
        s = cfg.solver
        groups = param_groups(self.model, s.weight_decay, s.layer_decay, cfg.model.backbone.depth,
                              layer_id_fn=get_vit_layer_id if s.layer_decay != 1.0 else None)
        self.opt = build_optimizer(groups, s.optimizer, 1e-4, s.betas, s.momentum, s.fused, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=(amp == "fp16"))
        self.batch = per_process_batch(cfg.train)
        size = cfg.data.image_size
        images, targets = _synthetic_detection_batch(self.batch, size, _num_classes(cfg))
        self.data = (images, targets, torch.zeros(self.batch, dtype=torch.int64))
        self.loss_fn = detection_loss_fn
        self.info = {"batch_size": self.batch, "image_size": size,
                     "act_checkpoint": bool(cfg.model.backbone.act_checkpoint),
                     "inputs": "synthetic: random uint8 images, 8 box-shaped instances each"}

    def step(self):
        with _autocast(self.device, self.amp), self._saved_counter() as saved:
            losses = self.loss_fn(self.model, self.data, self.device)
        total = sum(losses.values())
        self.scaler.scale(total).backward()
        out = {k: float(v.detach()) for k, v in losses.items()}
        out["optimizer_ms"] = self.optimizer_step()
        out["saved_activations_mb"] = saved.mb
        return out

    def flops(self):
        return _det_flops(self.cfg, self.device, self.cfg.data.image_size)


class DetInferWorkload(Workload):
    def __init__(self, cfg, device, amp, batch: int):
        self.cfg, self.device, self.amp = cfg, device, amp
        self.model = _build_det(cfg, _num_classes(cfg), device).eval()
        if cfg.train.compile:
            self.model.backbone.net = torch.compile(self.model.backbone.net)
        size = cfg.model.max_size
        g = torch.Generator().manual_seed(0)
        self.images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g).float().div(255)
                       .to(device) for _ in range(batch)]
        self.batch = batch
        self.info = {"batch_size": batch, "image_size": size, "box_score_thresh": cfg.model.box_score_thresh,
                     "detections_per_img": cfg.model.detections_per_img,
                     "inputs": "synthetic: random uint8 images"}

    @torch.no_grad()
    def step(self):
        with _autocast(self.device, self.amp):
            out = self.model(self.images)
        n = [int(o["boxes"].shape[0]) for o in out]
        masks = [tuple(o["masks"].shape) for o in out]
        return {"detections": n, "mask_shapes": masks[:1]}

    def flops(self):
        return _det_flops(self.cfg, self.device, self.cfg.model.max_size)


def _det_flops(cfg, device, size: int) -> Dict[str, Any]:
    from fvcore.nn import FlopCountAnalysis

    from omegaconf import OmegaConf

    c = copy.deepcopy(cfg)
    OmegaConf.set_readonly(c, False)
    c.model.backbone.attn_impl = "explicit"
    c.model.backbone.act_checkpoint = False
    c.model.box_score_thresh = 0.0
    model = _build_det(c, _num_classes(c), torch.device("cpu")).eval()
    img = torch.rand(1, 3, size, size)
    out = {}
    for name, mod in (("vit", model.backbone.net), ("backbone_pyramid", model.backbone)):
        fca = FlopCountAnalysis(mod, (img,))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        out[f"flops_{name}_g"] = fca.total() / 1e9

    class _Full(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            o = self.m([x[0]])[0]
            return o["boxes"], o["scores"], o["masks"]

    fca = FlopCountAnalysis(_Full(model), (img,))
    fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    out["flops_full_inference_g"] = fca.total() / 1e9
    out["flops_note"] = ("fvcore: 1 multiply-add = 1 flop; attn_impl=explicit (SDPA is not counted); "
                         f"full model in eval mode at {size}x{size}, {c.model.detections_per_img} detections max")
    return out


def _params(model: torch.nn.Module) -> Dict[str, float]:
    from fvcore.nn import parameter_count

    pc = parameter_count(model)
    out = {"params_total_m": pc[""] / 1e6}
    for key, label in (("backbone.net", "params_vit_m"), ("backbone", "params_backbone_pyramid_m"),
                       ("rpn", "params_rpn_m"), ("roi_heads", "params_roi_heads_m")):
        if key in pc:
            out[label] = pc[key] / 1e6
    return out


# ----------------------------------------------------------------------------- data task
def run_data(cfg, kind: str, args) -> Dict[str, Any]:
    if kind == "pretrain":
        from maedet.data.build import build_pretrain_loader
        from maedet.engine.pretrain import build_pretrain_dataset

        ds = build_pretrain_dataset(cfg.data)
        loader = build_pretrain_loader(ds, batch_size=cfg.train.batch_size, num_workers=args.workers, seed=0)
        desc = f"MAE transform at {cfg.data.input_size}"
    else:
        from maedet.data.build import build_detection_train_loader
        from maedet.data.coco import CocoInstanceDataset
        from maedet.data.transforms import IMAGENET_MEAN, build_lsj_train_transform
        from maedet.engine.detection import per_process_batch, resolve_split

        d = cfg.data
        json_file, images, name = resolve_split(d.train, "train")
        ds = CocoInstanceDataset(json_file, images, transforms=build_lsj_train_transform(
            d.image_size, d.min_scale, d.max_scale, d.hflip, pad_value=[round(255 * m) for m in IMAGENET_MEAN]),
            filter_empty=True, dataset_name=name, strict=d.train.strict)
        loader = build_detection_train_loader(ds, batch_size=per_process_batch(cfg.train),
                                              num_workers=args.workers, seed=0, persistent_workers=False)
        desc = f"{name}: decode + LSJ {d.image_size} (scale {d.min_scale}-{d.max_scale}) + masks + collate"
    paths = (list(ds.paths) if kind == "pretrain"
             else [ds.get_image_info(i)["file_path"] for i in range(len(ds))])
    decode = _decode_rates(paths[:args.decode_images])
    it = iter(loader)
    bsz = None
    for _ in range(args.warmup):
        next(it)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        b = next(it)
        times.append(time.perf_counter() - t0)
        bsz = len(b[0])
    total = sum(times)
    return {"pipeline": desc, "dataset_size": len(ds), "workers": args.workers, "batch_size": bsz,
            "batches_timed": args.iters, "images_per_s": bsz * args.iters / total,
            "s_per_batch_median": _median(times),
            "note": "mean rate over the timed batches after warm-up batches (workers started and prefetching)",
            "decode": decode}


def _decode_rates(paths: Sequence[str]) -> Dict[str, Any]:
    """Decode-only rate (file bytes in memory -> RGB uint8 array / tensor) of each JPEG/PNG
    decoder on ``paths``, one thread, interleaved per image; the pipeline uses OpenCV."""
    import warnings

    import cv2
    import numpy as np
    from PIL import Image
    from torchvision.io import ImageReadMode, decode_image

    blobs = []
    for p in paths:
        with open(p, "rb") as f:
            blobs.append(f.read())
    decoders = {
        "opencv (used)": lambda b: cv2.imdecode(np.frombuffer(b, np.uint8),
                                                cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)[:, :, ::-1],
        "pil": lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")),
        "torchvision.io": lambda b: decode_image(torch.frombuffer(bytearray(b), dtype=torch.uint8),
                                                 mode=ImageReadMode.RGB),
    }
    threads, cv_threads = torch.get_num_threads(), cv2.getNumThreads()
    total = {k: 0.0 for k in decoders}
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
    return {"images": n, "megapixels": pixels / 1e6,
            "images_per_s": {k: n / t for k, t in total.items() if t > 0}}


class _GradProbe(torch.nn.Module):
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


def _ddp_worker(rank: int, world: int, port: int, args, variant: List[str], out_q) -> None:
    import torch.distributed as dist

    from maedet.engine.distributed import wrap_ddp

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(max(1, (args.threads or os.cpu_count() or 1) // world))
        cfg, kind = load_cfg(args.config, list(args.opts) + variant, args.task, args)
        if kind == "pretrain":
            from maedet.engine.pretrain import build_mae_model

            model = build_mae_model(cfg.model)
        else:
            model = _build_det(cfg, _num_classes(cfg), torch.device("cpu"))
        probe = _GradProbe(model.to(device))
        numel = sum(p.numel() for p in probe.params)
        meter = Meter(device)
        rss0 = _rss_bytes()
        ddp = wrap_ddp(probe, device, cfg.train.ddp_grad_compression, cfg.train.ddp_bucket_view)

        def step():
            ddp().backward()
            for q in probe.params:
                q.grad = None

        walls, peaks = [], []
        for r in range(args.warmup + args.iters):
            dist.barrier()
            wall, _, peak, _, _ = meter(step)
            if r >= args.warmup:
                walls.append(wall)
                peaks.append(peak)
        peak_all = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0) / 2**20
        per_rank = [None] * world
        dist.all_gather_object(per_rank, {"wall": walls, "peak": max(peaks), "peak_since_wrap": peak_all})
        if rank == 0:
            comp = cfg.train.ddp_grad_compression
            out_q.put({"variant": " ".join(variant) or "default", "procs": world,
                       "backend": dist.get_backend(), "params_m": numel / 1e6,
                       "ddp_grad_compression": comp, "ddp_bucket_view": bool(cfg.train.ddp_bucket_view),
                       "allreduce_mb_per_iter": numel * (2 if comp != "none" else 4) / 2**20,
                       "iters": args.iters, "warmup": args.warmup,
                       # the slowest rank sets the step time
                       "s_per_iter": max(_median(x["wall"]) for x in per_rank),
                       "s_per_iter_all": [x["wall"] for x in per_rank],
                       "peak_mem_mb": max(x["peak"] for x in per_rank),
                       "peak_mem_since_wrap_mb": max(x["peak_since_wrap"] for x in per_rank),
                       "peak_mem_kind": ("cuda max_memory_allocated per process" if device.type == "cuda" else
                                         "RSS per process: sampled above the start of each run; "
                                         "and ru_maxrss above the RSS before DDP wrapped the model"),
                       "note": "probe loss: every parameter gets a gradient at almost no compute, so the time "
                               "is DDP's bucketing + all-reduce (+ compression hook)"})
    finally:
        dist.destroy_process_group()


def run_ddp(args) -> List[Dict[str, Any]]:
    """One group of --procs fresh processes per variant (so memory is per variant)."""
    import socket

    import torch.multiprocessing as mp

    if args.device == "cuda" and torch.cuda.device_count() < args.procs:
        raise SystemExit(f"error: --procs {args.procs} needs as many GPUs, found {torch.cuda.device_count()}")
    results = []
    for var in _variants(args):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        mp.start_processes(_ddp_worker, args=(args.procs, port, args, var, q), nprocs=args.procs,
                           start_method="spawn", join=True)
        results.append(q.get(timeout=60))
    return results


# ----------------------------------------------------------------------------- main logic
def _parse_ab(specs: Sequence[str]) -> List[Tuple[str, List[str]]]:
    out = []
    for spec in specs:
        if "=" not in spec:
            raise SystemExit(f"error: --compare expects KEY=V1,V2, got {spec!r}")
        key, vals = spec.split("=", 1)
        out.append((key, vals.split(",")))
    return out


def _variants(args) -> List[List[str]]:
    ab = _parse_ab(args.compare)
    if args.task == "train" and args.act_checkpoint_variant and not any(k == "model.backbone.act_checkpoint"
                                                                        for k, _ in ab):
        ab.append(("model.backbone.act_checkpoint", ["false", "true"]))
    if not ab:
        return [[]]
    return [[f"{k}={v}" for (k, _), v in zip(ab, combo)] for combo in itertools.product(*[v for _, v in ab])]


def _make_workloads(args, device, variants) -> List[Tuple[str, Workload]]:
    out = []
    for var in variants:
        if args.task == "infer":
            for b in args.infer_batches:
                cfg, _ = load_cfg(args.config, list(args.opts) + var, args.task, args)
                amp = _amp_mode(args, cfg, device)
                out.append((" ".join(var + [f"batch={b}"]), DetInferWorkload(cfg, device, amp, b)))
            continue
        cfg, kind = load_cfg(args.config, list(args.opts) + var, args.task, args)
        amp = _amp_mode(args, cfg, device)
        w = PretrainWorkload(cfg, device, amp) if kind == "pretrain" else DetTrainWorkload(cfg, device, amp)
        out.append((" ".join(var) or "default", w))
    return out


def measure(args, device, variants) -> List[Dict[str, Any]]:
    workloads = _make_workloads(args, device, variants)
    meter = Meter(device)
    rec = {name: {"wall": [], "cpu": [], "peak": [], "abs": [], "opt": [], "last": None} for name, _ in workloads}
    for r in range(args.warmup + args.iters):
        for name, w in workloads:
            wall, cpu, peak, absolute, res = meter(w.step)
            opt_ms = res.pop("optimizer_ms", None)
            saved_mb = res.pop("saved_activations_mb", None)
            if saved_mb is not None:
                rec[name]["saved"] = saved_mb  # first run only (the same graph every step)
            if r >= args.warmup:
                if opt_ms is not None:
                    rec[name]["opt"].append(opt_ms)  # warm-up runs allocate lasting state (optimizer moments): not counted
                rec[name]["wall"].append(wall)
                rec[name]["cpu"].append(cpu)
                rec[name]["peak"].append(peak)
                rec[name]["abs"].append(absolute)
            rec[name]["last"] = res
            if args.verbose:
                print(f"  [{'warm-up' if r < args.warmup else 'timed'} {r}] {name}: {wall:.3f} s, "
                      f"cpu {cpu:.2f} s, peak +{peak:.0f} MB", file=sys.stderr, flush=True)
    results = []
    for name, w in workloads:
        r = rec[name]
        t = _median(r["wall"])
        n = w.batch
        entry = {"variant": name, **w.info, "iters": len(r["wall"]), "warmup": args.warmup,
                 "s_per_iter": t, "s_per_iter_all": r["wall"], "cpu_s_per_iter": _median(r["cpu"]),
                 "peak_mem_mb": max(r["peak"]), "peak_mem_abs_mb": max(r["abs"]),
                 "peak_mem_kind": ("cuda max_memory_allocated" if device.type == "cuda"
                                   else "sampled RSS above the RSS before the run")}
        if r["opt"]:
            entry["optimizer_ms"] = _median(r["opt"])  # part of s_per_iter
        if "saved" in r:
            entry["saved_activations_mb"] = r["saved"]
        if args.task == "pretrain":
            entry.update(ms_per_step=1000 * t, images_per_s=n / t, loss=r["last"])
        elif args.task == "train":
            entry.update(images_per_s=n / t, losses=r["last"])
        else:
            entry.update(s_per_image=t / n, images_per_s=n / t, detections_per_image=r["last"]["detections"],
                         mask_shape=r["last"]["mask_shapes"])
        if args.flops or args.params:
            entry.update(_params(w.model))
        results.append(entry)
    if args.flops:
        fl = workloads[0][1].flops()
        for e in results:
            e.update(fl)
            if device.type == "cuda" and args.peak_tflops and e["s_per_iter"]:
                per = fl.get("flops_full_inference_g") or fl.get("flops_per_image_g") * 1
                mult = 3 if args.task in ("train", "pretrain") else 1
                achieved = 2 * per * 1e9 * mult * e["batch_size"] / e["s_per_iter"]
                e["mfu"] = achieved / (args.peak_tflops * 1e12)
                e["mfu_note"] = (f"2 x fvcore flops x {mult} x batch / time / {args.peak_tflops} TFLOP/s "
                                 "(training: RoI-head flops at inference proposal counts, an estimate)")
    return results


def _run_isolated(args, variants) -> List[Dict[str, Any]]:
    """One fresh subprocess per variant; adds ru_maxrss-based peak memory."""
    results = []
    for var in variants:
        cmd = [sys.executable, os.path.abspath(__file__), "--_child"] + _child_argv(args) + list(args.opts) + var
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stderr)
            raise SystemExit(f"error: variant {var} failed (exit {p.returncode})")
        for e in json.loads(p.stdout.strip().splitlines()[-1]):
            e["variant"] = " ".join(var + ([e["variant"]] if e["variant"] != "default" else [])) or "default"
            results.append(e)
    return results


def _child_argv(args) -> List[str]:
    a = ["--config", args.config, "--task", args.task, "--device", args.device, "--iters", str(args.iters),
         "--warmup", str(args.warmup), "--workers", str(args.workers), "--decode-images", str(args.decode_images),
         "--infer-batches", ",".join(str(b) for b in args.infer_batches), "--detections", str(args.detections)]
    for flag, val in (("--amp", args.amp), ("--batch-size", args.batch_size), ("--image-size", args.image_size),
                      ("--threads", args.threads), ("--peak-tflops", args.peak_tflops)):
        if val:
            a += [flag, str(val)]
    for flag, on in (("--flops", args.flops), ("--params", args.params), ("--keep-thresholds", args.keep_thresholds),
                     ("--verbose", args.verbose)):
        if on:
            a.append(flag)
    if not args.act_checkpoint_variant:
        a.append("--no-act-checkpoint-variant")
    return a


def _print_rows(cols: List[str], rows: List[List[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def _print_table(results: List[Dict[str, Any]], task: str, meta: Dict[str, Any]) -> None:
    print(f"# task={task} device={meta['device']} threads={meta['threads']} amp={meta['amp']} "
          f"torch={meta['torch']} load={meta['loadavg']}")
    if task == "data":
        r = results[0]
        print(f"{r['pipeline']}\nworkers={r['workers']} batch={r['batch_size']}: {r['images_per_s']:.2f} images/s "
              f"({r['batches_timed']} batches)")
        d = r["decode"]
        if d["images"]:
            rates = ", ".join(f"{k} {v:.1f}" for k, v in d["images_per_s"].items())
            print(f"decode only, 1 thread, {d['images']} images ({d['megapixels']:.1f} MPix): {rates} images/s")
        return
    if task == "ddp":
        base = results[0]["s_per_iter"]
        cols = ["variant", "ms/iter", "ratio", "all-reduce MB", "peak MB (run)", "peak MB (since DDP wrap)"]
        rows = [[r["variant"], f"{1000 * r['s_per_iter']:.0f}", f"{r['s_per_iter'] / base:.3f}",
                 f"{r['allreduce_mb_per_iter']:.0f}", f"{r['peak_mem_mb']:.0f}", f"{r['peak_mem_since_wrap_mb']:.0f}"]
                for r in results]
        print(f"{results[0]['procs']} processes ({results[0]['backend']}), {results[0]['params_m']:.2f} M parameters")
        _print_rows(cols, rows)
        return
    base = results[0]["s_per_iter"]
    cols = ["variant", "s/iter", "cpu s", "ratio", "img/s", "peak MB", "extra"]
    rows = []
    for r in results:
        extra = ""
        if task == "pretrain":
            extra = f"{r['ms_per_step']:.0f} ms/step"
        elif task == "train":
            extra = " ".join(f"{k}={v:.3f}" for k, v in r["losses"].items())
        else:
            extra = f"{r['s_per_image']:.3f} s/image, detections {r['detections_per_image']}"
        if "optimizer_ms" in r:
            extra += f", optimizer {r['optimizer_ms']:.0f} ms"
        if "saved_activations_mb" in r:
            extra += f", saved for backward {r['saved_activations_mb']:.0f} MB"
        if "peak_mem_isolated_mb" in r:
            extra += f", ru_maxrss +{r['peak_mem_isolated_mb']:.0f} MB"
        rows.append([r["variant"], f"{r['s_per_iter']:.3f}", f"{r['cpu_s_per_iter']:.2f}",
                     f"{r['s_per_iter'] / base:.3f}", f"{r['images_per_s']:.3f}", f"{r['peak_mem_mb']:.0f}", extra])
    _print_rows(cols, rows)
    r0 = results[0]
    for k in sorted(r0):
        if k.startswith(("params_", "flops_", "mfu")):
            print(f"{k}: {r0[k]:.2f}" if isinstance(r0[k], float) else f"{k}: {r0[k]}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--iters", type=int, default=5, help="timed runs per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default=None,
                   help="default: the config's train.amp (auto: bf16 on GPUs that support it, fp16 on older "
                        "GPUs, off on CPU)")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=0, help="pretrain/train/data batch (default: the config's)")
    p.add_argument("--image-size", type=int, default=0, help="input side (default: the config's)")
    p.add_argument("--infer-batches", default="1,2", help="infer: batch sizes to measure (default 1,2)")
    p.add_argument("--detections", type=int, default=100, help="infer: detections_per_img forced (score thresh 0)")
    p.add_argument("--keep-thresholds", action="store_true", help="infer: keep the config's score thresh / max dets")
    p.add_argument("--workers", type=int, default=2, help="data: DataLoader workers")
    p.add_argument("--decode-images", type=int, default=50,
                   help="data: images for the decode-only comparison of OpenCV, PIL and torchvision.io (0: skip)")
    p.add_argument("--procs", type=int, default=2, help="ddp: processes (GPUs with --device cuda)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: train.threads or torch's)")
    p.add_argument("--compare", "--ab", action="append", default=[], metavar="KEY=V1,V2",
                   help="measure each value in one process, interleaved (repeatable: product of values)")
    p.add_argument("--no-act-checkpoint-variant", dest="act_checkpoint_variant", action="store_false",
                   help="train: skip the automatic act_checkpoint=false,true comparison")
    p.add_argument("--flops", action="store_true", help="fvcore FLOPs and parameters")
    p.add_argument("--params", action="store_true", help="fvcore parameter counts")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="CUDA: device peak TFLOP/s for MFU")
    p.add_argument("--isolate", action="store_true", help="one fresh subprocess per variant (ru_maxrss memory)")
    p.add_argument("--verbose", action="store_true", help="print every run")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides")
    a = p.parse_intermixed_args(argv)
    a.infer_batches = [int(x) for x in str(a.infer_batches).split(",") if x]
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    from maedet.errors import MaedetError

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    probe_cfg, kind = load_cfg(args.config, args.opts, args.task, args)
    threads = args.threads or probe_cfg.train.threads
    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    meta = {"task": args.task, "config": args.config, "overrides": list(args.opts), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(), "amp": _amp_mode(args, probe_cfg, device),
            "torch": torch.__version__, "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "cpu_count": os.cpu_count()}
    try:
        if args.task == "data":
            results = [run_data(probe_cfg, kind, args)]
        elif args.task == "ddp":
            results = run_ddp(args)
        elif args.isolate and not args._child:
            results = _run_isolated(args, _variants(args))
        else:
            rss0 = _rss_bytes()
            results = measure(args, device, [[]] if args._child else _variants(args))
            if args._child and device.type == "cpu":
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                for r in results:
                    r["peak_mem_isolated_mb"] = (peak - rss0) / 2**20
                    r["peak_mem_isolated_note"] = "ru_maxrss minus RSS before the model was built (this variant alone)"
    except MaedetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args._child:
        print(json.dumps(results))
        return 0
    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    _print_table(results, args.task, meta)
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
