"""Detection training and evaluation: builds the ViTDet Mask R-CNN, COCO data,
evaluator and trainer from a :class:`DetectionConfig`."""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from maedet.checkpoint.io import atomic_save, load_checkpoint_file
from maedet.checkpoint.pretrained import load_pretrained_backbone
from maedet.data.build import build_detection_test_loader, build_detection_train_loader
from maedet.data.catalog import DatasetCatalog
from maedet.data.coco import CocoInstanceDataset
from maedet.data.transforms import IMAGENET_MEAN, build_lsj_train_transform
from maedet.engine import distributed as du
from maedet.engine.amp import amp_dtype, autocast
from maedet.engine.launch import build_lr_schedule, derive_schedule
from maedet.engine.optim import build_optimizer, param_groups
from maedet.engine.trainer import HookBase, Trainer, unwrap_model
from maedet.errors import CheckpointError, ConfigError
from maedet.evaluation.coco import COCOEvaluator
from maedet.fileio import atomic_write_text
from maedet.models.mask_rcnn import build_vitdet_mask_rcnn
from maedet.models.vit import get_vit_layer_id, global_blocks_to_window_indexes

__all__ = [
    "resolve_split", "build_detection_model", "load_detection_weights", "detection_loss_fn",
    "inference_on_dataset", "EvalHook", "run_training", "run_evaluation", "per_process_batch",
]

logger = logging.getLogger("maedet")


def resolve_split(split, what: str) -> Tuple[str, str, str]:
    """(json, image root, name) of a dataset split config: a catalog name or explicit paths."""
    if split.name and (split.json or split.images):
        raise ConfigError(f"data.{what}: set either name or json+images, not both")
    if split.name:
        json_file, images = DatasetCatalog.get(split.name)
        return json_file, images, split.name
    if not split.json or not split.images:
        raise ConfigError(f"data.{what}: set name (a registered dataset) or both json and images")
    return split.json, split.images, os.path.basename(split.json)


def build_detection_model(cfg, num_classes: int) -> nn.Module:
    """The ViTDet Mask R-CNN described by ``cfg.model`` (a torchvision ``MaskRCNN``)."""
    b = cfg.model.backbone
    depth = b.depth
    bad = [i for i in b.global_blocks if not 0 <= i < depth]
    if bad:
        raise ConfigError(f"model.backbone.global_blocks {list(b.global_blocks)}: indices {bad} outside 0..{depth - 1}")
    vit_kwargs = dict(
        img_size=b.img_size, patch_size=b.patch_size, embed_dim=b.embed_dim, depth=depth, num_heads=b.num_heads,
        mlp_ratio=b.mlp_ratio, drop_path_rate=b.drop_path_rate, window_size=b.window_size,
        window_block_indexes=global_blocks_to_window_indexes(depth, b.global_blocks),
        use_rel_pos=b.use_rel_pos, pretrain_img_size=b.pretrain_img_size, use_act_checkpoint=b.act_checkpoint,
        freeze=b.freeze, freeze_blocks=b.freeze_blocks, attn_impl=b.attn_impl,
    )
    m = cfg.model
    if len(m.anchor_sizes) != 5:
        raise ConfigError(f"model.anchor_sizes needs 5 sizes, one per pyramid level p2..p6, got {list(m.anchor_sizes)}")
    model = build_vitdet_mask_rcnn(
        num_classes, vit_kwargs, pyramid_out_channels=m.pyramid_channels, min_size=m.min_size, max_size=m.max_size,
        box_score_thresh=m.box_score_thresh, box_nms_thresh=m.box_nms_thresh,
        box_detections_per_img=m.detections_per_img,
        rpn_pre_nms_top_n_train=m.rpn_pre_nms_top_n_train, rpn_post_nms_top_n_train=m.rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=m.rpn_pre_nms_top_n_test, rpn_post_nms_top_n_test=m.rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=m.rpn_batch_size_per_image, box_batch_size_per_image=m.box_batch_size_per_image,
        box_head_conv_dims=tuple(m.box_head_conv_dims), box_head_fc_dim=m.box_head_fc_dim,
        mask_head_conv_dims=tuple(m.mask_head_conv_dims), anchor_sizes=tuple(m.anchor_sizes),
    )
    return model


def load_detection_weights(model: nn.Module, path: str) -> Dict[str, Any]:
    """Load a detection checkpoint (``model_final.pth``, a training checkpoint, or
    ``{"model": state_dict}``) with strict key and shape checks. Returns its ``meta``."""
    state = load_checkpoint_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint dictionary")
    weights = state.get("model", state)
    if not isinstance(weights, dict) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path} holds no model weights ('model' entry of tensors)")
    own = unwrap_model(model).state_dict()
    for k, v in own.items():
        if k not in weights:
            raise CheckpointError(f"{path}: missing key '{k}' (is it a detection checkpoint for this model?)")
        if tuple(weights[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path}: key '{k}' has shape {tuple(weights[k].shape)}, the model expects {tuple(v.shape)} "
                "(other model size or number of classes?)"
            )
    extra = sorted(set(weights) - set(own))
    if extra:
        raise CheckpointError(f"{path}: unexpected key '{extra[0]}' ({len(extra)} in all) for this model")
    unwrap_model(model).load_state_dict(weights)
    logger.info(f"loaded detection weights from {path}")
    return state.get("meta", {}) or {}


def _images_to_device(images, device) -> List[torch.Tensor]:
    return [img.to(device, non_blocking=True).float().div_(255.0) for img in images]


def detection_loss_fn(model: nn.Module, batch, device: torch.device) -> Dict[str, torch.Tensor]:
    """batch = (uint8 images, targets, seeds) -> torchvision's five Mask R-CNN losses."""
    images, targets, _ = batch
    images = _images_to_device(images, device)
    targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device), "masks": t["masks"].to(device)}
               for t in targets]
    return model(images, targets)


@torch.no_grad()
def inference_on_dataset(model: nn.Module, loader, evaluator: COCOEvaluator, device: torch.device,
                         amp: str = "off") -> Dict[str, Dict[str, float]]:
    """Run ``model`` over this rank's share of ``loader`` and score with ``evaluator`` (on rank 0)."""
    was_training = model.training
    model.eval()
    evaluator.reset()
    dtype = amp_dtype(amp, device)
    n, t0 = 0, time.perf_counter()
    total = len(loader)
    for i, (images, targets) in enumerate(loader):
        inputs = _images_to_device(images, device)
        with autocast(device, dtype):
            outputs = model(inputs)
        outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
        evaluator.process([t["image_id"] for t in targets], outputs)
        n += len(images)
        if du.is_main_process() and (i + 1) % 20 == 0:
            rate = n / (time.perf_counter() - t0)
            logger.info(f"inference {i + 1}/{total} batches, {rate:.2f} img/s")
    logger.info(f"inference on {n} images (rank {du.get_rank()}) took {time.perf_counter() - t0:.1f}s")
    results = evaluator.evaluate()
    model.train(was_training)
    return results


def _flatten(results: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    return {f"{task}/{k}": v for task, metrics in results.items() for k, v in metrics.items()}


class EvalHook(HookBase):
    """Evaluates every ``period`` iterations and after training; keeps ``model_best.pth``."""

    def __init__(self, period: int, eval_fn, best_metric: str, output_dir: str, meta: Dict[str, Any]):
        self.period = period
        self.eval_fn = eval_fn
        self.best_metric = best_metric
        self.output_dir = output_dir
        self.meta = meta
        self.best: Optional[float] = None
        self.last_results: Dict[str, Dict[str, float]] = {}

    def _run(self, trainer: Trainer) -> None:
        results = self.eval_fn(trainer.model)
        self.last_results = results
        if not du.is_main_process():
            return
        logger.info(f"evaluation at iteration {trainer.iter} done")
        flat = {k: v for k, v in _flatten(results).items() if v == v}  # drop NaN
        trainer.metrics.write(trainer.iter - 1, flat)
        trainer.metrics.flush()
        value = flat.get(self.best_metric)
        if value is not None and (self.best is None or value > self.best):
            self.best = value
            atomic_save({"model": unwrap_model(trainer.model).state_dict(),
                         "meta": {**self.meta, "iter": trainer.iter, self.best_metric: value}},
                        os.path.join(self.output_dir, "model_best.pth"))
            logger.info(f"new best {self.best_metric} = {value:.3f}: saved model_best.pth")

    def after_step(self, trainer: Trainer) -> None:
        if self.period > 0 and trainer.iter % self.period == 0 and trainer.iter < trainer.max_iter:
            self._run(trainer)

    def after_train(self, trainer: Trainer) -> None:
        self._run(trainer)

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = state.get("best")


def per_process_batch(train_cfg) -> int:
    """Batch per process: ``total_batch_size / (processes x accum_steps)`` when set, else ``batch_size``."""
    if train_cfg.total_batch_size > 0:
        denom = du.get_world_size() * train_cfg.accum_steps
        if train_cfg.total_batch_size % denom != 0:
            raise ConfigError(
                f"train.total_batch_size={train_cfg.total_batch_size} is not divisible by "
                f"{du.get_world_size()} processes x {train_cfg.accum_steps} accumulation steps"
            )
        return train_cfg.total_batch_size // denom
    return train_cfg.batch_size


def _dataset_meta(ds: CocoInstanceDataset) -> Dict[str, Any]:
    return {"class_names": list(ds.class_names), "label_to_cat_id": {int(k): int(v) for k, v in ds.label_to_cat_id.items()}}


def _build_test(cfg):
    json_file, images, name = resolve_split(cfg.data.test, "test")
    ds = CocoInstanceDataset(json_file, images, transforms=None, filter_empty=False, dataset_name=name,
                             strict=cfg.data.test.strict)
    return ds, json_file


def _make_eval_fn(cfg, test_ds, test_json, device):
    loader = build_detection_test_loader(test_ds, batch_size=cfg.test.batch_size, num_workers=cfg.test.num_workers,
                                         rank=du.get_rank(), world_size=du.get_world_size())
    evaluator = COCOEvaluator(test_ds.coco, test_ds.label_to_cat_id, output_dir=cfg.output_dir)

    def eval_fn(model):
        return inference_on_dataset(unwrap_model(model), loader, evaluator, device, cfg.train.amp)

    return eval_fn


def run_training(cfg, device: torch.device, resume: bool = False) -> Dict[str, Dict[str, float]]:
    """Train as configured, evaluate at the end; returns the final COCO results (rank 0)."""
    json_file, images, name = resolve_split(cfg.data.train, "train")
    d = cfg.data
    train_ds = CocoInstanceDataset(
        json_file, images,
        # ViTDet pads the normalized image with 0, i.e. with the mean colour
        transforms=build_lsj_train_transform(d.image_size, d.min_scale, d.max_scale, d.hflip,
                                             pad_value=[round(255 * m) for m in IMAGENET_MEAN]),
        filter_empty=True, dataset_name=name, strict=d.train.strict,
    )
    num_classes = cfg.model.num_classes or len(train_ds.class_names)
    if num_classes != len(train_ds.class_names):
        raise ConfigError(f"model.num_classes={num_classes} but the training set {name} has "
                          f"{len(train_ds.class_names)} categories")
    logger.info(f"training set {name}: {len(train_ds)} images, {num_classes} classes")
    test_ds, test_json = _build_test(cfg)
    if [test_ds.label_to_cat_id[k] for k in sorted(test_ds.label_to_cat_id)] != \
            [train_ds.label_to_cat_id[k] for k in sorted(train_ds.label_to_cat_id)]:
        raise ConfigError(f"the test set {test_json} and the training set {json_file} have different categories")

    model = build_detection_model(cfg, num_classes)
    if cfg.model.backbone.pretrained:
        load_pretrained_backbone(model.backbone.net, cfg.model.backbone.pretrained, logger=logger)
    if cfg.model.weights:
        load_detection_weights(model, cfg.model.weights)
    model.to(device)
    if cfg.train.compile:
        model.backbone.net = torch.compile(model.backbone.net)

    batch = per_process_batch(cfg.train)
    world = du.get_world_size()
    samples_per_iter = batch * world * cfg.train.accum_steps
    lr, max_iter, warmup = derive_schedule(cfg.solver, len(train_ds), samples_per_iter)
    s = cfg.solver
    logger.info(f"batch {batch} per process x {world} processes x {cfg.train.accum_steps} accumulation = "
                f"{samples_per_iter}; peak lr {lr:.3e}; {max_iter} iterations ({warmup} warm-up)")
    schedule = build_lr_schedule(s, max_iter, warmup)
    groups = param_groups(model, s.weight_decay, s.layer_decay, cfg.model.backbone.depth,
                          layer_id_fn=get_vit_layer_id if s.layer_decay != 1.0 else None)
    optimizer = build_optimizer(groups, s.optimizer, lr, s.betas, s.momentum, s.fused, device)

    def loader_fn(start: int):
        return build_detection_train_loader(
            train_ds, batch_size=batch, num_workers=cfg.train.num_workers, seed=cfg.train.seed,
            rank=du.get_rank(), world_size=world, start=start,
            pin_memory=cfg.train.pin_memory and device.type == "cuda",
            persistent_workers=cfg.train.persistent_workers,
        )

    meta = {"format": "maedet-vitdet", "num_classes": num_classes, **_dataset_meta(train_ds)}
    eval_hook = EvalHook(cfg.test.eval_period, _make_eval_fn(cfg, test_ds, test_json, device),
                         cfg.test.best_metric, cfg.output_dir, meta)
    trainer = Trainer(
        model, optimizer, loader_fn, detection_loss_fn, schedule, lr, max_iter, samples_per_iter, cfg.output_dir,
        device, amp=cfg.train.amp, accum_steps=cfg.train.accum_steps, clip_grad_norm=s.clip_grad_norm,
        checkpoint_period=cfg.train.checkpoint_period, log_period=cfg.train.log_period,
        max_to_keep=cfg.train.max_to_keep, nonfinite=cfg.train.nonfinite, hooks=[eval_hook],
        ddp_kwargs={"find_unused_parameters": cfg.train.ddp_find_unused},
        ddp_grad_compression=cfg.train.ddp_grad_compression, ddp_bucket_view=cfg.train.ddp_bucket_view,
    )
    if resume:
        trainer.resume()
    trainer.train()
    if du.is_main_process():
        atomic_save({"model": unwrap_model(trainer.model).state_dict(), "meta": {**meta, "iter": trainer.iter}},
                    os.path.join(cfg.output_dir, "model_final.pth"))
        logger.info(f"final weights written: {os.path.join(cfg.output_dir, 'model_final.pth')}")
    du.synchronize()
    return eval_hook.last_results


def run_evaluation(cfg, device: torch.device) -> Dict[str, Dict[str, float]]:
    """``--eval-only``: load ``model.weights`` and evaluate on ``data.test``."""
    if not cfg.model.weights:
        raise ConfigError("--eval-only needs model.weights=CHECKPOINT")
    test_ds, test_json = _build_test(cfg)
    num_classes = cfg.model.num_classes or len(test_ds.class_names)
    model = build_detection_model(cfg, num_classes)
    load_detection_weights(model, cfg.model.weights)
    model.to(device)
    results = _make_eval_fn(cfg, test_ds, test_json, device)(model)
    if du.is_main_process():
        atomic_write_text(os.path.join(cfg.output_dir, "eval_metrics.json"),
                          json.dumps({"weights": cfg.model.weights, "dataset": test_json, **results}, indent=2))
    return results
