#!/usr/bin/env python
"""Convert checkpoints between maedet, the official MAE release, timm and detectron2's ViTDet.

Usage:
  python tools/convert_checkpoint.py --inspect FILE
  python tools/convert_checkpoint.py --from FORMAT --to FORMAT IN OUT [options]

--inspect says what a file is: its format (official MAE release with or without the
decoder, MAE training checkpoint, maedet pretraining / encoder / detection, detectron2
ViTDet, timm), the model (size, patch and image size, parameters), what the file stores
(norm_pix_loss, classes, iteration) and the commands that convert or use it.

Formats:
  mae              official MAE pretrain release / maedet encoder_final.pth (in, out)
  maedet-pretrain  maedet pretraining training checkpoint, with decoder and optimizer (in)
  timm             timm VisionTransformer state dict, .pth or .safetensors (in, out)
  d2-vitdet        detectron2 ViTDet (Cascade) Mask R-CNN, .pth or model-zoo .pkl (by extension) (in, out)
  maedet-det       maedet detection checkpoint, model_final.pth (in, out)

Supported: {mae, maedet-pretrain, timm} -> {mae, timm}; maedet-det <-> d2-vitdet.

The architecture of a detectron2 checkpoint is not stored in it: give --config, the
maedet config of the same model (its model section; e.g. configs/coco/mask_rcnn_vit_b_100ep.yaml
or configs/coco/cascade_mask_rcnn_vit_b_100ep.yaml). A file converted from maedet carries
its config and needs none. For encoders, --config (an MAE or detection config) checks
every tensor against that architecture; without it the checkpoint's own shapes are used.

Examples:
  # official MAE ViT-B -> timm state dict for 384x384 inputs
  python tools/convert_checkpoint.py --from mae --to timm mae_pretrain_vit_base.pth vit_b_384.pth --img-size 384
  # official MAE ViT-H/14 -> a /16 encoder (patch kernel resized, grid kept)
  python tools/convert_checkpoint.py --from mae --to mae mae_pretrain_vit_huge.pth vit_h_p16.pth --patch-size 16
  # detectron2 model zoo ViTDet-B -> maedet, with COCO class names
  python tools/convert_checkpoint.py --from d2-vitdet --to maedet-det model_final_61ccd1.pkl vitdet_b.pth \\
      --config configs/coco/mask_rcnn_vit_b_100ep.yaml --class-names coco
  # maedet detection -> detectron2 (.pkl numpy form; .pth for a torch file)
  python tools/convert_checkpoint.py --from maedet-det --to d2-vitdet output/det/model_final.pth d2_model.pkl

Prints a table of loaded / missing / unexpected / dropped / changed keys. The output
is written atomically, and only when the conversion succeeded. Exit code 0 on
success; 2 with one "error: ..." line naming the file and key otherwise.
"""

import argparse

from maedet.builders.convert import conversion_options
from maedet.checkpoint.convert import FORMATS, INPUT_FORMATS, OUTPUT_FORMATS, convert_checkpoint
from maedet.checkpoint.describe import describe_checkpoint
from maedet.checkpoint.formats.mae import PATCH_RESIZE_METHODS
from maedet.checkpoint.io import load_checkpoint_file
from maedet.engine.launch import run_tool


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Convert checkpoints between maedet, MAE, timm and detectron2 ViTDet.",
        epilog="formats:\n" + "\n".join(f"  {k:<16} {v}" for k, v in FORMATS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--inspect", metavar="FILE", default=None, help="describe FILE and exit (nothing is written)")
    p.add_argument("--from", dest="src_format", choices=INPUT_FORMATS, help="input format")
    p.add_argument("--to", dest="dst_format", choices=OUTPUT_FORMATS, help="output format")
    p.add_argument("input", metavar="IN", nargs="?", help="input checkpoint file")
    p.add_argument(
        "output", metavar="OUT", nargs="?", help="output file (d2-vitdet: .pkl = numpy model-zoo form, else .pth)"
    )
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help="maedet config of the architecture (detection: needed for a detectron2 input; "
        "encoders: every tensor is checked against it)",
    )
    p.add_argument(
        "--img-size",
        type=int,
        default=None,
        metavar="N",
        help="encoder outputs: image side of the position table (grid N / patch); default: keep the grid",
    )
    p.add_argument(
        "--patch-size",
        type=int,
        default=None,
        metavar="P",
        help="encoder outputs: patch size (e.g. 16 for an MAE ViT-H/14); the kernel is resized",
    )
    p.add_argument(
        "--patch-resize",
        default="pi",
        choices=PATCH_RESIZE_METHODS,
        help="kernel resize method: pi = FlexiViT pseudo-inverse (exact on upsampled patches, default), "
        "bicubic = resize the kernel like an image, scaled by p^2/P^2",
    )
    p.add_argument(
        "--class-names",
        default=None,
        metavar="coco|FILE",
        help="--to maedet-det: class names to store in meta: 'coco' or a COCO-format json",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="write the output even if the input lacks keys (listed in the report)",
    )
    p.add_argument(
        "--trust",
        "--trust-checkpoint",
        dest="trust",
        action="store_true",
        help="read the input with weights_only=False (arbitrary unpickling; only for trusted files)",
    )
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.inspect is not None:
        if args.src_format or args.dst_format or args.input or args.output:
            parser.error("--inspect FILE takes no --from / --to / IN / OUT")
        print(describe_checkpoint(args.inspect, trust=args.trust).table(), flush=True)
        return 0
    missing = [name for name, v in (("--from", args.src_format), ("--to", args.dst_format)) if not v]
    missing += [name for name, v in (("IN", args.input), ("OUT", args.output)) if not v]
    if missing:
        parser.error(f"converting needs {', '.join(missing)} (or use --inspect FILE)")
    obj = load_checkpoint_file(args.input, map_location="cpu", weights_only=not args.trust)
    options = conversion_options(
        obj,
        args.input,
        args.src_format,
        args.dst_format,
        args.config,
        img_size=args.img_size,
        patch_size=args.patch_size,
        patch_resize=args.patch_resize,
        class_names=args.class_names,
        allow_missing=args.allow_missing,
    )
    result = convert_checkpoint(
        obj, args.src_format, args.dst_format, args.output, options=options, source_name=args.input
    )
    print(result.report.table(), flush=True)
    print(f"wrote {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    run_tool(main)
