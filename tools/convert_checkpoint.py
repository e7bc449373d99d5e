#!/usr/bin/env python
"""Convert checkpoints between maedet, the official MAE release, timm and detectron2's ViTDet.

Usage:
  python tools/convert_checkpoint.py --from FORMAT --to FORMAT IN OUT [options]

Formats:
  mae              official MAE pretrain release / maedet encoder_final.pth (in, out)
  maedet-pretrain  maedet pretraining training checkpoint, with decoder and optimizer (in)
  timm             timm VisionTransformer state dict, e.g. vit_base_patch16_224.mae (in, out)
  d2-vitdet        detectron2 ViTDet Mask R-CNN, .pth or model-zoo .pkl (by extension) (in, out)
  maedet-det       maedet detection checkpoint, model_final.pth (in, out)

Supported: {mae, maedet-pretrain, timm} -> {mae, timm}; maedet-det <-> d2-vitdet.

Examples:
  # official MAE ViT-B -> timm state dict for 384x384 inputs
  python tools/convert_checkpoint.py --from mae --to timm mae_pretrain_vit_base.pth vit_b_384.pth --img-size 384
  # official MAE ViT-H/14 -> a /16 encoder (patch kernel resized, grid kept)
  python tools/convert_checkpoint.py --from mae --to mae mae_pretrain_vit_huge.pth vit_h_p16.pth --patch-size 16
  # detectron2 model zoo ViTDet-B -> maedet, with COCO class names
  python tools/convert_checkpoint.py --from d2-vitdet --to maedet-det model_final_61ccd1.pkl vitdet_b.pth \\
      --class-names coco --arch vit_base
  # maedet detection -> detectron2 (.pkl numpy form; .pth for a torch file)
  python tools/convert_checkpoint.py --from maedet-det --to d2-vitdet output/det/model_final.pth d2_model.pkl

Prints a table of loaded / missing / unexpected / dropped / changed keys. The output
is written atomically, and only when the conversion succeeded. Exit code 0 on
success; 2 with one "error: ..." line naming the file and key otherwise.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maedet.checkpoint.convert import (  # noqa: E402
    FORMATS,
    INPUT_FORMATS,
    OUTPUT_FORMATS,
    PATCH_RESIZE_METHODS,
    convert_checkpoint,
)
from maedet.engine.launch import run_tool  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert checkpoints between maedet, MAE, timm and detectron2 ViTDet.",
        epilog="formats:\n" + "\n".join(f"  {k:<16} {v}" for k, v in FORMATS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--from", dest="src_format", required=True, choices=INPUT_FORMATS, help="input format")
    p.add_argument("--to", dest="dst_format", required=True, choices=OUTPUT_FORMATS, help="output format")
    p.add_argument("input", metavar="IN", help="input checkpoint file")
    p.add_argument("output", metavar="OUT", help="output file (d2-vitdet: .pkl = numpy model-zoo form, else .pth)")
    p.add_argument("--arch", default=None, metavar="NAME",
                   help="expected architecture, checked key by key: vit_tiny|vit_base|vit_large|vit_huge, "
                        "optionally _patchN (e.g. vit_huge_patch14); default: read off the checkpoint")
    p.add_argument("--img-size", type=int, default=None, metavar="N",
                   help="encoder outputs: image side of the position table (grid N / patch); default: keep the grid")
    p.add_argument("--patch-size", type=int, default=None, metavar="P",
                   help="encoder outputs: patch size (e.g. 16 for an MAE ViT-H/14); the kernel is resized")
    p.add_argument("--patch-resize", default="pi", choices=PATCH_RESIZE_METHODS,
                   help="kernel resize method: pi = FlexiViT pseudo-inverse (exact on upsampled patches, default), "
                        "bicubic = resize the kernel like an image, scaled by p^2/P^2")
    p.add_argument("--class-names", default=None, metavar="coco|FILE",
                   help="--to maedet-det: class names to store in meta: 'coco' or a COCO-format json")
    p.add_argument("--allow-missing", action="store_true",
                   help="write the output even if the input lacks keys (listed in the report)")
    p.add_argument("--trust", "--trust-checkpoint", dest="trust", action="store_true",
                   help="read the input with weights_only=False (arbitrary unpickling; only for trusted files)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = convert_checkpoint(
        args.input, args.src_format, args.dst_format, args.output,
        trust=args.trust, arch=args.arch, img_size=args.img_size, patch_size=args.patch_size,
        patch_resize=args.patch_resize, class_names=args.class_names, allow_missing=args.allow_missing,
    )
    print(result.report.table(), flush=True)
    print(f"wrote {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    run_tool(main)
