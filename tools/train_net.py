#!/usr/bin/env python
"""Train or evaluate a ViTDet (Cascade) Mask R-CNN on COCO or any COCO-format dataset.

Examples:
  python tools/train_net.py --config configs/quickstart/mask_rcnn_vit_tiny.yaml
  python tools/train_net.py --config configs/coco/mask_rcnn_vit_b_100ep.yaml --num-gpus 8 \\
      model.backbone.pretrained=output/mae_vit_base_patch16/encoder_final.pth
  torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
      tools/train_net.py --config configs/coco/mask_rcnn_vit_b_100ep.yaml
  python tools/train_net.py --config C --output-dir D --resume               # continue a run
  python tools/train_net.py --config C --eval-only model.weights=D/model_final.pth   # writes D/eval/

Batch rule: train.total_batch_size is the global batch, split over the processes, so
a recipe is unchanged by the number of GPUs; with train.total_batch_size=0,
train.batch_size is per process and solver.lr (if unset) scales with the total batch.
"""

from maedet.utils.startup import prepare_process

prepare_process()  # before torch is imported (huge pages for large CPU tensors)

from maedet.builders import load_detection_config, run_detection_training, run_evaluation
from maedet.engine.launch import default_argument_parser, free_subdir, launch, setup_run
from maedet.utils import distributed as du


def main(args) -> int:
    overrides = list(args.opts) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    cfg = load_detection_config(args.config, overrides, splits=("test",) if args.eval_only else ("train", "test"))
    if args.eval_only:  # its own folder (eval/, eval_2/, ...): a training run's files are never touched
        du.init_distributed(cfg.train.device)
        eval_dir = du.all_gather_object(free_subdir(cfg.output_dir, "eval") if du.get_rank() == 0 else None)[0]
        cfg = load_detection_config(args.config, overrides + [f"output_dir={eval_dir}"], splits=("test",))
    device = setup_run(
        cfg, args.config, cfg.train.device, cfg.train.seed, cfg.train.threads, args.resume, args.overwrite
    )
    if args.eval_only:
        run_evaluation(cfg, device)
    else:
        run_detection_training(cfg, device, resume=args.resume)
    du.destroy_distributed()
    return 0


def parse_args(argv=None):
    p = default_argument_parser(__doc__)
    p.add_argument("--eval-only", action="store_true", help="evaluate model.weights on data.test and exit")
    return p.parse_intermixed_args(argv)


if __name__ == "__main__":
    a = parse_args()
    launch(main, a.num_gpus, (a,))
