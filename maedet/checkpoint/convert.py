"""Convert checkpoints between maedet, the official MAE release, timm and detectron2's ViTDet.

Formats (:data:`FORMATS`), each read and written by its module in
:mod:`maedet.checkpoint.formats`; every supported pair is one entry of the
:data:`CONVERSIONS` table. Every conversion returns a
:class:`~maedet.checkpoint.report.Report` (loaded / missing / unexpected / dropped /
changed keys) and refuses tensors that do not fit with a
:class:`~maedet.utils.errors.CheckpointError` naming the file and the key; the
output is written atomically and only when the conversion succeeded.

Detection conversions need the architecture: its ``layout`` (the model's
state dict on the ``meta`` device, built from a config by
:func:`maedet.builders.model.detection_layout`), given by the caller.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from maedet.checkpoint.formats import detectron2 as d2
from maedet.checkpoint.formats import mae, maedet, timm
from maedet.checkpoint.io import atomic_save, checkpoint_object, load_checkpoint_file
from maedet.checkpoint.report import Report, meta_of, unwrap_state_dict
from maedet.utils.errors import ConfigError

__all__ = ["FORMATS", "CONVERSIONS", "ConversionResult", "ConversionOptions", "convert_checkpoint"]

FORMATS: Dict[str, str] = {
    "mae": "official MAE / maedet encoder checkpoint {'model': encoder state} (in: with or without decoder; out)",
    "maedet-pretrain": "maedet pretraining checkpoint {'model': full MAE state, 'optimizer', 'iter'} (in)",
    "timm": "timm VisionTransformer state dict, .pth or .safetensors (in; out: num_classes=0, global_pool='token')",
    "d2-vitdet": "detectron2 ViTDet (Cascade) Mask R-CNN, .pth {'model': tensors} or .pkl model-zoo numpy form",
    "maedet-det": "maedet detection checkpoint {'model': state, 'meta'} (in, out)",
}


@dataclass
class ConversionOptions:
    """Options of a conversion (those that do not apply to a pair are refused by :func:`convert_checkpoint`).

    Attributes:
        layout: detection: the maedet model's state dict (``meta`` tensors) to
            convert into / check against.
        model_config: detection: the resolved ``model`` config section stored in
            the output's meta (so the result describes its own architecture).
        expected: encoders: the architecture to check against (``embed_dim``,
            ``depth``, ``patch_size``, ``mlp_ratio``, ``num_heads``, ``name``).
        img_size, patch_size, patch_resize: encoder outputs (see :func:`.formats.mae.convert_vit_encoder`).
        class_names: ``d2-vitdet -> maedet-det``: "coco", a COCO json or K names.
        allow_missing: write the output even when keys are missing.
    """

    layout: Optional[Mapping[str, torch.Tensor]] = None
    model_config: Optional[Dict[str, Any]] = None
    expected: Optional[Dict[str, Any]] = None
    img_size: Optional[int] = None
    patch_size: Optional[int] = None
    patch_resize: str = "pi"
    class_names: Union[str, Sequence[str], None] = None
    allow_missing: bool = False


@dataclass
class ConversionResult:
    """``checkpoint``: the object written (or to write); ``report``: what was done."""

    checkpoint: Any
    report: Report
    write: Callable[[Any, str], None]


def _encoder(src_fmt: str, dst_fmt: str):
    def run(obj: Any, report: Report, opt: ConversionOptions) -> ConversionResult:
        state = mae.read_encoder(obj, report.source, src_fmt)
        enc, info = mae.convert_vit_encoder(
            state,
            report,
            expected=opt.expected,
            img_size=opt.img_size,
            patch_size=opt.patch_size,
            patch_resize=opt.patch_resize,
            allow_missing=opt.allow_missing,
        )
        heads = (opt.expected or {}).get("num_heads")
        report.notes.append(
            f"encoder: embed_dim {info['embed_dim']}, depth {info['depth']}, patch "
            f"{info['patch_size']}, img_size {info['img_size']}"
        )
        if dst_fmt == "timm":
            return ConversionResult(enc, report, timm.write_timm)
        ckpt = mae.encoder_checkpoint(enc, info, obj, heads, converted_from=report.source, source_format=src_fmt)
        return ConversionResult(ckpt, report, atomic_save)

    return run


def _det_to_d2(obj: Any, report: Report, opt: ConversionOptions) -> ConversionResult:
    state, meta = maedet.read_detection(obj, report.source)
    out, background = d2.maedet_det_to_d2(state, report, opt.layout)
    if report.missing and not opt.allow_missing:
        mae.raise_missing(report)
    report.notes.append(
        "unused background rows of bbox_pred / mask_fcn_logits kept under 'maedet.background' "
        "(ignored by detectron2) so that converting back is exact"
    )
    extra: Dict[str, Any] = {"background": background}
    if meta:
        extra["meta"] = copy.deepcopy(meta)
    return ConversionResult({"model": out, "__author__": "maedet", "maedet": extra}, report, d2.write_d2)


def _d2_to_det(obj: Any, report: Report, opt: ConversionOptions) -> ConversionResult:
    if opt.layout is None:
        raise ConfigError(
            f"converting {report.source} needs the architecture: give --config (the maedet "
            "config of the model, e.g. configs/coco/mask_rcnn_vit_b_100ep.yaml)"
        )
    extra = obj.get("maedet") if isinstance(obj, Mapping) and isinstance(obj.get("maedet"), Mapping) else {}
    state = unwrap_state_dict(obj, report.source)
    out = d2.d2_to_maedet_det(state, report, opt.layout, background=extra.get("background"))
    if report.missing and not opt.allow_missing:
        mae.raise_missing(report)
    num_classes = maedet.num_classes_of(out) or 0
    meta: Dict[str, Any] = copy.deepcopy(dict(extra.get("meta") or {}))
    meta.update({"format": maedet.DETECTION_FORMAT, "num_classes": num_classes, "converted_from": report.source})
    if opt.model_config is not None:
        meta["model_config"] = opt.model_config
    meta.update(maedet.class_meta(opt.class_names, num_classes))
    if "class_names" not in meta:
        report.notes.append("no class names stored (pass --class-names coco or a COCO json to add them)")
    return ConversionResult({"model": out, "meta": meta}, report, atomic_save)


# (from, to) -> conversion; the one dispatch table.
CONVERSIONS: Dict[Tuple[str, str], Callable[[Any, Report, ConversionOptions], ConversionResult]] = {
    **{(src, dst): _encoder(src, dst) for src in ("mae", "maedet-pretrain", "timm") for dst in ("mae", "timm")},
    ("maedet-det", "d2-vitdet"): _det_to_d2,
    ("d2-vitdet", "maedet-det"): _d2_to_det,
}
INPUT_FORMATS = tuple(sorted({s for s, _ in CONVERSIONS}))
OUTPUT_FORMATS = tuple(sorted({d for _, d in CONVERSIONS}))


def convert_checkpoint(
    src: Union[str, os.PathLike, Mapping[str, Any]],
    src_format: str,
    dst_format: str,
    dst: Optional[Union[str, os.PathLike]] = None,
    *,
    trust: bool = False,
    options: Optional[ConversionOptions] = None,
    source_name: Optional[str] = None,
) -> ConversionResult:
    """Convert a checkpoint (see the module docstring).

    Args:
        src: input file (``.pth``, ``.pkl``, ``.safetensors``) or a loaded checkpoint object.
        src_format, dst_format: names from :data:`FORMATS`; the pair must be in :data:`CONVERSIONS`.
        dst: output file, written atomically (nothing is written on error); None: only convert.
        trust: read the input with arbitrary unpickling (only for trusted files).
        options: see :class:`ConversionOptions`.
        source_name: how a loaded ``src`` is named in messages (default "<state dict>").
    Raises:
        CheckpointError: unreadable / unsafe input, wrong format, shape mismatch, missing keys.
        ConfigError: unknown formats, an unsupported pair, options that do not apply.
    """
    opt = options or ConversionOptions()
    for fmt, known in ((src_format, INPUT_FORMATS), (dst_format, OUTPUT_FORMATS)):
        if fmt not in known:
            raise ConfigError(f"unknown format {fmt!r}; use one of {', '.join(known)}")
    if (src_format, dst_format) not in CONVERSIONS:
        pairs = ", ".join(f"{a}->{b}" for a, b in CONVERSIONS)
        raise ConfigError(f"conversion {src_format} -> {dst_format} is not supported; supported: {pairs}")
    if opt.patch_resize not in mae.PATCH_RESIZE_METHODS:
        raise ConfigError(f"unknown patch resize method {opt.patch_resize!r}; use one of {mae.PATCH_RESIZE_METHODS}")
    encoder_out = dst_format in ("mae", "timm")
    if not encoder_out and (opt.img_size or opt.patch_size):
        raise ConfigError("--img-size / --patch-size apply to encoder outputs (mae, timm) only")
    if dst is not None and os.fspath(dst).endswith(".safetensors") and dst_format != "timm":
        raise ConfigError("only --to timm can write a .safetensors file (the other formats carry metadata)")
    if opt.class_names is not None and dst_format != "maedet-det":
        raise ConfigError("--class-names applies to --to maedet-det only")
    source, obj = checkpoint_object(src, source_name, trust)
    result = CONVERSIONS[(src_format, dst_format)](obj, Report(source, f"{src_format} -> {dst_format}"), opt)
    if dst is not None:
        path = os.fspath(dst)
        result.write(result.checkpoint, path)
        result.report.destination = path
    return result


def peek_meta(path: str) -> Dict[str, Any]:
    """The ``meta`` of a maedet checkpoint (or ``maedet.meta`` of a converted detectron2 one), {} if none.

    ``torch.save`` files are memory-mapped, so the weights are not read.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy format, .pkl or a bad file: the full loader says what is wrong
        obj = load_checkpoint_file(path, map_location="cpu")
    meta = meta_of(obj)
    if not meta and isinstance(obj, Mapping) and isinstance(obj.get("maedet"), Mapping):
        meta = dict(obj["maedet"].get("meta") or {})
    return meta
