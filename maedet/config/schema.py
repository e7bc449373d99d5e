"""Config schemas. Every key a YAML file may set is declared here with its type.

Two top-level schemas: :class:`PretrainConfig` (``tools/pretrain.py``) and
:class:`DetectionConfig` (``tools/train_net.py``, ``tools/infer.py``). They share
:class:`SolverConfig` and :class:`TrainConfig`, which drive the common engine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

__all__ = [
    "SolverConfig",
    "TrainConfig",
    "MAEModelConfig",
    "PretrainDataConfig",
    "VisConfig",
    "PretrainConfig",
    "BackboneConfig",
    "DetModelConfig",
    "DatasetSplitConfig",
    "DetDataConfig",
    "TestConfig",
    "DetectionConfig",
]


@dataclass
class SolverConfig:
    """Optimizer and learning-rate schedule.

    The peak lr is ``lr`` when set; otherwise ``base_lr * effective_batch /
    base_batch_size`` (effective batch = batch per process x processes x
    accumulation steps), the MAE scaling rule. Lengths may be given in
    iterations (``max_iter``, ``warmup_iters``) or epochs (``epochs``,
    ``warmup_epochs``; converted with the dataset size and effective batch).
    """

    optimizer: str = "adamw"  # adamw | sgd
    lr: Optional[float] = None
    base_lr: float = 1.5e-4
    base_batch_size: int = 256
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    weight_decay: float = 0.05
    layer_decay: float = 1.0  # < 1: layer-wise lr decay over the ViT blocks (fine-tuning)
    fused: str = "auto"  # auto | on | off: fused AdamW kernel
    max_iter: int = 0
    epochs: float = 0.0
    schedule: str = "cosine"  # cosine | multistep | constant
    warmup_iters: int = 0
    warmup_epochs: float = 0.0
    warmup_factor: float = 0.0  # lr multiplier at iteration 0 of the linear warm-up
    min_lr_ratio: float = 0.0  # cosine: final lr / peak lr
    steps: List[int] = field(default_factory=list)  # multistep: iterations where lr *= gamma
    gamma: float = 0.1
    clip_grad_norm: float = 0.0  # 0 = no clipping


@dataclass
class TrainConfig:
    """Engine settings shared by pretraining and detection training."""

    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0
    batch_size: int = 2  # per process
    # > 0: the global batch; each of N processes takes total_batch_size / (N x accum_steps),
    # so a recipe keeps its batch (and lr) whatever the number of GPUs.
    total_batch_size: int = 0
    accum_steps: int = 1
    amp: str = "off"  # auto | off | bf16 | fp16 (auto: bf16 on GPUs that support it, fp16 on older ones, off on CPU)
    num_workers: int = 2
    pin_memory: bool = True
    persistent_workers: bool = True
    checkpoint_period: int = 1000
    max_to_keep: int = 2  # periodic checkpoints kept on disk (final/best always kept)
    log_period: int = 20
    nonfinite: str = "stop"  # stop | skip: what a NaN/inf loss does
    compile: bool = False  # torch.compile the backbone
    ddp_grad_compression: str = "none"  # none | bf16 | fp16
    ddp_bucket_view: bool = True  # DDP gradient_as_bucket_view: grads are views into the all-reduce buckets
    ddp_find_unused: bool = False
    threads: int = 0  # CPU threads for torch (0 = torch default)


# ----------------------------------------------------------------- pretraining
@dataclass
class MAEModelConfig:
    """Arguments of :class:`maedet.models.mae.MaskedAutoencoderViT`."""

    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    norm_pix_loss: bool = True
    mask_ratio: float = 0.75


@dataclass
class PretrainDataConfig:
    """Unlabeled images: a folder (searched recursively) or the images of a COCO json."""

    root: str = ""
    coco_json: str = ""
    image_root: str = ""
    dataset: str = ""  # a catalog name; its json's images are used
    input_size: int = 224
    min_scale: float = 0.2
    max_scale: float = 1.0
    hflip: bool = True
    on_bad_image: str = "fail"  # fail | skip


@dataclass
class VisConfig:
    period: int = 0  # every N iterations save original/masked/reconstruction grids (0 = off)
    num_images: int = 4


@dataclass
class PretrainConfig:
    output_dir: str = "output/mae"
    model: MAEModelConfig = field(default_factory=MAEModelConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    solver: SolverConfig = field(
        default_factory=lambda: SolverConfig(betas=[0.9, 0.95], weight_decay=0.05, base_lr=1.5e-4)
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    vis: VisConfig = field(default_factory=VisConfig)


# ------------------------------------------------------------------- detection
@dataclass
class BackboneConfig:
    """The detection ViT (:class:`maedet.models.vit.ViT`) and how it is initialized/trained."""

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.1
    window_size: int = 14
    global_blocks: List[int] = field(default_factory=lambda: [2, 5, 8, 11])
    use_rel_pos: bool = True
    pretrain_img_size: int = 224
    attn_impl: str = "sdpa"  # sdpa | sdpa_mask | explicit
    act_checkpoint: bool = False
    pretrained: str = ""  # MAE / maedet / timm encoder checkpoint
    freeze: bool = False  # freeze the whole encoder
    freeze_blocks: int = 0  # freeze patch embed + the first K blocks


@dataclass
class DetModelConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    num_classes: int = 0  # foreground classes; 0 = take from the training set
    weights: str = ""  # a full detection checkpoint (evaluation, inference, fine-tuning)
    pyramid_channels: int = 256
    box_head_conv_dims: List[int] = field(default_factory=lambda: [256, 256, 256, 256])
    box_head_fc_dim: int = 1024
    mask_head_conv_dims: List[int] = field(default_factory=lambda: [256, 256, 256, 256])
    anchor_sizes: List[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    min_size: int = 1024  # test-time shorter side
    max_size: int = 1024  # test-time longer side cap
    box_score_thresh: float = 0.05
    box_nms_thresh: float = 0.5
    detections_per_img: int = 100
    rpn_pre_nms_top_n_train: int = 2000
    rpn_post_nms_top_n_train: int = 1000
    rpn_pre_nms_top_n_test: int = 1000
    rpn_post_nms_top_n_test: int = 1000
    rpn_batch_size_per_image: int = 256
    box_batch_size_per_image: int = 512


@dataclass
class DatasetSplitConfig:
    """A dataset: a catalog ``name`` or an explicit (``json``, ``images``) pair."""

    name: str = ""
    json: str = ""
    images: str = ""
    # false: annotations with a non-positive box or a degenerate segmentation are
    # dropped with a warning instead of stopping the run
    strict: bool = True


@dataclass
class DetDataConfig:
    train: DatasetSplitConfig = field(default_factory=DatasetSplitConfig)
    test: DatasetSplitConfig = field(default_factory=DatasetSplitConfig)
    image_size: int = 1024  # large-scale-jitter crop size
    min_scale: float = 0.1
    max_scale: float = 2.0
    hflip: bool = True


@dataclass
class TestConfig:
    eval_period: int = 0  # evaluate every N iterations (and always at the end); 0 = end only
    batch_size: int = 1
    num_workers: int = 2
    best_metric: str = "segm/AP"  # which number picks model_best.pth


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
