"""MAE pretraining: builds the model, data and trainer from a :class:`PretrainConfig`."""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, List

import cv2
import numpy as np
import torch
from torch import nn

from maedet.checkpoint.io import atomic_save
from maedet.data.build import build_pretrain_loader
from maedet.data.catalog import DatasetCatalog
from maedet.data.images import ImageFolderDataset
from maedet.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_mae_transform
from maedet.engine import distributed as du
from maedet.engine.launch import build_lr_schedule, derive_schedule
from maedet.engine.optim import build_optimizer, param_groups
from maedet.engine.trainer import HookBase, Trainer, unwrap_model
from maedet.errors import ConfigError
from maedet.fileio import atomic_write
from maedet.models.mae import MaskedAutoencoderViT, masking_noise

__all__ = ["build_mae_model", "build_pretrain_dataset", "mae_loss_fn", "ReconstructionVisHook", "run_pretraining",
           "ENCODER_CHECKPOINT"]

logger = logging.getLogger("maedet")

ENCODER_CHECKPOINT = "encoder_final.pth"


def build_mae_model(m) -> MaskedAutoencoderViT:
    return MaskedAutoencoderViT(
        img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=m.embed_dim,
        depth=m.depth, num_heads=m.num_heads, decoder_embed_dim=m.decoder_embed_dim,
        decoder_depth=m.decoder_depth, decoder_num_heads=m.decoder_num_heads, mlp_ratio=m.mlp_ratio,
        norm_pix_loss=m.norm_pix_loss,
    )


def build_pretrain_dataset(d, train: bool = True) -> ImageFolderDataset:
    """Unlabeled images from ``data.root`` (folder), ``data.coco_json`` or ``data.dataset`` (catalog)."""
    transform = build_mae_transform(d.input_size, scale=(d.min_scale, d.max_scale), hflip=d.hflip)
    sources = [bool(d.root), bool(d.coco_json), bool(d.dataset)]
    if sum(sources) != 1:
        raise ConfigError("set exactly one of data.root (image folder), data.coco_json or data.dataset")
    if d.root:
        return ImageFolderDataset(root=d.root, transform=transform, on_bad_image=d.on_bad_image)
    if d.coco_json:
        return ImageFolderDataset(coco_json=d.coco_json, image_root=d.image_root or None, transform=transform,
                                  on_bad_image=d.on_bad_image)
    json_file, image_root = DatasetCatalog.get(d.dataset)
    return ImageFolderDataset(coco_json=json_file, image_root=image_root, transform=transform,
                              on_bad_image=d.on_bad_image)


def mae_loss_fn(mask_ratio: float):
    """Loss closure: batch = (images (B,3,S,S), seeds (B,)); masking noise comes from each
    sample's seed, so the mask of a sample does not depend on batch layout or process."""

    def loss_fn(model: nn.Module, batch, device: torch.device) -> Dict[str, torch.Tensor]:
        images, seeds = batch
        images = images.to(device, non_blocking=True)
        num_patches = unwrap_model(model).patch_embed.num_patches
        noise = masking_noise(seeds.tolist(), num_patches, device=device)
        loss, _, _ = model(images, mask_ratio=mask_ratio, noise=noise)
        return {"loss_mae": loss}

    return loss_fn


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    x = (img.float().cpu() * std + mean).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


@torch.no_grad()
def reconstruction_grid(model: MaskedAutoencoderViT, images: torch.Tensor, mask_ratio: float,
                        seeds: List[int]) -> np.ndarray:
    """Rows of [original | masked input | reconstruction | reconstruction with visible patches pasted].

    Args:
        images: (N, 3, S, S) normalized images.
    Returns:
        (N*S, 4*S, 3) uint8 RGB.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images = images.to(device)
    noise = masking_noise(seeds, model.patch_embed.num_patches, device=device)
    _, pred, mask = model(images, mask_ratio=mask_ratio, noise=noise)
    if model.norm_pix_loss:
        target = model.patchify(images)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        pred = pred * (var + 1.0e-6) ** 0.5 + mean
    recon = model.unpatchify(pred.float())
    p = model.patch_embed.patch_size[0]
    mask_img = model.unpatchify(mask.unsqueeze(-1).repeat(1, 1, p * p * 3).float())
    masked = images * (1 - mask_img)
    pasted = images * (1 - mask_img) + recon * mask_img
    rows = []
    for i in range(images.shape[0]):
        cells = [_to_uint8(images[i]), _to_uint8(masked[i]), _to_uint8(recon[i]), _to_uint8(pasted[i])]
        rows.append(np.concatenate(cells, axis=1))
    model.train(was_training)
    return np.concatenate(rows, axis=0)


class ReconstructionVisHook(HookBase):
    """Every ``period`` iterations, writes ``vis/recon_{iter:07d}.png`` for fixed images and masks."""

    def __init__(self, dataset, period: int, num_images: int, mask_ratio: float, output_dir: str):
        self.period = period
        self.mask_ratio = mask_ratio
        self.output_dir = os.path.join(output_dir, "vis")
        n = min(num_images, len(dataset))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.images = torch.stack([dataset[i] for i in range(n)])
        self.seeds = list(range(n))

    def _write(self, trainer: Trainer) -> None:
        if not du.is_main_process() or self.images.shape[0] == 0:
            return
        with torch.random.fork_rng(devices=[]):
            grid = reconstruction_grid(unwrap_model(trainer.model), self.images, self.mask_ratio, self.seeds)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))
        if ok:
            path = os.path.join(self.output_dir, f"recon_{trainer.iter:07d}.png")
            atomic_write(path, lambda f: f.write(buf.tobytes()))

    def after_step(self, trainer: Trainer) -> None:
        if self.period > 0 and trainer.iter % self.period == 0:
            self._write(trainer)

    def after_train(self, trainer: Trainer) -> None:
        if self.period > 0 and trainer.iter % self.period != 0:
            self._write(trainer)


def run_pretraining(cfg, device: torch.device, resume: bool = False, extra_hooks=()) -> str:
    """Train an MAE as configured; returns the path of the encoder checkpoint.

    ``extra_hooks``: more :class:`~maedet.engine.trainer.HookBase` objects for the trainer.
    """
    dataset = build_pretrain_dataset(cfg.data)
    logger.info(f"pretraining on {len(dataset)} images")
    model = build_mae_model(cfg.model).to(device)
    if cfg.train.compile:
        model = torch.compile(model)
    world = du.get_world_size()
    samples_per_iter = cfg.train.batch_size * world * cfg.train.accum_steps
    lr, max_iter, warmup = derive_schedule(cfg.solver, len(dataset), samples_per_iter)
    logger.info(f"effective batch {samples_per_iter}, peak lr {lr:.3e}, {max_iter} iterations ({warmup} warm-up)")
    schedule = build_lr_schedule(cfg.solver, max_iter, warmup)
    groups = param_groups(unwrap_model(model), cfg.solver.weight_decay)
    optimizer = build_optimizer(groups, cfg.solver.optimizer, lr, cfg.solver.betas, cfg.solver.momentum,
                                cfg.solver.fused, device)

    def loader_fn(start: int):
        return build_pretrain_loader(
            dataset, batch_size=cfg.train.batch_size, num_workers=cfg.train.num_workers, seed=cfg.train.seed,
            rank=du.get_rank(), world_size=world, start=start,
            pin_memory=cfg.train.pin_memory and device.type == "cuda",
            persistent_workers=cfg.train.persistent_workers,
        )

    hooks: List[HookBase] = list(extra_hooks)
    if cfg.vis.period > 0:
        vis_data = build_pretrain_dataset(cfg.data)
        hooks.append(ReconstructionVisHook(vis_data, cfg.vis.period, cfg.vis.num_images, cfg.model.mask_ratio,
                                           cfg.output_dir))
    trainer = Trainer(
        model, optimizer, loader_fn, mae_loss_fn(cfg.model.mask_ratio), schedule, lr, max_iter, samples_per_iter,
        cfg.output_dir, device, amp=cfg.train.amp, accum_steps=cfg.train.accum_steps,
        clip_grad_norm=cfg.solver.clip_grad_norm, checkpoint_period=cfg.train.checkpoint_period,
        log_period=cfg.train.log_period, max_to_keep=cfg.train.max_to_keep, nonfinite=cfg.train.nonfinite,
        hooks=hooks, ddp_kwargs={"find_unused_parameters": cfg.train.ddp_find_unused},
        ddp_grad_compression=cfg.train.ddp_grad_compression, ddp_bucket_view=cfg.train.ddp_bucket_view,
    )
    if resume:
        trainer.resume()
    trainer.train()
    path = os.path.join(cfg.output_dir, ENCODER_CHECKPOINT)
    if du.is_main_process():
        mae = unwrap_model(trainer.model)
        meta: Dict[str, Any] = {
            "format": "maedet-mae-encoder", "iter": trainer.iter,
            "img_size": cfg.model.img_size, "patch_size": cfg.model.patch_size, "embed_dim": cfg.model.embed_dim,
            "depth": cfg.model.depth, "num_heads": cfg.model.num_heads,
        }
        atomic_save({"model": mae.encoder_state_dict(), "meta": meta}, path)
        logger.info(f"encoder checkpoint written: {path}")
    du.synchronize()
    return path
