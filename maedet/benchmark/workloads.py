"""What the benchmark runs: the library's own training step and inference, on fixed synthetic inputs.

A workload builds its model, optimizer and trainer through :mod:`maedet.builders`
exactly as a run does, and its :meth:`Workload.step` is one
:meth:`maedet.engine.trainer.Trainer.train_step` (forward under autocast,
backward, optimizer step) or one :class:`maedet.inference.Predictor` call (resize
skipped: the images are already at the test size; detections, masks pasted).
"""

from __future__ import annotations

import copy
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
from omegaconf import OmegaConf

from maedet import kernels
from maedet.builders.model import build_detection_model, build_mae_model
from maedet.builders.trainer import build_trainer, per_process_batch
from maedet.engine.steps import detection_loss, mae_loss_fn
from maedet.inference.predictor import Predictor
from maedet.models.mae import masking_noise
from maedet.utils.profiling import SavedActivations

__all__ = [
    "Workload",
    "PretrainWorkload",
    "DetTrainWorkload",
    "DetInferWorkload",
    "synthetic_detection_batch",
    "detection_flops",
    "parameter_counts",
    "num_classes",
]


def num_classes(cfg: Any) -> int:
    return cfg.model.num_classes or 80


def synthetic_detection_batch(batch: int, size: int, classes: int, seed: int = 0, instances: int = 8):
    """uint8 images (3, S, S) and targets with ``instances`` box-shaped instances each (reproducible)."""
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g))
        n = instances
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        wh = (torch.rand(n, 2, generator=g) * 0.25 + 0.05) * size
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1).floor()
        masks = torch.zeros(n, size, size, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0 : y1 + 1, x0 : x1 + 1] = 1
        labels = torch.randint(1, classes + 1, (n,), generator=g)
        targets.append({"boxes": boxes, "labels": labels, "masks": masks})
    return images, targets


class _Sized:
    """A stand-in dataset: only its length is read (for epoch-based schedules)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class Workload:
    """One variant: a built model and its step function."""

    name: str
    info: Dict[str, Any]
    batch: int
    model: torch.nn.Module

    def step(self) -> Dict[str, Any]:
        raise NotImplementedError


class _TrainWorkload(Workload):
    """One trainer iteration on a fixed batch; activation memory counted on the first step."""

    def _setup(self, cfg: Any, model: torch.nn.Module, device: torch.device, collate: str, loss_fn, batch) -> None:
        self.cfg, self.device, self.model, self.data = cfg, device, model, batch
        self.trainer = build_trainer(cfg, model, _Sized(10_000), collate, loss_fn, (), device)
        self.saved: Optional[SavedActivations] = SavedActivations(model, enabled=not cfg.train.compile)
        inner = self.trainer.loss_fn

        def counted(m, b, d):
            if self.saved is None:
                return inner(m, b, d)
            with self.saved:
                return inner(m, b, d)

        self.trainer.loss_fn = counted
        # the optimizer's own step time, through torch's public optimizer hooks
        self._opt_t0 = self.optimizer_ms = 0.0
        self.trainer.optimizer.register_step_pre_hook(lambda *_: self._clock("start"))
        self.trainer.optimizer.register_step_post_hook(lambda *_: self._clock("stop"))

    def _clock(self, what: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if what == "start":
            self._opt_t0 = time.perf_counter()
        else:
            self.optimizer_ms = 1000 * (time.perf_counter() - self._opt_t0)

    def step(self) -> Dict[str, Any]:
        saved = self.saved
        losses = self.trainer.train_step(lambda: self.data)
        out: Dict[str, Any] = {"losses": losses, "optimizer_ms": self.optimizer_ms}
        if saved is not None:
            out["saved_activations_mb"] = saved.mb
            self.saved = None  # the graph is the same every step: the timed steps run without hooks
        return out


class PretrainWorkload(_TrainWorkload):
    def __init__(self, cfg: Any, device: torch.device):
        model = build_mae_model(cfg.model).to(device).train()
        if cfg.train.compile:
            model = torch.compile(model)
        b, size = per_process_batch(cfg.train), cfg.model.img_size
        g = torch.Generator().manual_seed(0)
        images = torch.randn(b, 3, size, size, generator=g)
        self._setup(
            cfg,
            model,
            device,
            "pretrain",
            mae_loss_fn(cfg.model.mask_ratio),
            (images, torch.arange(b, dtype=torch.int64)),
        )
        self.batch = b
        self.info = {"batch_size": b, "image_size": size, "amp": self.trainer.amp.mode}

    def flops(self) -> Dict[str, Any]:
        from fvcore.nn import FlopCountAnalysis

        m = copy.deepcopy(build_mae_model(self.cfg.model)).float().eval()
        images = self.data[0][:1].float()
        noise = masking_noise([0], m.num_patches)
        fca = FlopCountAnalysis(m, (images, self.cfg.model.mask_ratio, noise))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return {"flops_per_image_g": fca.total() / 1e9}


class DetTrainWorkload(_TrainWorkload):
    def __init__(self, cfg: Any, device: torch.device):
        model = build_detection_model(cfg.model, num_classes(cfg), load_pretrained=False).to(device).train()
        if cfg.train.compile:
            model.backbone.net = torch.compile(model.backbone.net)
        b = per_process_batch(cfg.train)
        size = cfg.data.train.pipeline.image_size
        images, targets = synthetic_detection_batch(b, size, num_classes(cfg))
        self._setup(cfg, model, device, "detection", detection_loss, (images, targets, torch.zeros(b)))
        self.batch = b
        self.info = {
            "batch_size": b,
            "image_size": size,
            "amp": self.trainer.amp.mode,
            "act_checkpoint": bool(cfg.model.backbone.get("act_checkpoint", False)),
            "inputs": "synthetic: random uint8 images, 8 box-shaped instances each",
        }

    def flops(self) -> Dict[str, Any]:
        return detection_flops(self.cfg, self.cfg.data.train.pipeline.image_size)


class DetInferWorkload(Workload):
    """The Predictor on a batch of test-size images: detections and pasted masks."""

    def __init__(self, cfg: Any, device: torch.device, amp: str, batch: int):
        self.cfg, self.device = cfg, device
        self.model = build_detection_model(cfg.model, num_classes(cfg), load_pretrained=False).to(device).eval()
        if cfg.train.compile:
            self.model.backbone.net = torch.compile(self.model.backbone.net)
        self.predictor = Predictor(self.model, device=device, amp=amp)
        size = cfg.data.test.pipeline.max_size
        g = torch.Generator().manual_seed(0)
        self.images = [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g) for _ in range(batch)]
        self.batch = batch
        heads = cfg.model.roi_heads
        self.info = {
            "batch_size": batch,
            "image_size": size,
            "amp": amp,
            "score_thresh": heads.score_thresh,
            "detections_per_img": heads.detections_per_img,
            "inputs": "synthetic: random uint8 images",
        }

    def step(self) -> Dict[str, Any]:
        out = self.predictor(self.images, return_rle=False)
        return {"detections": [len(o["scores"]) for o in out], "mask_shapes": [tuple(out[0]["masks"].shape)]}

    def flops(self) -> Dict[str, Any]:
        return detection_flops(self.cfg, self.cfg.data.test.pipeline.max_size)


def detection_flops(cfg: Any, size: int) -> Dict[str, Any]:
    """fvcore FLOPs of the ViT, the ViT + pyramid, and the whole inference at ``size`` (attention
    written out, since fvcore does not count ``scaled_dot_product_attention``)."""
    from fvcore.nn import FlopCountAnalysis

    model_cfg = OmegaConf.create(OmegaConf.to_container(cfg.model, resolve=True))
    model_cfg.backbone.act_checkpoint = False
    model_cfg.roi_heads.score_thresh = 0.0
    model = build_detection_model(model_cfg, num_classes(cfg), load_pretrained=False).eval()
    img = torch.rand(1, 3, size, size) * 255
    batch, _ = model.preprocess([img[0]])
    out = {}
    with kernels.fast(False):  # the references: attention written out, plain layouts
        for name, mod in (("vit", model.backbone.net), ("backbone_pyramid", model.backbone)):
            fca = FlopCountAnalysis(mod, (batch,))
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
            out[f"flops_{name}_g"] = fca.total() / 1e9

    class _Full(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            o = self.m([x[0]])[0]
            return o["boxes"], o["scores"], o["mask_probs"]

    with kernels.fast(False):
        fca = FlopCountAnalysis(_Full(model), (img,))
        fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        out["flops_full_inference_g"] = fca.total() / 1e9
    out["flops_note"] = (
        "fvcore: 1 multiply-add = 1 flop; reference kernels (attention written out: SDPA is not counted); full model "
        f"in eval mode at {size}x{size}, {model_cfg.roi_heads.detections_per_img} detections max"
    )
    return out


def parameter_counts(model: torch.nn.Module) -> Dict[str, float]:
    """Millions of parameters: total and per part (fvcore ``parameter_count``)."""
    from fvcore.nn import parameter_count

    pc = parameter_count(model)
    out = {"params_total_m": pc[""] / 1e6}
    for key, label in (
        ("backbone.net", "params_vit_m"),
        ("backbone", "params_backbone_pyramid_m"),
        ("rpn", "params_rpn_m"),
        ("roi_heads", "params_roi_heads_m"),
    ):
        if key in pc:
            out[label] = pc[key] / 1e6
    return out


def make_workloads(
    task: str,
    cfgs: Sequence[Any],
    names: Sequence[str],
    device: torch.device,
    amp: Sequence[str],
    infer_batches: Sequence[int],
) -> List[tuple]:
    """(name, workload) for every variant config."""
    out = []
    for cfg, name, a in zip(cfgs, names, amp):
        if task == "infer":
            out += [
                (" ".join(filter(None, [name, f"batch={b}"])), DetInferWorkload(cfg, device, a, b))
                for b in infer_batches
            ]
        elif task == "pretrain":
            out.append((name or "default", PretrainWorkload(cfg, device)))
        else:
            out.append((name or "default", DetTrainWorkload(cfg, device)))
    return out
