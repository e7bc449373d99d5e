"""maedet against detectron2's ViTDet: the same detector, weights and inputs, timed in one process.

``tools/benchmark.py --task reference`` builds the config's detector in maedet and
its twin in detectron2 (``common/models/mask_rcnn_vitdet.py`` from detectron2's
model zoo with the config's sizes written in), copies maedet's random weights into
detectron2 through the checkpoint converter (the twin must load them with no key
missing or left over), checks that both compute the same feature pyramid, and then
interleaves their runs, so that load changes on the machine hit both alike:

- training step: forward (losses) under the same autocast, backward, AdamW step,
  on the same uint8 images and instances (detectron2 gets them as ``Instances``
  with bitmasks, the format of its LSJ data mapper);
- inference: each framework's full path from a test-size image to detections and
  masks pasted at image resolution (detectron2 ``model.eval()([{"image", "height",
  "width"}])``; maedet :class:`~maedet.inference.Predictor`).

With ``flops=True``, each framework's matrix products and convolutions are counted
for one run of each task (:func:`matmul_flops`) and set against the rate of one
large matrix product on this machine (:func:`gemm_rate`): the time the step would
take if all its arithmetic ran at that rate and nothing else cost anything. One
more run of each is profiled (:func:`product_time`) to split its time between the
matrix products and convolutions and everything else, which gives the rate the
products actually reach.

detectron2 is an optional, benchmark-only dependency; without it :func:`compare`
raises :class:`ReferenceUnavailable` with the reason and how to get it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from maedet.benchmark.arithmetic import gemm_rate, matmul_flops, product_time
from maedet.benchmark.workloads import num_classes, synthetic_detection_batch
from maedet.builders.model import build_detection_model
from maedet.checkpoint.formats.detectron2 import maedet_det_to_d2
from maedet.checkpoint.report import Report
from maedet.inference.predictor import Predictor
from maedet.utils.amp import amp_dtype
from maedet.utils.errors import MaedetError
from maedet.utils.profiling import PeakRSS, median, rss_bytes
from maedet.utils.startup import HUGE_PAGES_ENV

__all__ = [
    "ReferenceUnavailable",
    "detectron2_status",
    "build_detectron2_twin",
    "compare",
    "peak_memory",
    "format_comparison",
]

D2_MODEL_ZOO_CONFIG = "common/models/mask_rcnn_vitdet.py"
FRAMEWORKS = ("detectron2", "maedet")
TASKS = ("infer", "train")  # the order of the phases in compare()


class ReferenceUnavailable(MaedetError):
    """detectron2 cannot be imported (or cannot mirror the config)."""


def detectron2_status() -> Optional[str]:
    """None when detectron2 (with its compiled ops and ViTDet) imports; else why not."""
    try:
        import detectron2  # noqa: F401
        from detectron2 import _C  # noqa: F401
        from detectron2.modeling import SimpleFeaturePyramid, ViT  # noqa: F401
    except Exception as e:  # ImportError, or a broken build raising something else
        return (
            f"detectron2 is not importable in {sys.executable} ({type(e).__name__}: {e}). The reference "
            "mode needs detectron2 built from source with ViTDet (it is not a maedet dependency): "
            "git clone https://github.com/facebookresearch/detectron2 && "
            "pip install --no-build-isolation -e detectron2, in an environment that also has maedet "
            "installed (docs/BENCHMARKS.md, 'Against detectron2')"
        )
    return None


# ----------------------------------------------------------------------------- the twin
def build_detectron2_twin(cfg: Any, classes: int) -> nn.Module:
    """detectron2's ViTDet Mask R-CNN with the sizes of maedet config ``cfg``."""
    from detectron2 import model_zoo
    from detectron2.config import instantiate

    m = cfg.model
    b, neck, rpn, heads = m.backbone, m.neck, m.rpn, m.roi_heads
    if b.name != "vit" or neck.name != "simple_feature_pyramid" or rpn.name != "rpn" or heads.name != "standard":
        raise ReferenceUnavailable(
            "the detectron2 reference mirrors ViT + simple_feature_pyramid + rpn + standard RoI heads; "
            f"this config has {b.name} + {neck.name} + {rpn.name} + {heads.name}"
        )
    d2 = model_zoo.get_config(D2_MODEL_ZOO_CONFIG).model
    net = d2.backbone.net
    net.img_size, net.patch_size = b.img_size, b.patch_size
    net.embed_dim, net.depth, net.num_heads = b.embed_dim, b.depth, b.num_heads
    net.mlp_ratio, net.qkv_bias, net.drop_path_rate = b.mlp_ratio, b.qkv_bias, b.drop_path_rate
    net.window_size, net.use_rel_pos, net.use_abs_pos = b.window_size, b.use_rel_pos, b.use_abs_pos
    net.rel_pos_zero_init = b.rel_pos_zero_init
    net.pretrain_img_size, net.pretrain_use_cls_token = b.pretrain_img_size, b.pretrain_use_cls_token
    net.window_block_indexes = [i for i in range(b.depth) if i not in set(b.global_blocks)]
    net.use_act_checkpoint = bool(b.act_checkpoint)
    d2.backbone.out_channels = neck.out_channels
    d2.backbone.scale_factors = tuple(neck.scale_factors)
    d2.backbone.square_pad = neck.square_pad
    if not neck.top_block:
        d2.backbone.top_block = None
    pg = d2.proposal_generator
    pg.in_features = list(rpn.in_features)
    pg.head.in_channels = neck.out_channels
    pg.head.conv_dims = [-1] * rpn.conv_depth
    pg.anchor_generator.sizes = [[s] for s in rpn.anchor_sizes]
    pg.anchor_generator.aspect_ratios = list(rpn.aspect_ratios)
    pg.anchor_generator.offset = rpn.anchor_offset
    pg.anchor_matcher.thresholds = [rpn.bg_iou_thresh, rpn.fg_iou_thresh]
    pg.batch_size_per_image, pg.positive_fraction = rpn.batch_size_per_image, rpn.positive_fraction
    pg.pre_nms_topk = (rpn.pre_nms_topk_train, rpn.pre_nms_topk_test)
    pg.post_nms_topk = (rpn.post_nms_topk_train, rpn.post_nms_topk_test)
    pg.nms_thresh, pg.smooth_l1_beta = rpn.nms_thresh, rpn.smooth_l1_beta
    rh = d2.roi_heads
    rh.num_classes = classes
    rh.batch_size_per_image, rh.positive_fraction = heads.batch_size_per_image, heads.positive_fraction
    rh.proposal_matcher.thresholds = [heads.fg_iou_thresh]
    rh.box_in_features = rh.mask_in_features = list(heads.in_features)
    for pooler, res in ((rh.box_pooler, heads.box_pooler_resolution), (rh.mask_pooler, heads.mask_pooler_resolution)):
        pooler.output_size, pooler.sampling_ratio = res, heads.pooler_sampling_ratio
    rh.box_head.input_shape.channels = rh.mask_head.input_shape.channels = neck.out_channels
    rh.box_head.conv_dims, rh.box_head.fc_dims = list(heads.box_head_conv_dims), list(heads.box_head_fc_dims)
    rh.box_head.conv_norm = rh.mask_head.conv_norm = heads.conv_norm
    rh.box_predictor.input_shape.channels = (heads.box_head_fc_dims or heads.box_head_conv_dims)[-1]
    rh.box_predictor.box2box_transform.weights = tuple(heads.bbox_reg_weights)
    rh.box_predictor.test_score_thresh, rh.box_predictor.test_nms_thresh = heads.score_thresh, heads.nms_thresh
    rh.box_predictor.test_topk_per_image = heads.detections_per_img
    rh.box_predictor.smooth_l1_beta = heads.smooth_l1_beta
    # detectron2's last mask conv dim is the deconvolution's width (maedet: the last conv's).
    mdims = list(heads.mask_head_conv_dims)
    rh.mask_head.conv_dims = mdims + mdims[-1:]
    d2.pixel_mean, d2.pixel_std = list(m.meta_arch.pixel_mean), list(m.meta_arch.pixel_std)
    if not heads.mask_on:
        rh.mask_in_features = rh.mask_pooler = rh.mask_head = None
    return instantiate(d2)


def copy_weights_to_twin(model: nn.Module, twin: nn.Module) -> None:
    """maedet's weights into the detectron2 twin; every key must find its place."""
    report = Report(source="<maedet model>", action="maedet-det -> d2-vitdet")
    state, _ = maedet_det_to_d2(model.state_dict(), report)
    missing, unexpected = twin.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("pixel_mean", "pixel_std"))]
    if missing or unexpected or report.unexpected:
        raise ReferenceUnavailable(
            "the detectron2 twin does not have maedet's layout: "
            f"missing {missing[:5]}, unexpected {list(unexpected)[:5] + report.unexpected[:5]}"
        )


@torch.no_grad()
def pyramid_difference(model: nn.Module, twin: nn.Module, image: torch.Tensor) -> float:
    """Largest |difference| between the two feature pyramids on ``image`` (eval mode)."""
    model.eval(), twin.eval()
    ours = model.backbone(model.preprocess([image])[0])
    theirs = twin.backbone(twin.preprocess_image([{"image": image}]).tensor)
    if sorted(ours) != sorted(theirs):
        raise ReferenceUnavailable(f"pyramid levels differ: {sorted(ours)} vs {sorted(theirs)}")
    return max(float((ours[k] - theirs[k]).abs().max()) for k in ours)


# ----------------------------------------------------------------------------- the runs
class _Side:
    """One framework: its model, optimizer, inputs and step functions."""

    def __init__(self, name: str, model: nn.Module, train_inputs, infer_fn, dtype, context=None):
        self.name, self.model, self.train_inputs, self.infer_fn = name, model, train_inputs, infer_fn
        self.context = context or contextlib.nullcontext  # e.g. detectron2's EventStorage (its losses log to it)
        self.dtype = dtype
        self.opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, weight_decay=0.1)

    def _autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=self.dtype)

    def train_step(self) -> Dict[str, float]:
        self.model.train()
        with self.context(), self._autocast():
            losses = self.model(*self.train_inputs())
        sum(losses.values()).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in losses.items()}

    @torch.no_grad()
    def infer_step(self) -> int:
        self.model.eval()
        with self._autocast():
            return self.infer_fn()


def _d2_train_inputs(images, targets):
    from detectron2.structures import BitMasks, Boxes, Instances, PolygonMasks

    batch = []
    for im, t in zip(images, targets):
        inst = Instances(tuple(im.shape[-2:]))
        inst.gt_boxes = Boxes(t["boxes"].float())
        inst.gt_classes = t["labels"] - 1  # detectron2: 0..K-1 (maedet: 1..K, 0 = background)
        masks = t["masks"]
        polygons = getattr(masks, "polygons", None)  # maedet.structures.PolygonMasks
        inst.gt_masks = PolygonMasks(polygons) if polygons is not None else BitMasks(masks.bool())
        batch.append({"image": im, "instances": inst})
    return batch


def _build_sides(
    cfg: Any, amp: str, instances: int, frameworks: Sequence[str] = FRAMEWORKS
) -> Tuple[List[_Side], Dict[str, Any]]:
    """The two frameworks on the same weights and inputs (only those in ``frameworks``)."""
    from detectron2.utils.events import EventStorage

    classes = num_classes(cfg)
    torch.manual_seed(0)
    model = build_detection_model(cfg.model, classes, load_pretrained=False)
    twin = build_detectron2_twin(cfg, classes)
    copy_weights_to_twin(model, twin)
    size = cfg.data.train.pipeline.image_size
    images, targets = synthetic_detection_batch(1, size, classes, instances=instances)
    info = {"image_size": size, "instances": instances, "amp": amp}
    if "detectron2" in frameworks and "maedet" in frameworks:
        info["pyramid_max_abs_diff"] = pyramid_difference(model, twin, images[0])
    test_size = cfg.data.test.pipeline.max_size
    info["test_image_size"] = test_size
    g = torch.Generator().manual_seed(1)
    test_image = torch.randint(0, 256, (3, test_size, test_size), dtype=torch.uint8, generator=g)
    predictor = Predictor(model, device="cpu", amp="off")  # autocast comes from the step (same for both)

    def maedet_infer() -> int:
        return len(predictor([test_image])[0]["scores"])

    def d2_infer() -> int:
        return len(twin([{"image": test_image, "height": test_size, "width": test_size}])[0]["instances"])

    dtype = amp_dtype(amp, torch.device("cpu"))
    sides = []
    if "detectron2" in frameworks:
        sides.append(
            _Side(
                "detectron2",
                twin,
                lambda: (_d2_train_inputs(images, targets),),
                d2_infer,
                dtype,
                context=lambda: EventStorage(0),
            )
        )
    else:
        del twin
    if "maedet" in frameworks:
        sides.append(_Side("maedet", model, lambda: (images, targets), maedet_infer, dtype))
    else:
        del model, predictor
    gc.collect()
    return sides, info


def _check_available(device: torch.device) -> None:
    reason = detectron2_status()
    if reason:
        raise ReferenceUnavailable(reason)
    if device.type != "cpu":
        raise ReferenceUnavailable("the reference mode runs on CPU (its clock reads are unsynchronized)")


def compare(
    cfg: Any,
    device: torch.device,
    iters: int,
    warmup: int,
    amp: str = "off",
    instances: int = 2,
    verbose: bool = False,
    flops: bool = False,
) -> List[Dict[str, Any]]:
    """Interleaved training-step and inference timings of maedet and its detectron2 twin.

    Inference runs first, all its rounds, then training: each task is timed in the
    state a process doing only that task has. A training step leaves the C heap
    grown (tensors freed from it stay mapped), and the inference after it then takes
    fewer page faults than in a process that only infers (maedet: about 1 million
    faults per inference in a fresh process, none after a training step), which
    moved the inference ratio by up to 0.25. Within a phase, each round runs
    detectron2 then maedet.

    Returns one result dict per (framework, task) with the median wall time, the
    median of the minor page faults per run (``page_faults``: the process's
    ``ru_minflt`` across the run). Memory is measured apart, one framework per fresh process
    (:func:`peak_memory`): in one process, memory the first framework freed stays
    mapped and the second reuses it unseen.

    With ``flops``, after the timed runs, one more run of each (framework, task)
    is counted (:func:`matmul_flops`; ``flops``), one more is profiled
    (:func:`product_time`: ``profiled_s``, ``products_s``, ``rest_s``), and this
    machine's GEMM rate is measured (:func:`gemm_rate`; ``gemm_flop_s``).
    """
    _check_available(device)
    sides, info = _build_sides(cfg, amp, instances)
    rec = {(s.name, task): {"wall": [], "faults": [], "out": None} for s in sides for task in TASKS}
    try:
        for task in TASKS:
            for r in range(warmup + iters):
                for s in sides:
                    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                    t0 = time.perf_counter()
                    out = s.train_step() if task == "train" else s.infer_step()
                    wall = time.perf_counter() - t0
                    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
                    if verbose:
                        kind = "warm-up" if r < warmup else "timed"
                        print(
                            f"  [{kind} {r}] {s.name} {task}: {wall:.2f} s, {faults} page faults",
                            file=sys.stderr,
                            flush=True,
                        )
                    if r >= warmup:
                        rec[(s.name, task)]["wall"].append(wall)
                        rec[(s.name, task)]["faults"].append(faults)
                    rec[(s.name, task)]["out"] = out
        counted: Dict[Tuple[str, str], float] = {}
        split: Dict[Tuple[str, str], Dict[str, float]] = {}
        if flops:
            for s in sides:
                for task in TASKS:
                    run = s.train_step if task == "train" else s.infer_step
                    counted[(s.name, task)] = matmul_flops(run)
                    split[(s.name, task)] = product_time(run)
            rate = gemm_rate()
    finally:
        gc.collect()
    results = []
    for s in sides:
        for task in ("train", "infer"):
            rr = rec[(s.name, task)]
            entry = {
                "framework": s.name,
                "task": task,
                **info,
                "s_per_iter": median(rr["wall"]),
                "s_per_iter_all": rr["wall"],
                "page_faults": int(median(rr["faults"])),
                "huge_pages": os.environ.get(HUGE_PAGES_ENV, "unset"),
                "threads": torch.get_num_threads(),
            }
            entry["losses" if task == "train" else "detections"] = rr["out"]
            if counted:
                entry["flops"], entry["gemm_flop_s"] = counted[(s.name, task)], rate
                entry.update(split[(s.name, task)])
            results.append(entry)
    return results


def peak_memory(cfg: Any, framework: str, task: str, amp: str = "off", instances: int = 2, steps: int = 2) -> float:
    """MB that ``steps`` runs of ``task`` add to this process's peak RSS (``ru_maxrss``).

    Meant for a fresh process that runs nothing else: the model is built and its
    weights set first, then the RSS is read, then the steps run (the first training
    step allocates the optimizer state, as in a real run). The peak is the sampled
    RSS (every 2 ms), or the kernel's high-water mark when the steps raised it.
    """
    _check_available(torch.device("cpu"))
    if framework not in FRAMEWORKS or task not in ("train", "infer"):
        raise ValueError(f"framework must be one of {FRAMEWORKS} and task train or infer, got {framework}, {task}")
    (side,), _ = _build_sides(cfg, amp, instances, frameworks=(framework,))
    gc.collect()
    before = rss_bytes()
    max_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with PeakRSS() as sampled:
        for _ in range(steps):
            side.train_step() if task == "train" else side.infer_step()
    peak = sampled.peak
    max_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if max_after > max_before:  # the kernel's exact high-water mark, when the steps set it
        peak = max(peak, max_after)
    return (peak - before) / 2**20


def format_comparison(results: List[Dict[str, Any]]) -> List[str]:
    """Markdown lines: time and memory per task, then the stage table when profiled."""
    by = {(r["framework"], r["task"]): r for r in results}
    lines = [
        "| run | detectron2 | maedet | ratio |",
        "| --- | --- | --- | --- |",
    ]
    for task, label in (("train", "training step (s)"), ("infer", "inference (s)")):
        d, m = by[("detectron2", task)], by[("maedet", task)]
        lines.append(
            f"| {label} | {d['s_per_iter']:.2f} | {m['s_per_iter']:.2f} | {m['s_per_iter'] / d['s_per_iter']:.2f}x |"
        )
    for task, label in (("train", "page faults, training step"), ("infer", "page faults, inference")):
        d, m = by[("detectron2", task)], by[("maedet", task)]
        if "page_faults" in d and "page_faults" in m:
            ratio = f"{m['page_faults'] / d['page_faults']:.2f}x" if d["page_faults"] else "-"
            lines.append(f"| {label} | {d['page_faults']:,} | {m['page_faults']:,} | {ratio} |")
    for task, label in (("train", "peak memory, training (MB)"), ("infer", "peak memory, inference (MB)")):
        d, m = by[("detectron2", task)], by[("maedet", task)]
        if "peak_mem_mb" not in d or "peak_mem_mb" not in m:
            continue
        ratio = m["peak_mem_mb"] / d["peak_mem_mb"] if d["peak_mem_mb"] > 0 else float("nan")
        lines.append(f"| {label} | {d['peak_mem_mb']:,.0f} | {m['peak_mem_mb']:,.0f} | {ratio:.2f}x |")
    for task, label in (("train", "training step"), ("infer", "inference")):
        d, m = by[("detectron2", task)], by[("maedet", task)]
        if "flops" not in d or "flops" not in m:
            continue
        rate = m["gemm_flop_s"]
        lines.append(
            f"| matrix products + convolutions, {label} (GFLOP) | {d['flops'] / 1e9:,.0f} | "
            f"{m['flops'] / 1e9:,.0f} | {m['flops'] / d['flops']:.2f}x |"
        )
        fd, fm = d["flops"] / rate, m["flops"] / rate
        lines.append(
            f"| {label} at this machine's GEMM rate, {rate / 1e9:.0f} GFLOP/s (s) | {fd:.2f} | {fm:.2f} | "
            f"{fm / d['s_per_iter']:.2f}x of detectron2's time |"
        )
        lines.append(
            f"| {label}: share of the time at that rate | {fd / d['s_per_iter']:.0%} | {fm / m['s_per_iter']:.0%} | |"
        )
        if "products_s" not in d or "products_s" not in m:
            continue
        lines.append(
            f"| {label}, one profiled run (s) | {d['profiled_s']:.2f} | {m['profiled_s']:.2f} | "
            f"{m['profiled_s'] / d['profiled_s']:.2f}x |"
        )
        lines.append(
            f"| of which in matrix products + convolutions (s) | {d['products_s']:.2f} | {m['products_s']:.2f} | "
            f"{m['products_s'] / d['profiled_s']:.2f}x of detectron2's profiled run |"
        )
        lines.append(
            f"| of which everything else (s) | {d['rest_s']:.2f} | {m['rest_s']:.2f} | "
            f"{m['rest_s'] / d['profiled_s']:.2f}x of detectron2's profiled run |"
        )
        lines.append(
            f"| rate achieved in the products (GFLOP/s) | {d['flops'] / d['products_s'] / 1e9:.0f} | "
            f"{m['flops'] / m['products_s'] / 1e9:.0f} | |"
        )
    return lines
