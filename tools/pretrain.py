#!/usr/bin/env python
"""Masked-autoencoder pretraining of a ViT on unlabeled images.

Examples:
  python tools/pretrain.py --config configs/quickstart/mae_tiny.yaml
  python tools/pretrain.py --config configs/mae/mae_vit_base_patch16.yaml data.root=/data/images
  python tools/pretrain.py --config configs/mae/mae_vit_base_patch16.yaml --num-gpus 8
  torchrun --nproc_per_node 8 tools/pretrain.py --config configs/mae/mae_vit_base_patch16.yaml
  python tools/pretrain.py --config C --output-dir D --resume      # continue an interrupted run

Batch rule (as tools/train_net.py): train.total_batch_size > 0 is the global batch,
split over the processes; with 0, train.batch_size is per process.

The output directory receives config.yaml, log.txt, metrics.jsonl, tb/ (tensorboard),
model_XXXXXXX.pth checkpoints with a last_checkpoint pointer, vis/ reconstructions,
and encoder_final.pth: the encoder for tools/train_net.py (model.backbone.pretrained).
"""

from maedet.utils.startup import prepare_process

prepare_process()  # before torch is imported (huge pages for large CPU tensors)

from maedet.builders import load_pretrain_config, run_pretraining
from maedet.engine.launch import default_argument_parser, launch, setup_run
from maedet.utils import distributed as du


def main(args) -> int:
    overrides = list(args.opts) + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
    cfg = load_pretrain_config(args.config, overrides)
    device = setup_run(
        cfg, args.config, cfg.train.device, cfg.train.seed, cfg.train.threads, args.resume, args.overwrite
    )
    run_pretraining(cfg, device, resume=args.resume)
    du.destroy_distributed()
    return 0


def parse_args(argv=None):
    return default_argument_parser(__doc__).parse_intermixed_args(argv)


if __name__ == "__main__":
    a = parse_args()
    launch(main, a.num_gpus, (a,))
