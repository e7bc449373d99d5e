"""Config schemas. Every key a YAML file may set is declared here with its type,
its allowed values and its range.

Two top-level schemas: :class:`PretrainConfig` (``tools/pretrain.py``) and
:class:`DetectionConfig` (``tools/train_net.py``, ``tools/infer.py``). They share
:class:`SolverConfig` and :class:`TrainConfig`, which drive the common engine.

Enumerations are ``Literal`` types (OmegaConf refuses any other value, naming the
key and the allowed set); numeric ranges are declared with :func:`bounded` and
checked when the config is loaded (:func:`maedet.config.loader.check_ranges`).
Model sizes have no defaults here (``???``): they come from the YAML files only.

The parts of a detector (``model.backbone``, ``model.neck``, ``model.rpn``,
``model.roi_heads``, ``model.meta_arch``) and the augmentation pipelines
(``data.train.pipeline``, ``data.test.pipeline``) are plug-in sections: a
``name`` picks a registered component (:mod:`maedet.utils.registry`) and the
other keys are its constructor's keyword arguments, checked against its
signature when the config is resolved (:mod:`maedet.builders.config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional

from omegaconf import MISSING

__all__ = [
    "bounded",
    "SolverConfig",
    "TrainConfig",
    "MAEModelConfig",
    "PretrainDataConfig",
    "VisConfig",
    "PretrainConfig",
    "DetModelConfig",
    "DatasetSplitConfig",
    "DetDataConfig",
    "TestConfig",
    "DetectionConfig",
    "PLUGIN_SECTIONS",
]

AmpMode = Literal["auto", "off", "bf16", "fp16"]
OnBadImage = Literal["fail", "skip"]
MaskFormat = Literal["polygon", "bitmask"]


def bounded(
    default: Any = MISSING,
    *,
    ge: Optional[float] = None,
    gt: Optional[float] = None,
    le: Optional[float] = None,
    lt: Optional[float] = None,
) -> Any:
    """A dataclass field with a numeric range (checked at load; ``None`` values are not checked).

    Without ``default`` the key is mandatory (``???``): the YAML files must set it.
    """
    meta = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata={"range": meta})


def _plugin(name: str, **kwargs: Any) -> Any:
    return field(default_factory=lambda: {"name": name, **kwargs})


@dataclass
class SolverConfig:
    """Optimizer, weight-decay groups and learning-rate schedule.

    The peak lr is ``lr`` when set; otherwise ``base_lr * effective_batch /
    base_batch_size`` (effective batch = batch per process x processes x
    accumulation steps), the MAE scaling rule. Lengths may be given in
    iterations (``max_iter``, ``warmup_iters``) or epochs (``epochs``,
    ``warmup_epochs``; converted with the dataset size and effective batch).

    Weight decay of a parameter (see :func:`maedet.engine.optim.param_groups`):
    0 if its leaf name is in ``no_weight_decay``, or if ``no_decay_1d`` and it is
    1-D or a ``.bias`` (the MAE release's rule); ``weight_decay_norm`` if it
    belongs to a ``torch.nn`` normalization layer and ``weight_decay_norm`` is set
    (detectron2's ``weight_decay_norm``); ``weight_decay`` otherwise.
    """

    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: Optional[float] = bounded(None, gt=0)
    base_lr: float = bounded(1.5e-4, gt=0)
    base_batch_size: int = bounded(256, ge=0)
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = bounded(0.9, ge=0, lt=1)
    weight_decay: float = bounded(0.05, ge=0)
    weight_decay_norm: Optional[float] = bounded(None, ge=0)
    no_decay_1d: bool = False
    no_weight_decay: List[str] = field(default_factory=list)
    layer_decay: float = bounded(1.0, gt=0, le=1)  # < 1: layer-wise lr decay over the backbone's layers
    fused: Literal["auto", "on", "off"] = "auto"  # fused AdamW kernel
    max_iter: int = bounded(0, ge=0)
    epochs: float = bounded(0.0, ge=0)
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_iters: int = bounded(0, ge=0)
    warmup_epochs: float = bounded(0.0, ge=0)
    warmup_factor: float = bounded(0.0, ge=0, le=1)  # lr multiplier at iteration 0 of the linear warm-up
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)  # cosine: final lr / peak lr
    steps: List[int] = field(default_factory=list)  # multistep: iterations where lr *= gamma
    gamma: float = bounded(0.1, gt=0, le=1)
    clip_grad_norm: float = bounded(0.0, ge=0)  # 0 = no clipping


@dataclass
class TrainConfig:
    """Engine settings shared by pretraining and detection training."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = bounded(0, ge=0)
    batch_size: int = bounded(2, ge=1)  # per process (used when total_batch_size is 0)
    # > 0: the global batch; each of N processes takes total_batch_size / (N x accum_steps),
    # so a recipe keeps its batch (and lr) whatever the number of GPUs.
    total_batch_size: int = bounded(0, ge=0)
    accum_steps: int = bounded(1, ge=1)
    # auto: bf16 on GPUs that support it, fp16 on older ones, off on CPU
    amp: AmpMode = "off"
    num_workers: int = bounded(2, ge=0)
    pin_memory: bool = True
    persistent_workers: bool = True
    checkpoint_period: int = bounded(1000, ge=0)
    max_to_keep: int = bounded(2, ge=0)  # periodic checkpoints kept on disk (final/best always kept)
    log_period: int = bounded(20, ge=1)
    nonfinite: Literal["stop", "skip"] = "stop"  # what a NaN/inf loss does
    compile: bool = False  # torch.compile the backbone
    ddp_grad_compression: Literal["none", "bf16", "fp16"] = "none"
    ddp_bucket_view: bool = True  # DDP gradient_as_bucket_view: grads are views into the all-reduce buckets
    ddp_find_unused: bool = False
    threads: int = bounded(0, ge=0)  # CPU threads for torch (0 = torch default)


# ----------------------------------------------------------------- pretraining
@dataclass
class MAEModelConfig:
    """Arguments of :class:`maedet.models.mae.MaskedAutoencoderViT` (sizes come from the YAML files)."""

    img_size: int = bounded(ge=1)
    patch_size: int = bounded(ge=1)
    in_chans: int = bounded(3, ge=1)
    embed_dim: int = bounded(ge=1)
    depth: int = bounded(ge=1)
    num_heads: int = bounded(ge=1)
    decoder_embed_dim: int = bounded(ge=1)
    decoder_depth: int = bounded(ge=1)
    decoder_num_heads: int = bounded(ge=1)
    mlp_ratio: float = bounded(4.0, gt=0)
    norm_pix_loss: bool = True
    mask_ratio: float = bounded(0.75, ge=0, lt=1)


@dataclass
class PretrainDataConfig:
    """Unlabeled images: a folder (searched recursively) or the images of a COCO json."""

    root: str = ""
    coco_json: str = ""
    image_root: str = ""
    dataset: str = ""  # a catalog name; its json's images are used
    input_size: int = bounded(224, ge=16)
    min_scale: float = bounded(0.2, gt=0, le=1)
    max_scale: float = bounded(1.0, gt=0, le=1)
    hflip: bool = True
    on_bad_image: OnBadImage = "fail"
    check_images: bool = True  # read every image header before training (cached)


@dataclass
class VisConfig:
    period: int = bounded(0, ge=0)  # every N iterations save original/masked/reconstruction grids (0 = off)
    num_images: int = bounded(4, ge=0)


@dataclass
class PretrainConfig:
    output_dir: str = "output/mae"
    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # the MAE recipe: AdamW (0.9, 0.95), weight decay 0.05 off 1-d tensors, lr 1.5e-4 x batch / 256
    solver: SolverConfig = field(
        default_factory=lambda: SolverConfig(betas=[0.9, 0.95], weight_decay=0.05, base_lr=1.5e-4, no_decay_1d=True)
    )
    vis: VisConfig = field(default_factory=VisConfig)


# ------------------------------------------------------------------- detection
@dataclass
class DetModelConfig:
    """The detector, part by part (plug-in sections: ``name`` + constructor arguments).

    ``backbone.pretrained`` (an MAE / maedet / timm encoder checkpoint) is read by
    the builder, not passed to the backbone.
    """

    meta_arch: Dict[str, Any] = _plugin("generalized_rcnn")
    backbone: Dict[str, Any] = _plugin("vit", pretrained="")
    neck: Dict[str, Any] = _plugin("simple_feature_pyramid")
    rpn: Dict[str, Any] = _plugin("rpn")
    roi_heads: Dict[str, Any] = _plugin("standard")
    num_classes: int = bounded(0, ge=0)  # foreground classes; 0 = take from the training set
    weights: str = ""  # a full detection checkpoint (evaluation, inference, fine-tuning)


@dataclass
class DatasetSplitConfig:
    """A dataset (a catalog ``name``, or an explicit ``json`` + ``images`` pair, which
    wins over ``name``) and its augmentation pipeline."""

    name: str = ""
    json: str = ""
    images: str = ""
    # false: invalid annotations (non-positive box, box outside the image, degenerate
    # segmentation) are dropped with a counted warning instead of stopping the run
    strict: bool = True
    # training masks: "polygon" keeps an image's COCO polygons through the augmentation and
    # rasterizes them per RoI (detectron2's default; images with an RLE instance use bitmaps);
    # "bitmask" rasterizes every instance at image size first
    mask_format: MaskFormat = "polygon"
    pipeline: Dict[str, Any] = _plugin("lsj")
    # training: the order images are drawn in ("infinite": each once per epoch;
    # "repeat_factor": images of rare categories repeated, LVIS's recipe; see maedet.data.samplers)
    sampler: Dict[str, Any] = _plugin("infinite")


@dataclass
class DetDataConfig:
    train: DatasetSplitConfig = field(default_factory=DatasetSplitConfig)
    test: DatasetSplitConfig = field(
        default_factory=lambda: DatasetSplitConfig(pipeline={"name": "resize_shortest_edge"})
    )
    on_bad_image: OnBadImage = "fail"  # what an unreadable or mis-sized image does (checked before training)
    check_images: bool = True  # read every image header before training (cached by size and mtime)


@dataclass
class TestConfig:
    eval_period: int = bounded(0, ge=0)  # evaluate every N iterations (and always at the end); 0 = end only
    batch_size: int = bounded(1, ge=1)
    num_workers: int = bounded(2, ge=0)
    # which number picks model_best.pth; "" = segm/AP, or bbox/AP for a model without masks
    best_metric: str = ""
    # error: a checkpoint whose classes differ from the test set's stops the run;
    # by_position: label i of the model is scored as the test set's i-th category
    class_mismatch: Literal["error", "by_position"] = "error"


@dataclass
class DetectionConfig:
    output_dir: str = "output/det"
    model: DetModelConfig = field(default_factory=DetModelConfig)
    data: DetDataConfig = field(default_factory=DetDataConfig)
    solver: SolverConfig = field(
        default_factory=lambda: SolverConfig(
            lr=1e-4,
            betas=[0.9, 0.999],
            weight_decay=0.1,
            schedule="multistep",
            warmup_factor=0.001,
        )
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    test: TestConfig = field(default_factory=TestConfig)


# Plug-in sections of the detection config: path -> (registry attribute, keys the builder reads itself).
PLUGIN_SECTIONS: Dict[str, tuple] = {
    "model.meta_arch": ("DETECTORS", ()),
    "model.backbone": ("BACKBONES", ("pretrained",)),
    "model.neck": ("NECKS", ()),
    "model.rpn": ("PROPOSAL_GENERATORS", ()),
    "model.roi_heads": ("ROI_HEADS", ()),
    "data.train.pipeline": ("PIPELINES", ()),
    "data.train.sampler": ("SAMPLERS", ()),
    "data.test.pipeline": ("PIPELINES", ()),
}
