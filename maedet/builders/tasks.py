"""The runs the tools start: MAE pretraining, detection training, detection evaluation."""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import torch
from omegaconf import OmegaConf

from maedet.builders.data import build_detection_dataset, build_pretrain_dataset, build_test_loader
from maedet.builders.model import (
    build_detection_model,
    build_mae_model,
    load_detection_weights,
    predicts_masks,
    resolve_num_classes,
)
from maedet.builders.trainer import build_trainer
from maedet.checkpoint.convert import peek_meta
from maedet.checkpoint.formats.maedet import DETECTION_FORMAT
from maedet.checkpoint.io import atomic_save
from maedet.data.coco import CocoInstanceDataset
from maedet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from maedet.engine.hooks import EvalHook, FinalWeightsHook, ReconstructionVisHook
from maedet.engine.steps import detection_loss, mae_loss_fn, unwrap_model
from maedet.engine.trainer import HookBase
from maedet.evaluation import COCOEvaluator, inference_on_dataset
from maedet.utils import distributed as du
from maedet.utils.amp import amp_dtype
from maedet.utils.errors import ConfigError
from maedet.utils.fileio import atomic_write_text

__all__ = [
    "ENCODER_CHECKPOINT",
    "run_pretraining",
    "run_detection_training",
    "run_evaluation",
    "dataset_meta",
    "check_class_match",
]

logger = logging.getLogger("maedet")

ENCODER_CHECKPOINT = "encoder_final.pth"

Results = Dict[str, Dict[str, float]]


# ------------------------------------------------------------------ pretraining
def run_pretraining(cfg: Any, device: torch.device, resume: bool = False, extra_hooks: Sequence[HookBase] = ()) -> str:
    """Train an MAE as configured; returns the path of the encoder checkpoint (``encoder_final.pth``)."""
    dataset = build_pretrain_dataset(cfg.data)
    logger.info(f"pretraining on {len(dataset)} images")
    model = build_mae_model(cfg.model).to(device)
    if cfg.train.compile:
        model = torch.compile(model)
    hooks: List[HookBase] = list(extra_hooks)
    if cfg.vis.period > 0:
        n = min(cfg.vis.num_images, len(dataset))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            images = torch.stack([dataset[i] for i in range(n)]) if n else torch.zeros(0)
        hooks.append(
            ReconstructionVisHook(
                images, cfg.vis.period, cfg.model.mask_ratio, cfg.output_dir, IMAGENET_MEAN, IMAGENET_STD
            )
        )
    trainer = build_trainer(cfg, model, dataset, "pretrain", mae_loss_fn(cfg.model.mask_ratio), hooks, device)
    if resume:
        trainer.resume()
    trainer.train()
    path = os.path.join(cfg.output_dir, ENCODER_CHECKPOINT)
    if trainer.was_finished and os.path.isfile(path):
        return path
    if du.is_main_process():
        m = cfg.model
        meta: Dict[str, Any] = {
            "format": "maedet-mae-encoder",
            "iter": trainer.iter,
            "img_size": m.img_size,
            "patch_size": m.patch_size,
            "embed_dim": m.embed_dim,
            "depth": m.depth,
            "num_heads": m.num_heads,
            "norm_pix_loss": bool(m.norm_pix_loss),
            "mask_ratio": float(m.mask_ratio),
        }
        atomic_save({"model": unwrap_model(trainer.model).encoder_state_dict(), "meta": meta}, path)
        logger.info(f"encoder checkpoint written: {path}")
    du.synchronize()
    return path


# -------------------------------------------------------------------- detection
def dataset_meta(ds: CocoInstanceDataset) -> Dict[str, Any]:
    """The categories of a dataset as stored in detection checkpoints."""
    return {
        "class_names": list(ds.class_names),
        "label_to_cat_id": {int(k): int(v) for k, v in ds.label_to_cat_id.items()},
    }


def _categories(names: Sequence[str], label_to_cat_id: Mapping[Any, Any]) -> List[tuple]:
    return [(int(label_to_cat_id.get(i + 1, label_to_cat_id.get(str(i + 1), -1))), str(n)) for i, n in enumerate(names)]


def check_class_match(meta: Mapping[str, Any], test: CocoInstanceDataset, weights: str, policy: str) -> None:
    """Refuse to score a model against a test set with other classes (``test.class_mismatch``).

    The checkpoint's ``class_names`` / ``label_to_cat_id`` (stored at training) must
    equal the test set's categories, in order; ``by_position`` scores label i as the
    test set's i-th category (deliberate remapping). A checkpoint without class
    names is scored by position with a warning.
    """
    names = meta.get("class_names")
    theirs = _categories(test.class_names, test.label_to_cat_id)
    if not names:
        logger.warning(
            f"{weights} stores no class names: its labels are scored as the test set's categories "
            "in order (by position)"
        )
        return
    ours = _categories(names, meta.get("label_to_cat_id") or {})
    if ours == theirs or policy == "by_position":
        return
    fmt = lambda cats: ", ".join(f"{c}:{n}" for c, n in cats[:8]) + (" ..." if len(cats) > 8 else "")  # noqa: E731
    raise ConfigError(
        f"the model {weights} was trained on other classes than the test set {test.json_file}: "
        f"model [{fmt(ours)}] ({len(ours)} classes), test set [{fmt(theirs)}] ({len(theirs)} "
        "classes); test.class_mismatch=by_position scores them by position"
    )


def eval_tasks(model_cfg: Any) -> Tuple[str, ...]:
    """COCO tasks a detector is scored on: ``bbox`` and, with a mask head, ``segm``."""
    return ("bbox", "segm") if predicts_masks(model_cfg) else ("bbox",)


def best_metric(cfg: Any) -> str:
    """``test.best_metric``, by default the AP of the last task (``segm/AP``, box-only ``bbox/AP``)."""
    tasks = eval_tasks(cfg.model)
    metric = cfg.test.best_metric or f"{tasks[-1]}/AP"
    if metric.split("/", 1)[0] not in tasks:
        raise ConfigError(
            f"test.best_metric={metric!r} is not computed: the model is scored on {', '.join(tasks)} "
            "(model.roi_heads.mask_on=false has no segm); use e.g. bbox/AP"
        )
    return metric


def _make_eval_fn(cfg: Any, test_ds: CocoInstanceDataset, device: torch.device):
    loader = build_test_loader(test_ds, cfg.test)
    evaluator = COCOEvaluator(
        test_ds.coco, test_ds.label_to_cat_id, tasks=eval_tasks(cfg.model), output_dir=cfg.output_dir
    )
    dtype = amp_dtype(cfg.train.amp, device)

    def eval_fn(model) -> Results:
        return inference_on_dataset(model, loader, evaluator, device, dtype)

    return eval_fn


def _checkpoint_meta(cfg: Any, train_ds: CocoInstanceDataset, num_classes: int) -> Dict[str, Any]:
    return {
        "format": DETECTION_FORMAT,
        "num_classes": num_classes,
        **dataset_meta(train_ds),
        "model_config": OmegaConf.to_container(cfg.model, resolve=True),
    }


def run_detection_training(cfg: Any, device: torch.device, resume: bool = False) -> Results:
    """Train as configured, write ``model_final.pth``, then evaluate; returns the final COCO results (rank 0)."""
    masks = predicts_masks(cfg.model)
    train_ds = build_detection_dataset(cfg.data, "train", train=True, with_masks=masks)
    num_classes = resolve_num_classes(
        cfg.model.num_classes,
        dataset_classes=len(train_ds.class_names),
        dataset=f"the training set {train_ds.json_file}",
    )
    logger.info(f"training set {train_ds.dataset_name}: {len(train_ds)} images, {num_classes} classes")
    test_ds = build_detection_dataset(cfg.data, "test", train=False, with_masks=masks)
    if _categories(test_ds.class_names, test_ds.label_to_cat_id) != _categories(
        train_ds.class_names, train_ds.label_to_cat_id
    ):
        raise ConfigError(
            f"the test set {test_ds.json_file} and the training set {train_ds.json_file} have different categories"
        )
    model = build_detection_model(cfg.model, num_classes)
    if getattr(model.roi_heads, "use_fed_loss", False):
        model.roi_heads.set_class_image_counts(train_ds.class_image_counts())
    if cfg.model.weights:
        load_detection_weights(model, cfg.model.weights)
    model.to(device)
    if cfg.train.compile:
        model.backbone.net = torch.compile(model.backbone.net)
    meta = _checkpoint_meta(cfg, train_ds, num_classes)
    eval_hook = EvalHook(
        cfg.test.eval_period, _make_eval_fn(cfg, test_ds, device), best_metric(cfg), cfg.output_dir, meta
    )
    # The final weights are written before the final evaluation runs.
    hooks = [FinalWeightsHook(cfg.output_dir, meta), eval_hook]
    trainer = build_trainer(cfg, model, train_ds, "detection", detection_loss, hooks, device)
    if resume:
        trainer.resume()
    trainer.train()
    du.synchronize()
    return eval_hook.last_results


def run_evaluation(cfg: Any, device: torch.device) -> Results:
    """``--eval-only``: load ``model.weights`` and evaluate on ``data.test``."""
    if not cfg.model.weights:
        raise ConfigError("--eval-only needs model.weights=CHECKPOINT")
    test_ds = build_detection_dataset(cfg.data, "test", train=False, with_masks=predicts_masks(cfg.model))
    meta = peek_meta(cfg.model.weights)
    check_class_match(meta, test_ds, cfg.model.weights, cfg.test.class_mismatch)
    num_classes = resolve_num_classes(cfg.model.num_classes, weights=cfg.model.weights, meta=meta)
    model = build_detection_model(cfg.model, num_classes, load_pretrained=False)
    load_detection_weights(model, cfg.model.weights)
    model.to(device)
    results = _make_eval_fn(cfg, test_ds, device)(model)
    if du.is_main_process():
        atomic_write_text(
            os.path.join(cfg.output_dir, "eval_metrics.json"),
            json.dumps({"weights": cfg.model.weights, "dataset": test_ds.json_file, **results}, indent=2),
        )
    return results
