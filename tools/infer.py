#!/usr/bin/env python
"""Segment images with a trained ViTDet Mask R-CNN: pictures with the instances drawn
on them, and/or the detections as a COCO results JSON.

Examples:
  python tools/infer.py --config configs/quickstart/mask_rcnn_vit_tiny.yaml \\
      --weights output/quickstart/det/model_final.pth --input "datasets/toy/val/*.jpg" \\
      --output output/quickstart/pictures --json output/quickstart/pictures/results.json
  python tools/infer.py --config C --weights W --input photos/ more/a.jpg --output out/ --device cuda --amp bf16
  python tools/infer.py --config C --weights W model.min_size=800 --input val2017/ \\
      --coco-json annotations/instances_val2017.json --json results.json

Inputs (--input, one or more): image files, folders (searched recursively for
jpg/jpeg/png/webp/bmp) and glob patterns (expanded here, so quoting them is fine;
"**" matches sub-folders). Files matched by a folder or a pattern must have an image
extension; a file named explicitly is always tried. Duplicates are processed once.

--output DIR: one PNG per image, named after the image (<stem>.png; <stem>_1.png,
<stem>_2.png, ... when several inputs share a stem), the same size as the image,
with translucent masks, boxes and "class score" tags.

--json FILE: a JSON list of detections in the COCO results format (image_id,
category_id, bbox [x, y, w, h], score, segmentation as compressed RLE) where each
record also has "file_name" (the input path). image_id is the image's id in
--coco-json when given and the image is listed there (matched on the path's
trailing components, e.g. "val2017/0001.jpg"); otherwise the image's 1-based
position in the list of inputs (after the largest id of --coco-json, if any).
With --coco-json the file can be scored directly with pycocotools' COCO.loadRes.
The file is written atomically once all images are done.

An unreadable image, or one too large for the memory left, is reported (one line
naming it and why) and skipped; the run goes on with the next file. The last line sums
up: images, failures, detections, images with none, and where the files are. Exit code: 0 all
images done, 1 some failed, 2 bad arguments / config / checkpoint or no input matched.

Images are read with their EXIF orientation applied (as viewers show them); masks
are pasted only for the detections above --score-thresh, a few at a time, so memory
stays flat in the photo's size (docs/RELIABILITY.md).

Config overrides (KEY=VALUE, e.g. model.min_size=800) go before --input.
"""

import argparse
import glob
import json
import os
import sys

from maedet.utils.startup import prepare_process

prepare_process()  # before torch is imported (huge pages for large CPU tensors)

from maedet.data.images import IMAGE_EXTENSIONS, read_coco_image_entries
from maedet.engine.launch import check_writable_dir, run_tool
from maedet.utils.errors import ConfigError, DatasetError, MaedetError


def _is_image_name(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(root: str):
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            if _is_image_name(name):
                found.append(os.path.join(dirpath, name))
    return found


def expand_inputs(items):
    """Files, folders and glob patterns -> (ordered unique paths, patterns/folders that matched nothing).

    A path named explicitly that does not exist is kept (it is reported as a failed
    image later) unless it is a glob pattern.
    """
    paths, unmatched, seen = [], [], set()

    def add(p):
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            paths.append(p)

    for item in items:
        before = len(paths)
        if os.path.isdir(item):
            for p in _walk_images(item):
                add(p)
        elif os.path.isfile(item) or not glob.has_magic(item):
            add(item)
        else:
            for m in sorted(glob.glob(item, recursive=True)):
                if os.path.isdir(m):
                    for p in _walk_images(m):
                        add(p)
                elif os.path.isfile(m) and _is_image_name(m):
                    add(m)
        if len(paths) == before and not os.path.isfile(item):
            unmatched.append(item)
    return paths, unmatched


def _coco_image_ids(coco_json: str):
    """{normalized file_name: image id} of a COCO json, and the largest id."""
    ids = {
        os.path.normpath(img["file_name"]).replace(os.sep, "/"): int(img["id"])
        for img in read_coco_image_entries(coco_json, need_id=True)
    }
    return ids, max(ids.values(), default=0)


def _match_coco_id(path: str, ids) -> "int | None":
    parts = os.path.normpath(os.path.abspath(path)).replace(os.sep, "/").split("/")
    for k in range(len(parts), 0, -1):  # longest trailing match first
        hit = ids.get("/".join(parts[-k:]))
        if hit is not None:
            return hit
    return None


def _is_out_of_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "can't allocate memory" in text


def _unique_png_name(path: str, used) -> str:
    stem = os.path.splitext(os.path.basename(path))[0] or "image"
    name, k = f"{stem}.png", 0
    while name.lower() in used:
        k += 1
        name = f"{stem}_{k}.png"
    used.add(name.lower())
    return name


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="FILE", help="detection YAML config")
    p.add_argument("--weights", required=True, metavar="FILE", help="detection checkpoint (model_final.pth)")
    p.add_argument(
        "--input",
        required=True,
        nargs="+",
        metavar="PATH",
        help="image files, folders (recursive) and/or glob patterns",
    )
    p.add_argument("--output", default=None, metavar="DIR", help="write one PNG visualization per image here")
    p.add_argument("--json", default=None, metavar="FILE", help="write the detections as COCO results JSON")
    p.add_argument(
        "--coco-json", default=None, metavar="FILE", help="COCO annotation file whose image ids are used in --json"
    )
    p.add_argument("--score-thresh", type=float, default=0.5, help="keep instances with score >= this (0.5)")
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: auto)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass (default 1)")
    p.add_argument(
        "--amp",
        default="off",
        choices=["off", "auto", "bf16", "fp16"],
        help="autocast dtype (auto: bf16 on GPUs that support it, fp16 on older GPUs, off on CPU)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="mask overlay opacity (default 0.5)")
    p.add_argument(
        "opts",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. model.min_size=800 (put them before --input)",
    )
    return p.parse_args(argv)


def main(args) -> int:
    from tqdm import tqdm

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0.0 <= args.score_thresh <= 1.0:
        raise ConfigError(f"--score-thresh {args.score_thresh} is outside the allowed range [0, 1]")
    if not 0.0 <= args.alpha <= 1.0:
        raise ConfigError(f"--alpha {args.alpha} is outside the allowed range [0, 1]")
    if not args.output and not args.json:
        raise ConfigError("nothing to write: give --output DIR and/or --json FILE")
    paths, unmatched = expand_inputs(args.input)
    if not any(os.path.isfile(p) for p in paths):
        raise DatasetError(
            "no input image matched "
            + ", ".join(repr(i) for i in args.input)
            + f" (expected image files, folders or glob patterns; extensions {'/'.join(IMAGE_EXTENSIONS)})"
        )
    for item in unmatched:
        if os.path.isdir(item) or glob.has_magic(item):
            print(f"warning: --input {item!r} matched no image", file=sys.stderr, flush=True)
    coco_ids, max_coco_id = ({}, 0)
    if args.coco_json:
        coco_ids, max_coco_id = _coco_image_ids(args.coco_json)
    if args.output:
        check_writable_dir(args.output)
    if args.json:
        check_writable_dir(os.path.dirname(os.path.abspath(args.json)))

    from maedet.builders import build_predictor
    from maedet.data.images import read_image_rgb
    from maedet.evaluation.coco import instances_to_coco_json
    from maedet.inference import draw_instances, save_visualization
    from maedet.utils.fileio import atomic_write_text

    predictor = build_predictor(
        args.config, args.weights, device=args.device, amp=args.amp, score_thresh=args.score_thresh, overrides=args.opts
    )
    records, failed, used_names, without = [], [], set(), []
    unknown_ids = detections = 0

    def image_id_for(index: int, path: str) -> int:
        nonlocal unknown_ids
        if args.coco_json:
            hit = _match_coco_id(path, coco_ids)
            if hit is not None:
                return hit
            unknown_ids += 1
            return max_coco_id + index + 1
        return index + 1

    def report(path: str, err: Exception) -> None:
        msg = str(err)
        if path not in msg:
            msg = f"{path}: {msg}"
        failed.append(path)
        bar.write(f"failed: {msg}", file=sys.stderr)

    def run(batch):
        """The predictions of a batch, or None (each image reported) when it does not fit in memory."""
        try:
            return predictor([img for _, _, img in batch], return_rle=True)
        except (MemoryError, RuntimeError) as e:
            if not _is_out_of_memory(e):
                raise
            for _, path, img in batch:
                h, w = img.shape[:2]
                report(path, MaedetError(f"{path}: out of memory for a {w}x{h} image; skipped"))
            return None

    def flush(batch) -> None:
        nonlocal detections
        if not batch:
            return
        outs = run(batch)
        for (index, path, img), out in zip(batch, outs or []):
            detections += len(out["scores"])
            if len(out["scores"]) == 0:
                without.append(path)
            try:
                if args.json:
                    recs = instances_to_coco_json(
                        image_id_for(index, path),
                        out["boxes"],
                        out["scores"],
                        out["labels"],
                        label_to_cat_id=predictor.label_to_cat_id,
                        rles=out.get("masks_rle"),
                    )
                    for r in recs:
                        r["file_name"] = path
                    records.extend(recs)
                if args.output:
                    vis = draw_instances(
                        img,
                        out["boxes"],
                        out["scores"],
                        out["labels"],
                        predictor.class_names,
                        masks=out.get("masks_rle"),
                        alpha=args.alpha,
                    )
                    save_visualization(os.path.join(args.output, _unique_png_name(path, used_names)), vis)
            except MaedetError as e:
                report(path, e)
        bar.update(len(batch))

    batch = []
    with tqdm(total=len(paths), unit="img", desc="infer", dynamic_ncols=True, file=sys.stderr) as bar:
        for index, path in enumerate(paths):
            try:
                img = read_image_rgb(path)
            except DatasetError as e:
                report(path, e)
                bar.update(1)
                continue
            batch.append((index, path, img))
            if len(batch) >= args.batch_size:
                flush(batch)
                batch = []
        flush(batch)

    if args.json:
        atomic_write_text(args.json, json.dumps(records))
    if unknown_ids:
        print(
            f"warning: {unknown_ids} images are not listed in {args.coco_json}; they got ids above {max_coco_id}",
            file=sys.stderr,
        )
    if without:
        print(
            f"no detection above --score-thresh {args.score_thresh} in: {', '.join(without[:5])}"
            + (f" and {len(without) - 5} more" if len(without) > 5 else ""),
            flush=True,
        )
    where = [f"pictures in {args.output}"] if args.output else []
    where += [f"detections in {args.json}"] if args.json else []
    print(
        f"{len(paths)} images, {len(failed)} failed, {detections} detections, {len(without)} images with none"
        + (f"; {', '.join(where)}" if where else ""),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    a = parse_args()
    run_tool(lambda: main(a))
