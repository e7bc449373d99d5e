"""Where the time of a detector's step goes: forward stages, backward segments, for maedet and detectron2.

:class:`StageClock` times named stages of the forward pass (exclusive times of
wrapped callables) and splits the backward pass at gradient marks on the ViT
blocks and the pyramid; :data:`STAGES` names what is wrapped in each framework, so
the two tables line up stage by stage (``tools/benchmark.py --task reference --stages``).
CPU only: nothing is synchronized.
"""

from __future__ import annotations

import importlib
import time
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Tuple

import torch
from torch import nn

__all__ = ["StageClock", "STAGES", "instrument", "backward_stages", "stage_order", "POST"]


class StageClock:
    """Where the wall time of a step goes, stage by stage, for either framework.

    Forward: :meth:`wrap` replaces a callable (a module's ``forward``, a method, a
    module-level function) by a timed one; a stage's time is exclusive (the time of
    wrapped callables running inside it is booked to them), so stages add up to the
    wrapped total. Backward: :meth:`mark_grad` puts a gradient hook on a tensor;
    the hook fires when that tensor's gradient is complete (all its uses done), so
    the time between two marks is the backward of what lies between them. Nothing
    is synchronized: CPU only.
    """

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now  # the clock read (a test passes its own)
        self.times: Dict[str, float] = defaultdict(float)
        self.marks: Dict[str, float] = {}
        self.enabled = False
        self._stack: List[float] = []
        self._undo: List[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, stage: str) -> None:
        fn = getattr(owner, attr)
        had_own = attr in vars(owner)
        clock = self

        def timed(*args, **kwargs):
            if not clock.enabled:
                return fn(*args, **kwargs)
            clock._stack.append(0.0)
            t0 = clock.now()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = clock.now() - t0
                inner = clock._stack.pop()
                clock.times[stage] += dt - inner
                if clock._stack:
                    clock._stack[-1] += dt

        setattr(owner, attr, timed)
        self._undo.append((lambda: setattr(owner, attr, fn)) if had_own else (lambda: delattr(owner, attr)))

    def mark_grad(self, tensor: torch.Tensor, name: str) -> None:
        if self.enabled and isinstance(tensor, torch.Tensor) and tensor.requires_grad:

            def hook(grad, name=name):
                self.marks[name] = self.now()

            tensor.register_hook(hook)

    def mark_output(self, module: nn.Module, name: str, inputs: bool = False) -> None:
        """Mark the gradient of ``module``'s output (or first input) on every call."""

        def fwd_hook(mod, args, out):
            if isinstance(out, dict):
                for k, v in out.items():
                    self.mark_grad(v, f"{name}.{k}")
            else:
                self.mark_grad(out, name)

        def pre_hook(mod, args):
            self.mark_grad(args[0], name)

        h = module.register_forward_pre_hook(pre_hook) if inputs else module.register_forward_hook(fwd_hook)
        self._undo.append(h.remove)

    def reset(self) -> None:
        self.times.clear()
        self.marks.clear()

    def remove(self) -> None:
        while self._undo:
            self._undo.pop()()


def _instrument_vit(clock: StageClock, backbone: nn.Module) -> None:
    net = backbone.net
    clock.wrap(backbone, "forward", "pyramid (simple feature pyramid)")
    clock.wrap(net, "forward", "ViT patch + position embedding")
    for i, blk in enumerate(net.blocks):
        kind = "window" if blk.window_size > 0 else "global"
        clock.wrap(blk, "forward", f"ViT {kind} blocks")
        clock.mark_output(blk, f"block{i}.in", inputs=True)
    clock.mark_output(net.blocks[-1], "vit.out")
    clock.mark_output(backbone, "pyramid.out")


# Stages of the forward pass: (owner, attribute, stage). The owner is a dotted path
# from the model ("" = the model itself) or, after "import:", a module or class whose
# attribute is called through it (module-level functions, a class's method).
PRE, RPN_HEAD, RPN_PROPOSALS, RPN_LOSSES = (
    "preprocess (normalize, pad)",
    "RPN head, anchors, decoding",
    "RPN proposals (top-k, NMS)",
    "RPN anchor labels + losses",
)
ROI_OTHER, ROI_SAMPLING, BOX_HEAD, BOX_LOSSES, BOX_INFERENCE = (
    "RoI heads (other)",
    "RoI sampling",
    "box head (pool, convs, fc)",
    "box losses",
    "box inference (scores, NMS)",
)
MASK_HEAD, MASK_TARGETS, MASK_LOSS, POST = (
    "mask head (pool, convs, deconv)",
    "mask targets",
    "mask loss",
    "postprocess (rescale, paste masks)",
)
# stage -> (maedet callables, detectron2 callables); each is "owner.attribute" with the
# owner a dotted path from the model ("" = the model), or "import:MODULE[.CLASS]:attribute"
# for a module-level function or a class's method, patched where it is looked up.
STAGES = {
    PRE: (["preprocess"], ["preprocess_image"]),
    RPN_HEAD: (["rpn.forward"], ["proposal_generator.forward"]),
    RPN_PROPOSALS: (["rpn.find_top_proposals"], ["proposal_generator.predict_proposals"]),
    RPN_LOSSES: (
        ["rpn.label_anchors", "rpn.losses"],
        ["proposal_generator.label_and_sample_anchors", "proposal_generator.losses"],
    ),
    ROI_OTHER: (["roi_heads.forward"], ["roi_heads.forward"]),
    ROI_SAMPLING: (
        ["roi_heads.label_and_sample_proposals"],
        [
            "roi_heads.label_and_sample_proposals",
            "import:detectron2.modeling.roi_heads.roi_heads:select_foreground_proposals",
        ],
    ),
    BOX_HEAD: (
        ["roi_heads.box_pooler.forward", "roi_heads.box_head.forward", "roi_heads.box_predictor.forward"],
        ["roi_heads.box_pooler.forward", "roi_heads.box_head.forward", "roi_heads.box_predictor.forward"],
    ),
    BOX_LOSSES: (["roi_heads.box_losses"], ["roi_heads.box_predictor.losses"]),
    BOX_INFERENCE: (
        ["import:maedet.models.detectors.roi_heads:fast_rcnn_inference"],
        ["roi_heads.box_predictor.inference"],
    ),
    MASK_HEAD: (
        ["roi_heads.mask_pooler.forward", "roi_heads.mask_head.forward", "roi_heads.mask_predictor.forward"],
        ["roi_heads.mask_pooler.forward", "roi_heads.mask_head.layers", "roi_heads.mask_head.forward"],
    ),
    MASK_TARGETS: (
        ["import:maedet.models.detectors.roi_heads:mask_targets"],
        ["import:detectron2.structures.BitMasks:crop_and_resize"],
    ),
    MASK_LOSS: (["roi_heads.mask_losses"], ["import:detectron2.modeling.roi_heads.mask_head:mask_rcnn_loss"]),
    POST: (
        ["import:maedet.models.detectors.rcnn:rescale_detections"],
        ["import:detectron2.modeling.meta_arch.rcnn:detector_postprocess"],
    ),
}
FRAMEWORK_COLUMN = {"maedet": 0, "detectron2": 1}


def _resolve(model: nn.Module, target: str) -> Tuple[Any, str]:
    """(owner, attribute) of a ``STAGES`` entry."""
    if target.startswith("import:"):
        name, attr = target[len("import:") :].rsplit(":", 1)
        try:
            return importlib.import_module(name), attr
        except ImportError:  # MODULE.CLASS
            module, _, cls = name.rpartition(".")
            return getattr(importlib.import_module(module), cls), attr
    path, _, attr = target.rpartition(".")
    owner = model
    for part in filter(None, path.split(".")):
        owner = getattr(owner, part, None)
    return owner, attr


def instrument(clock: StageClock, model: nn.Module, framework: str) -> None:
    """Time ``model``'s forward stages (:data:`STAGES`) and mark its backward boundaries."""
    _instrument_vit(clock, model.backbone)
    column = FRAMEWORK_COLUMN[framework]
    for stage, targets in STAGES.items():
        for target in targets[column]:
            owner, attr = _resolve(model, target)
            if owner is not None and hasattr(owner, attr):  # e.g. no mask head
                clock.wrap(owner, attr, stage)


def backward_stages(marks: Dict[str, float], t_start: float, t_end: float, blocks: List[str]) -> Dict[str, float]:
    """Backward time between gradient marks: heads, pyramid, each kind of ViT block, embedding."""
    out: Dict[str, float] = defaultdict(float)
    pyr = [t for k, t in marks.items() if k.startswith("pyramid.out.")]
    if not pyr or "vit.out" not in marks:
        return {}
    t_pyr = max(pyr)
    out["bwd: RPN + RoI heads + losses"] = t_pyr - t_start
    out["bwd: pyramid"] = marks["vit.out"] - t_pyr
    prev = marks["vit.out"]
    for i in reversed(range(len(blocks))):
        t = marks.get(f"block{i}.in", t_end)
        out[f"bwd: ViT {blocks[i]} blocks"] += t - prev
        prev = t
    out["bwd: embedding, preprocess"] = t_end - prev
    return dict(out)


FORWARD_ORDER = (
    PRE,
    "ViT patch + position embedding",
    "ViT window blocks",
    "ViT global blocks",
    "pyramid (simple feature pyramid)",
    RPN_HEAD,
    RPN_LOSSES,
    RPN_PROPOSALS,
    ROI_SAMPLING,
    BOX_HEAD,
    BOX_LOSSES,
    BOX_INFERENCE,
    MASK_HEAD,
    MASK_TARGETS,
    MASK_LOSS,
    ROI_OTHER,
    POST,
)
BACKWARD_ORDER = (
    "RPN + RoI heads + losses",
    "pyramid",
    "ViT global blocks",
    "ViT window blocks",
    "embedding, preprocess",
)


def stage_order(keys: Iterable[str]) -> List[str]:
    """Forward stages in pipeline order, backward in its (reverse) order, totals last."""
    phase = {"fwd": 0, "bwd": 1, "infer": 3}

    def key(k: str) -> Tuple[int, int, str]:
        head, _, name = k.partition(": ")
        rank = phase.get(head, 2)  # 2: the optimizer step
        order = BACKWARD_ORDER if rank == 1 else FORWARD_ORDER
        return (rank, order.index(name) if name in order else len(order) + (name == "total"), k)

    return sorted(keys, key=key)
