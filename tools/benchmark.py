#!/usr/bin/env python
"""Speed, memory, parameters and FLOPs of the model a config builds.

Tasks:
  pretrain  MAE trainer step (forward + backward + optimizer step): ms/step, images/s, peak memory,
            the optimizer step's own time (optimizer_ms, part of the step) and the activation
            memory autograd keeps for backward (saved_activations_mb, allocator-independent)
  train     detector trainer step (the library's Trainer.train_step): s/iter, peak memory, losses,
            optimizer_ms, saved_activations_mb; with and without activation checkpointing
            (model.backbone.act_checkpoint)
  infer     the Predictor at batch 1 and a larger batch with the mask head exercised (score
            threshold 0, 100 detections per image): s/image, images/s, detections, peak memory
  data      the training data pipeline alone (decode + augment + collate) with --workers W: images/s;
            with detectron2's data code importable, also one worker's mapping against detectron2's
            DatasetMapper on the same images (images/s, peak memory; tools/benchmark_detectron2_data.py)
  ddp       DistributedDataParallel's gradient all-reduce for the config's model with --procs P
            processes (gloo on CPU, NCCL on CUDA); e.g. --compare train.ddp_grad_compression=none,bf16
  reference the same detector in maedet and in detectron2 (when detectron2 is importable), interleaved
            in this process on the same weights and inputs: training step and inference (see
            tools/benchmark_detectron2.py and docs/BENCHMARKS.md)

Examples:
  python tools/benchmark.py --config configs/mae/mae_vit_base_patch16.yaml --task pretrain \\
      --batch-size 8 --amp off --iters 5 --warmup 1 --flops
  python tools/benchmark.py --config configs/coco/mask_rcnn_vit_b_100ep.yaml --task train \\
      --batch-size 1 --amp off --iters 2 --warmup 1 --compare kernels=fast,reference
  python tools/benchmark.py --config configs/coco/mask_rcnn_vit_b_100ep.yaml --task data \\
      --workers 2 data.train.name=coco128
  python tools/benchmark.py --config configs/coco/mask_rcnn_vit_b_100ep.yaml --task train --batch-size 1 \\
      --compare config=configs/coco/mask_rcnn_vit_b_100ep.yaml,configs/coco/cascade_mask_rcnn_vit_b_100ep.yaml

Every measurement is the median of --iters timed runs after --warmup untimed ones.
``--compare KEY=V1,V2`` (or ``--ab``; may repeat: the variants are the product) builds
one model per value in this one process and interleaves their runs, so load changes
hit all variants alike; the ratio to the first variant is printed. ``--isolate`` runs
each variant in a fresh subprocess and also reports ``ru_maxrss``.

Timing: CUDA work is synchronized before each clock read; on CPU the torch thread
count is set (--threads, else train.threads, else torch's default) and reported, and
process CPU time is reported next to wall time. Peak memory: CUDA
``max_memory_allocated`` above the memory before the run; CPU: resident set sampled
every 2 ms (maedet.utils.profiling). FLOPs (--flops): fvcore ``FlopCountAnalysis``
(one multiply-add = one flop) with the reference kernels; on CUDA, --peak-tflops gives
model FLOP utilization = 2 x flops x (3 training, 1 inference) / time / peak.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import os
import resource
import subprocess
import sys
from typing import Any, Dict, List, Sequence, Tuple

from maedet.utils.startup import prepare_process

prepare_process()  # before torch is imported (huge pages for large CPU tensors)

import torch

from maedet import kernels
from maedet.benchmark import pipelines, workloads
from maedet.builders import load_detection_config, load_pretrain_config
from maedet.config.loader import load_yaml_with_bases
from maedet.utils.amp import resolve_amp
from maedet.utils.errors import MaedetError
from maedet.utils.profiling import Meter, median, rss_bytes

TASKS = ("pretrain", "train", "infer", "data", "ddp", "reference")


# ----------------------------------------------------------------------------- configs
def is_pretrain_config(path: str) -> bool:
    keys = set()
    for _, part in load_yaml_with_bases(path):
        keys.update((part.get("model") or {}).keys())
    return "backbone" not in keys and "decoder_depth" in keys


@functools.cache
def _sibling(name: str) -> Any:
    """A module of tools/ beside this file (the detectron2 comparisons live there, outside
    the installed library, and import detectron2 only when run)."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_cfg(args, overrides: Sequence[str]) -> Tuple[Any, str]:
    """The config of a variant with the benchmark's own overrides (sizes, batch, thresholds) first.

    A ``config=PATH`` entry among the overrides replaces ``--config`` (so that
    ``--compare config=A.yaml,B.yaml`` compares two configs, e.g. Mask R-CNN and Cascade).
    """
    path = args.config
    rest = []
    for o in overrides:
        if o.startswith("config="):
            path = o[len("config=") :]
        else:
            rest.append(o)
    overrides = rest
    ov = [f"train.amp={args.amp}"] if args.amp else []
    if is_pretrain_config(path):
        if args.image_size:
            ov += [f"model.img_size={args.image_size}", f"data.input_size={args.image_size}"]
        if args.batch_size:
            ov += ["train.total_batch_size=0", f"train.batch_size={args.batch_size}"]
        return load_pretrain_config(path, ov + list(overrides)), "pretrain"
    if args.image_size:
        s = args.image_size
        ov += [
            f"data.train.pipeline.image_size={s}",
            f"data.test.pipeline.short_edge_length={s}",
            f"data.test.pipeline.max_size={s}",
            f"model.backbone.img_size={s}",
            f"model.neck.square_pad={s}",
        ]
    if args.batch_size and args.task != "infer":
        ov += ["train.total_batch_size=0", f"train.batch_size={args.batch_size}"]
    if args.task in ("infer", "reference") and not args.keep_thresholds:
        ov += ["model.roi_heads.score_thresh=0.0", f"model.roi_heads.detections_per_img={args.detections}"]
    splits = ("train",) if args.task == "data" else ()
    return load_detection_config(path, ov + list(overrides), splits=splits), "detection"


def variants(args) -> List[List[str]]:
    ab = []
    for spec in args.compare:
        if "=" not in spec:
            raise SystemExit(f"error: --compare expects KEY=V1,V2, got {spec!r}")
        key, vals = spec.split("=", 1)
        ab.append((key, vals.split(",")))
    if (
        args.task == "train"
        and args.act_checkpoint_variant
        and not any(k == "model.backbone.act_checkpoint" for k, _ in ab)
    ):
        ab.append(("model.backbone.act_checkpoint", ["false", "true"]))
    if not ab:
        return [[]]
    return [[f"{k}={v}" for (k, _), v in zip(ab, combo)] for combo in itertools.product(*[v for _, v in ab])]


# ----------------------------------------------------------------------------- measuring
def _kernel_setting(variant: List[str]) -> Tuple[List[str], bool]:
    """A variant's config overrides, and its kernels (``kernels=fast|reference``, not a config key)."""
    rest = [v for v in variant if not v.startswith("kernels=")]
    chosen = [v.split("=", 1)[1] for v in variant if v.startswith("kernels=")]
    if any(c not in ("fast", "reference") for c in chosen):
        raise SystemExit(f"error: kernels={chosen[0]!r}: expected fast or reference")
    return rest, (chosen[-1] == "fast") if chosen else kernels.fast_enabled()


def measure(args, device: torch.device, var_list: List[List[str]]) -> List[Dict[str, Any]]:
    settings = [_kernel_setting(v) for v in var_list]
    cfgs = [load_cfg(args, list(args.opts) + v)[0] for v, _ in settings]
    amp = [resolve_amp(c.train.amp, device) for c in cfgs]
    loads = workloads.make_workloads(args.task, cfgs, [" ".join(v) for v in var_list], device, amp, args.infer_batches)

    def variant_of(name: str) -> int:  # a workload is named by its variant, maybe + " batch=N"
        joined = [" ".join(v) for v in var_list]
        return next(i for i, j in enumerate(joined) if name == j or name.startswith(j + " ") or not j)

    fast = {name: settings[variant_of(name)][1] for name, _ in loads}
    meter = Meter(device)
    rec = {name: {"wall": [], "cpu": [], "peak": [], "abs": [], "opt": [], "last": None} for name, _ in loads}
    for r in range(args.warmup + args.iters):
        for name, w in loads:
            with kernels.fast(fast[name]):
                wall, cpu, peak, absolute, res = meter(w.step)
            if res.get("saved_activations_mb") is not None:
                rec[name]["saved"] = res["saved_activations_mb"]  # first run only (the same graph every step)
            if r >= args.warmup:  # warm-up runs allocate lasting state (optimizer moments): not counted
                for key, value in (("wall", wall), ("cpu", cpu), ("peak", peak), ("abs", absolute)):
                    rec[name][key].append(value)
                if "optimizer_ms" in res:
                    rec[name]["opt"].append(res["optimizer_ms"])
            rec[name]["last"] = res
            if args.verbose:
                print(
                    f"  [{'warm-up' if r < args.warmup else 'timed'} {r}] {name}: {wall:.3f} s, "
                    f"cpu {cpu:.2f} s, peak +{peak:.0f} MB",
                    file=sys.stderr,
                    flush=True,
                )
    results = []
    for name, w in loads:
        r = rec[name]
        t = median(r["wall"])
        entry = {
            "variant": name,
            **w.info,
            "iters": len(r["wall"]),
            "warmup": args.warmup,
            "s_per_iter": t,
            "s_per_iter_all": r["wall"],
            "cpu_s_per_iter": median(r["cpu"]),
            "peak_mem_mb": max(r["peak"]),
            "peak_mem_abs_mb": max(r["abs"]),
            "peak_mem_kind": (
                "cuda max_memory_allocated" if device.type == "cuda" else "sampled RSS above the RSS before the run"
            ),
            "images_per_s": w.batch / t,
        }
        if r["opt"]:
            entry["optimizer_ms"] = median(r["opt"])  # part of s_per_iter
        if "saved" in r:
            entry["saved_activations_mb"] = r["saved"]
        if args.task == "pretrain":
            entry.update(ms_per_step=1000 * t, loss=r["last"]["losses"])
        elif args.task == "train":
            entry.update(losses=r["last"]["losses"])
        else:
            entry.update(
                s_per_image=t / w.batch,
                detections_per_image=r["last"]["detections"],
                mask_shape=r["last"]["mask_shapes"],
            )
        if args.flops or args.params:
            entry.update(workloads.parameter_counts(w.model))
        results.append(entry)
    if args.flops:
        fl = loads[0][1].flops()
        for e in results:
            e.update(fl)
            if device.type == "cuda" and args.peak_tflops and e["s_per_iter"]:
                per = fl.get("flops_full_inference_g") or fl.get("flops_per_image_g")
                mult = 3 if args.task in ("train", "pretrain") else 1
                e["mfu"] = 2 * per * 1e9 * mult * e["batch_size"] / e["s_per_iter"] / (args.peak_tflops * 1e12)
                e["mfu_note"] = (
                    f"2 x fvcore flops x {mult} x batch / time / {args.peak_tflops} TFLOP/s "
                    "(training: RoI-head flops at inference proposal counts, an estimate)"
                )
    return results


def run_isolated(args, var_list: List[List[str]]) -> List[Dict[str, Any]]:
    """One fresh subprocess per variant; adds ru_maxrss-based peak memory."""
    results = []
    for var in var_list:
        cmd = [sys.executable, os.path.abspath(__file__), "--_child"] + child_argv(args) + list(args.opts) + var
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stderr)
            raise SystemExit(f"error: variant {var} failed (exit {p.returncode})")
        for e in json.loads(p.stdout.strip().splitlines()[-1]):
            e["variant"] = " ".join(var + ([e["variant"]] if e["variant"] != "default" else [])) or "default"
            results.append(e)
    return results


def child_argv(args) -> List[str]:
    a = [
        "--config",
        args.config,
        "--task",
        args.task,
        "--device",
        args.device,
        "--iters",
        str(args.iters),
        "--warmup",
        str(args.warmup),
        "--infer-batches",
        ",".join(str(b) for b in args.infer_batches),
        "--detections",
        str(args.detections),
    ]
    for flag, val in (
        ("--amp", args.amp),
        ("--batch-size", args.batch_size),
        ("--image-size", args.image_size),
        ("--threads", args.threads),
        ("--peak-tflops", args.peak_tflops),
    ):
        if val:
            a += [flag, str(val)]
    for flag, on in (
        ("--flops", args.flops),
        ("--params", args.params),
        ("--keep-thresholds", args.keep_thresholds),
        ("--verbose", args.verbose),
        ("--no-act-checkpoint-variant", not args.act_checkpoint_variant),
    ):
        if on:
            a.append(flag)
    return a


def _ddp_worker(rank: int, world: int, port: int, args, var: List[str], out_q) -> None:
    import torch.distributed as dist

    pipelines.ddp_environment(port)
    device = torch.device("cuda", rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(max(1, (args.threads or os.cpu_count() or 1) // world))
        cfg, kind = load_cfg(args, list(args.opts) + var)
        res = pipelines.ddp_probe(cfg, kind, device, args.warmup, args.iters)
        per_rank = [None] * world
        dist.all_gather_object(per_rank, res)
        if rank == 0:
            comp = cfg.train.ddp_grad_compression
            out_q.put(
                {
                    "variant": " ".join(var) or "default",
                    "procs": world,
                    "backend": dist.get_backend(),
                    "params_m": res["numel"] / 1e6,
                    "ddp_grad_compression": comp,
                    "ddp_bucket_view": bool(cfg.train.ddp_bucket_view),
                    "allreduce_mb_per_iter": res["numel"] * (2 if comp != "none" else 4) / 2**20,
                    "iters": args.iters,
                    "warmup": args.warmup,
                    "s_per_iter": max(median(x["wall"]) for x in per_rank),  # the slowest rank
                    "s_per_iter_all": [x["wall"] for x in per_rank],
                    "peak_mem_mb": max(x["peak"] for x in per_rank),
                    "peak_mem_since_wrap_mb": max(x["peak_since_wrap"] for x in per_rank),
                    "note": "probe loss: every parameter gets a gradient at almost no compute, so the time "
                    "is DDP's bucketing + all-reduce (+ compression hook)",
                }
            )
    finally:
        dist.destroy_process_group()


def run_ddp(args) -> List[Dict[str, Any]]:
    """One group of --procs fresh processes per variant (so memory is per variant)."""
    import torch.multiprocessing as mp

    if args.device == "cuda" and torch.cuda.device_count() < args.procs:
        raise SystemExit(f"error: --procs {args.procs} needs as many GPUs, found {torch.cuda.device_count()}")
    results = []
    for var in variants(args):
        q = mp.get_context("spawn").Queue()
        mp.start_processes(
            _ddp_worker,
            args=(args.procs, pipelines.free_port(), args, var, q),
            nprocs=args.procs,
            start_method="spawn",
            join=True,
        )
        results.append(q.get(timeout=60))
    return results


# ----------------------------------------------------------------------------- output
def run_reference(args, cfg: Any, device: torch.device) -> Any:
    """Timing interleaved in this process; peak memory of each framework and task in a fresh one."""
    reference = _sibling("benchmark_detectron2")

    amp = resolve_amp(cfg.train.amp, device)
    if args._child:  # one memory measurement: --memory-of FRAMEWORK:TASK
        framework, task = args.memory_of.split(":")
        return {"peak_mem_mb": reference.peak_memory(cfg, framework, task, amp, args.instances)}
    results = reference.compare(
        cfg,
        device,
        args.iters,
        args.warmup,
        amp=amp,
        instances=args.instances,
        verbose=args.verbose,
        flops=args.flops,
    )
    if args.no_memory:
        return results
    for r in results:
        cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--memory-of", f"{r['framework']}:{r['task']}"]
        cmd += child_argv(args) + ["--instances", str(args.instances)] + list(args.opts)
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stderr[-3000:])
            raise SystemExit(f"error: memory measurement of {r['framework']} {r['task']} failed (exit {p.returncode})")
        r["peak_mem_mb"] = json.loads(p.stdout.strip().splitlines()[-1])["peak_mem_mb"]
        r["peak_mem_kind"] = "fresh process, 2 runs: peak RSS above the RSS after building the model"
        if args.verbose:
            print(f"  memory {r['framework']} {r['task']}: +{r['peak_mem_mb']:.0f} MB", file=sys.stderr, flush=True)
    return results


def print_rows(cols: List[str], rows: List[List[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(cols, *rows)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(row, widths)))


def print_table(results: List[Dict[str, Any]], task: str, meta: Dict[str, Any]) -> None:
    print(
        f"# task={task} device={meta['device']} threads={meta['threads']} torch={meta['torch']} load={meta['loadavg']}"
    )
    if task == "data":
        r = results[0]
        print(f"{r['pipeline']}\nworkers={r['workers']} batch={r['batch_size']}: {r['images_per_s']:.2f} images/s")
        d = r["decode"]
        if d["images"]:
            rates = ", ".join(f"{k} {v:.1f}" for k, v in d["images_per_s"].items())
            print(f"decode only, 1 thread, {d['images']} images ({d['megapixels']:.1f} MPix): {rates} images/s")
        ref = r.get("detectron2")
        if isinstance(ref, str):
            print(f"detectron2 comparison skipped: {ref}")
        elif ref:
            print(
                f"one worker's mapping (decode + LSJ + targets), {ref['images']} images x {ref['rounds']} rounds, "
                "alternating per image:"
            )
            print("| | images/s | s/image | peak memory alone | instances kept |")
            print("| --- | --- | --- | --- | --- |")
            for k in ("maedet", "detectron2"):
                print(
                    f"| {k} | {ref['images_per_s'][k]:.2f} | {ref['s_per_image'][k]:.4f} |"
                    f" {ref['peak_mem_mb'][k]:.0f} MB | {ref['instances'][k]} |"
                )
            speed = ref["images_per_s"]["maedet"] / ref["images_per_s"]["detectron2"]
            mem = ref["peak_mem_mb"]["maedet"] / max(ref["peak_mem_mb"]["detectron2"], 1e-9)
            print(f"maedet / detectron2: throughput {speed:.2f}x, peak memory {mem:.2f}x")
        return
    if task == "ddp":
        base = results[0]["s_per_iter"]
        print(f"{results[0]['procs']} processes ({results[0]['backend']}), {results[0]['params_m']:.2f} M parameters")
        print_rows(
            ["variant", "ms/iter", "ratio", "all-reduce MB", "peak MB (run)", "peak MB (since DDP wrap)"],
            [
                [
                    r["variant"],
                    f"{1000 * r['s_per_iter']:.0f}",
                    f"{r['s_per_iter'] / base:.3f}",
                    f"{r['allreduce_mb_per_iter']:.0f}",
                    f"{r['peak_mem_mb']:.0f}",
                    f"{r['peak_mem_since_wrap_mb']:.0f}",
                ]
                for r in results
            ],
        )
        return
    base = results[0]["s_per_iter"]
    rows = []
    for r in results:
        if task == "pretrain":
            extra = f"{r['ms_per_step']:.0f} ms/step"
        elif task == "train":
            extra = " ".join(f"{k}={v:.3f}" for k, v in r["losses"].items())
        elif task == "infer":
            extra = f"{r['s_per_image']:.3f} s/image, detections {r['detections_per_image']}"
        else:
            extra = r.get("what", "")
        if "optimizer_ms" in r:
            extra += f", optimizer {r['optimizer_ms']:.0f} ms"
        if "saved_activations_mb" in r:
            extra += f", saved for backward {r['saved_activations_mb']:.0f} MB"
        if "peak_mem_isolated_mb" in r:
            extra += f", ru_maxrss +{r['peak_mem_isolated_mb']:.0f} MB"
        rows.append(
            [
                r["variant"],
                f"{r['s_per_iter']:.3f}",
                f"{r['cpu_s_per_iter']:.2f}",
                f"{r['s_per_iter'] / base:.3f}",
                f"{r['peak_mem_mb']:.0f}",
                extra,
            ]
        )
    print_rows(["variant", "s/iter", "cpu s", "ratio", "peak MB", "extra"], rows)
    for k in sorted(results[0]):
        if k.startswith(("params_", "flops_", "mfu")):
            v = results[0][k]
            print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--iters", type=int, default=5, help="timed runs per variant (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first")
    p.add_argument(
        "--amp", choices=("auto", "bf16", "fp16", "off"), default=None, help="default: the config's train.amp"
    )
    p.add_argument("--json", metavar="OUT", help="write the results as JSON here")
    p.add_argument("--batch-size", type=int, default=0, help="pretrain/train/data batch (default: the config's)")
    p.add_argument("--image-size", type=int, default=0, help="input side (default: the config's)")
    p.add_argument("--infer-batches", default="1,2", help="infer: batch sizes to measure (default 1,2)")
    p.add_argument("--detections", type=int, default=100, help="infer: detections per image forced (threshold 0)")
    p.add_argument("--keep-thresholds", action="store_true", help="infer: keep the config's threshold / max dets")
    p.add_argument("--workers", type=int, default=2, help="data: DataLoader workers")
    p.add_argument("--decode-images", type=int, default=50, help="data: images for the decoder comparison (0: skip)")
    p.add_argument(
        "--mapper-images",
        type=int,
        default=50,
        help="data: images mapped by maedet and by detectron2's DatasetMapper, alternating (0: skip)",
    )
    p.add_argument("--procs", type=int, default=2, help="ddp: processes (GPUs with --device cuda)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: train.threads or torch's)")
    p.add_argument(
        "--compare",
        "--ab",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="measure each value in one process, interleaved (repeatable: product of values)",
    )
    p.add_argument(
        "--no-act-checkpoint-variant",
        dest="act_checkpoint_variant",
        action="store_false",
        help="train: skip the automatic act_checkpoint=false,true comparison",
    )
    p.add_argument("--instances", type=int, default=2, help="reference: instances in the training image")
    p.add_argument("--no-memory", action="store_true", help="reference: skip the peak-memory processes")
    p.add_argument("--memory-of", default="", help=argparse.SUPPRESS)
    p.add_argument(
        "--flops",
        action="store_true",
        help="fvcore FLOPs and parameters; reference: matrix-product FLOPs, this machine's GEMM rate, and one "
        "profiled run split between matrix products and everything else",
    )
    p.add_argument("--params", action="store_true", help="fvcore parameter counts")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="CUDA: device peak TFLOP/s for MFU")
    p.add_argument("--isolate", action="store_true", help="one fresh subprocess per variant (ru_maxrss memory)")
    p.add_argument("--verbose", action="store_true", help="print every run")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("opts", nargs="*", metavar="KEY=VALUE", help="config overrides")
    a = p.parse_intermixed_args(argv)
    a.infer_batches = [int(x) for x in str(a.infer_batches).split(",") if x]
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is available")
    try:
        opts, fast = _kernel_setting(list(args.opts))  # kernels=fast|reference is the process switch
        kernels.set_fast(fast)
        args.opts = opts
        probe_cfg, kind = load_cfg(args, args.opts)
        threads = args.threads or probe_cfg.train.threads
        if threads > 0:
            torch.set_num_threads(threads)
        torch.manual_seed(0)
        meta = {
            "task": args.task,
            "config": args.config,
            "overrides": list(args.opts),
            "kernels": "fast" if kernels.fast_enabled() else "reference",
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "cpu_count": os.cpu_count(),
        }
        if args.task == "data":
            results = [pipelines.run_data(probe_cfg, kind, args.workers, args.warmup, args.iters, args.decode_images)]
            if kind == "detection" and args.mapper_images > 0:
                data_reference = _sibling("benchmark_detectron2_data")
                why = data_reference.detectron2_data_status()
                results[0]["detectron2"] = why or data_reference.compare_mappers(
                    probe_cfg, args.mapper_images, args.iters
                )
        elif args.task == "ddp":
            results = run_ddp(args)
        elif args.task == "reference":
            results = run_reference(args, probe_cfg, device)
        elif args.isolate and not args._child:
            results = run_isolated(args, variants(args))
        else:
            rss0 = rss_bytes()
            results = measure(args, device, [[]] if args._child else variants(args))
            if args._child and device.type == "cpu":
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                for r in results:
                    r["peak_mem_isolated_mb"] = (peak - rss0) / 2**20
                    r["peak_mem_isolated_note"] = "ru_maxrss minus RSS before the model was built (this variant alone)"
    except MaedetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args._child:
        print(json.dumps(results))
        return 0
    meta["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    if args.task == "reference":
        reference = _sibling("benchmark_detectron2")

        r0 = results[0]
        print(
            f"# reference: {args.config} amp={r0['amp']} threads={meta['threads']} load={meta['loadavg']}"
            f" -> {meta['loadavg_end']}; median of {len(r0['s_per_iter_all'])} interleaved runs; "
            f"same weights (pyramid max |diff| {r0['pyramid_max_abs_diff']:.1e})"
        )
        print("\n".join(reference.format_comparison(results)))
    else:
        print_table(results, args.task, meta)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
