#!/usr/bin/env python
"""Masked-autoencoder pretraining of a ViT on unlabeled images.

Examples:
  python tools/pretrain.py --config configs/quickstart/mae_tiny.yaml
  python tools/pretrain.py --config configs/mae/mae_vit_base_patch16.yaml data.root=/data/images
  torchrun --nproc_per_node 8 tools/pretrain.py --config configs/mae/mae_vit_base_patch16.yaml
  python tools/pretrain.py --config C --output-dir D --resume      # continue an interrupted run

The output directory receives config.yaml, log.txt, metrics.jsonl, tb/ (tensorboard),
model_XXXXXXX.pth checkpoints with a last_checkpoint pointer, vis/ reconstructions,
and encoder_final.pth: the encoder for tools/train_net.py (model.backbone.pretrained).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maedet.config import PretrainConfig, load_config  # noqa: E402
from maedet.engine import distributed as du  # noqa: E402
from maedet.engine.launch import default_argument_parser, run_tool, setup_run  # noqa: E402


def main() -> int:
    args = default_argument_parser(__doc__).parse_intermixed_args()
    overrides = list(args.opts)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    cfg = load_config(args.config, overrides, PretrainConfig)
    device = setup_run(cfg, args.config, cfg.train.device, cfg.train.seed, cfg.train.threads)
    from maedet.engine.pretrain import run_pretraining

    run_pretraining(cfg, device, resume=args.resume)
    du.destroy_distributed()
    return 0


if __name__ == "__main__":
    run_tool(main)
