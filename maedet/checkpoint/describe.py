"""What a checkpoint file is: its format, model, training state and what it can become.

:func:`describe_checkpoint` reads a file (or a loaded object) and returns a
:class:`CheckpointInfo`: the format (official MAE release with or without its
decoder, an MAE training checkpoint, maedet's pretraining / encoder / detection
files, detectron2 ViTDet, timm, torchvision ResNet), the architecture read off
the tensors (width, depth, patch and image size), what the file itself stores
(``norm_pix_loss``, classes, iteration) and, for each conversion in
:data:`maedet.checkpoint.convert.CONVERSIONS`, the command that does it.
``tools/convert_checkpoint.py --inspect FILE`` prints it; weight loaders put
:meth:`CheckpointInfo.summary` into their errors, so a wrong file says what it is.

Only what the file stores is reported: a value the file does not hold is
"not stored", never guessed.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch
import yaml

from maedet.checkpoint.convert import CONVERSIONS
from maedet.checkpoint.io import checkpoint_object
from maedet.checkpoint.report import meta_of, unwrap_state_dict
from maedet.models.backbones.vit import BLOCK_RE
from maedet.models.pos_embed import count_prefix_tokens
from maedet.utils.errors import CheckpointError

__all__ = ["CheckpointInfo", "describe_checkpoint", "describe_for_error"]

# (width, depth) -> (size name, heads) of the standard ViTs.
_VIT_SIZES = {
    (192, 12): ("Ti", 3),
    (384, 12): ("S", 6),
    (768, 12): ("B", 12),
    (1024, 24): ("L", 16),
    (1280, 32): ("H", 16),
}
_NOT_STORED = "not stored in the file"


@dataclass
class CheckpointInfo:
    """What a checkpoint is (see the module docstring).

    Attributes:
        source: the file (or "<state dict>").
        kind: short name: ``mae-encoder``, ``mae-full``, ``mae-train``, ``maedet-encoder``,
            ``maedet-pretrain``, ``maedet-det``, ``d2-vitdet``, ``timm``, ``torchvision-resnet``
            or ``unknown``.
        title: what the file is, in words.
        convert_from: its ``--from`` name for ``tools/convert_checkpoint.py`` (None: not convertible).
        fields: ordered name -> value lines (model, parameters, patch size, classes, ...).
        uses: how to use it and what it converts to, as commands.
    """

    source: str
    kind: str
    title: str
    convert_from: Optional[str] = None
    fields: Dict[str, str] = field(default_factory=OrderedDict)
    uses: List[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: the title, the model, its heads and classes."""
        parts = [self.title] + [self.fields[k] for k in ("model", "heads") if k in self.fields]
        if "classes" in self.fields:
            parts.append(self.fields["classes"].split(":")[0].split(" (")[0] + " classes")
        return ", ".join(parts)

    def table(self) -> str:
        """The printable description."""
        width = max([len(k) for k in self.fields] + [6])
        lines = [f"{self.source}: {self.title}"]
        lines += [f"  {k:<{width}}  {v}" for k, v in self.fields.items()]
        if self.uses:
            lines.append("  use / convert:")
            lines += [f"    {u}" for u in self.uses]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _vit(state: Mapping[str, torch.Tensor], prefix: str = "") -> Dict[str, Any]:
    """Width, depth, patch, grid, class token, heads (if standard) and encoder parameters of a ViT."""
    w = state[prefix + "patch_embed.proj.weight"]
    dim, patch = int(w.shape[0]), int(w.shape[-1])
    depth = 1 + max(
        (int(m.group(1)) for m in (BLOCK_RE.match(k[len(prefix) :]) for k in state if k.startswith(prefix)) if m),
        default=-1,
    )
    pos = state.get(prefix + "pos_embed")
    grid, cls = None, None
    if pos is not None and pos.dim() == 3:
        n = int(pos.shape[1])
        cls = count_prefix_tokens(n) == 1
        grid = int(round((n - int(cls)) ** 0.5))
    elif pos is not None and pos.dim() == 4:  # (1, H, W, C)
        grid, cls = int(pos.shape[1]), False
    size, heads = _VIT_SIZES.get((dim, depth), (None, None))
    name = f"ViT-{size}/{patch}" if size else f"ViT/{patch}, width {dim}, depth {depth}"
    encoder = {
        k: v
        for k, v in state.items()
        if k.startswith(prefix) and not k[len(prefix) :].startswith(("decoder", "mask_token", "head.", "fc_norm."))
    }
    return {
        "name": name,
        "dim": dim,
        "depth": depth,
        "patch": patch,
        "grid": grid,
        "cls": cls,
        "heads": heads,
        "params": sum(v.numel() for v in encoder.values()),
    }


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


def _vit_fields(info: CheckpointInfo, vit: Dict[str, Any], meta: Mapping[str, Any], what: str = "encoder") -> None:
    f = info.fields
    heads = meta.get("num_heads") or vit["heads"]
    f["model"] = vit["name"] + (f" ({heads} heads)" if heads else "")
    f["parameters"] = f"{_count(vit['params'])} ({what})"
    f["patch size"] = str(vit["patch"])
    if vit["grid"]:
        tok = {True: " + class token", False: ""}[bool(vit["cls"])]
        name = "image size" if what == "encoder" else "pretraining size"
        f[name] = f"{vit['grid'] * vit['patch']} (position table {vit['grid']}x{vit['grid']}{tok})"


def _conversions(info: CheckpointInfo, path: str, config: str) -> None:
    src = info.convert_from
    if src is None:
        return
    for s, dst in CONVERSIONS:
        if s != src or (s == dst and s != "mae"):
            continue
        out = {"mae": "encoder.pth", "timm": "vit_timm.safetensors", "maedet-det": "model_maedet.pth"}.get(
            dst, "out.pkl"
        )
        extra = " [--img-size N] [--patch-size P]" if dst in ("mae", "timm") else ""
        if (s, dst) == ("d2-vitdet", "maedet-det"):
            extra = f" --config {config} --class-names coco|COCO_JSON"
        info.uses.append(f"to {dst}: python tools/convert_checkpoint.py --from {s} --to {dst} {path} {out}{extra}")


def _coco_config(vit: Optional[Dict[str, Any]], cascade: bool) -> str:
    """The shipped COCO config of a standard ViTDet size, else a placeholder."""
    size = _VIT_SIZES.get((vit["dim"], vit["depth"]), (None,))[0] if vit else None
    epochs = {"B": "100ep", "L": "100ep", "H": "75ep"}.get(size or "")
    if not epochs:
        return "CONFIG_OF_THE_SAME_MODEL"
    return f"configs/coco/{'cascade_' if cascade else ''}mask_rcnn_vit_{size.lower()}_{epochs}.yaml"


def _classes(info: CheckpointInfo, meta: Mapping[str, Any], num_classes: Optional[int]) -> None:
    names = meta.get("class_names")
    if names:
        shown = ", ".join(str(n) for n in names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
        info.fields["classes"] = f"{len(names)}: {shown}"
    elif num_classes is not None:
        info.fields["classes"] = f"{num_classes} (names {_NOT_STORED})"


def _config_beside(source: str) -> Dict[str, Any]:
    """The ``config.yaml`` a maedet run wrote beside its checkpoints ({} if none / unreadable)."""
    path = os.path.join(os.path.dirname(os.path.abspath(source)), "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, yaml.YAMLError):
        return {}


def _detector_fields(
    info: CheckpointInfo, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
) -> Dict[str, Any]:
    """Backbone, heads and parameters of a detector; returns ``num_classes``, ``vit``, ``cascade``."""
    prefix = "backbone.net."
    vit = _vit(state, prefix) if prefix + "patch_embed.proj.weight" in state else None
    if vit:
        _vit_fields(info, vit, {}, "backbone")
    backbone = (
        ((meta.get("model_config") or {}).get("backbone") or {})
        if isinstance(meta.get("model_config"), Mapping)
        else {}
    )
    if backbone.get("img_size"):
        info.fields["input size"] = f"{backbone['img_size']} (model_config stored in the file)"
    preds = [k.split(".") for k in state if k.startswith("roi_heads.box_predictor.")]
    stages = {p[2] for p in preds if p[2].isdigit()}
    mask = any(k.startswith(("roi_heads.mask_head.", "roi_heads.mask_predictor.")) for k in state)
    kind = "Mask R-CNN" if mask else "Faster R-CNN (no mask head: box-only)"
    info.fields["heads"] = f"Cascade {kind}, {len(stages)} stages" if stages else kind
    total = f"{_count(sum(v.numel() for v in state.values()))} (whole detector"
    info.fields["parameters"] = total + (f"; ViT {_count(vit['params'])})" if vit else ")")
    cls = next(
        (v for k, v in state.items() if k.startswith("roi_heads.box_predictor.") and k.endswith("cls_score.weight")),
        None,
    )
    return {"num_classes": None if cls is None else int(cls.shape[0]) - 1, "vit": vit, "cascade": bool(stages)}


def _iteration(info: CheckpointInfo, obj: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    it = obj.get("iter", obj.get("iteration", meta.get("iter")))
    if it is not None:
        info.fields["iteration"] = str(int(it))
    if "epoch" in obj:
        info.fields["epoch"] = str(obj["epoch"])
    if isinstance(obj.get("optimizer"), Mapping):
        info.fields["training state"] = "optimizer state included (a training checkpoint)"


def describe_checkpoint(src: Any, source: Optional[str] = None, trust: bool = False) -> CheckpointInfo:
    """Describe a checkpoint file or loaded object (see the module docstring).

    Args:
        src: a path (``.pth``, ``.pkl``, ``.safetensors``) or a loaded checkpoint object.
        source: the name of a loaded ``src`` in the output.
        trust: read the file with arbitrary unpickling (only for trusted files).
    Raises:
        CheckpointError: unreadable file (the loader's message), or not a dictionary.
    """
    source, obj = checkpoint_object(src, source, trust)
    try:
        state = unwrap_state_dict(obj, source)
    except CheckpointError:
        state = OrderedDict()
    meta = meta_of(obj)
    wrapped = isinstance(obj.get("model"), Mapping)
    keys = list(state)
    info = CheckpointInfo(source, "unknown", "not a checkpoint format maedet knows")
    config = "CONFIG_OF_THE_SAME_MODEL"

    if any(k.startswith("proposal_generator.") for k in keys):
        info.kind, info.convert_from = "d2-vitdet", "d2-vitdet"
        zoo = " (model-zoo .pkl)" if source.endswith(".pkl") else ""
        info.title = f"detectron2 ViTDet detector{zoo}"
        if isinstance(obj.get("maedet"), Mapping):
            info.title += ", written by maedet"
            meta = dict(obj["maedet"].get("meta") or {})
        det = _detector_fields(info, state, meta)
        _classes(info, meta, det["num_classes"])
        _iteration(info, obj, meta)
        config = _coco_config(det["vit"], det["cascade"])
    elif any(k.startswith(("rpn.", "roi_heads.")) for k in keys):
        info.kind, info.convert_from = "maedet-det", "maedet-det"
        training = isinstance(obj.get("optimizer"), Mapping)
        info.title = "maedet detection " + ("training checkpoint" if training else "model")
        det = _detector_fields(info, state, meta)
        _classes(info, meta, meta.get("num_classes") or det["num_classes"])
        _iteration(info, obj, meta)
        if training and _config_beside(source):
            info.fields["config"] = "config.yaml beside the file (the run's resolved config)"
        if meta.get("converted_from"):
            info.fields["converted from"] = str(meta["converted_from"])
        info.uses.append(f"evaluate: python tools/train_net.py --config CONFIG --eval-only model.weights={source}")
        info.uses.append(f"infer: python tools/infer.py --config CONFIG --weights {source} --input IMAGES")
    elif "patch_embed.proj.weight" in state:
        vit = _vit(state)
        decoder = any(k.startswith("decoder_") for k in keys)
        fmt = meta.get("format")
        args = obj.get("args")
        if fmt == "maedet-mae-encoder":
            info.kind, info.convert_from = "maedet-encoder", "mae"
            info.title = "maedet MAE encoder (tools/pretrain.py output, the official MAE layout)"
            if meta.get("converted_from"):
                info.title = "MAE-layout encoder written by tools/convert_checkpoint.py"
                info.fields["converted from"] = f"{meta['converted_from']} ({meta.get('source_format', '?')})"
        elif isinstance(obj.get("optimizer"), Mapping) and "iter" in obj:
            info.kind, info.convert_from = "maedet-pretrain", "maedet-pretrain"
            info.title = "maedet MAE pretraining checkpoint (encoder + decoder + optimizer)"
        elif args is not None or "epoch" in obj:
            info.kind, info.convert_from = "mae-train", "mae"
            info.title = "official MAE training checkpoint (main_pretrain.py: model, optimizer, epoch, args)"
        elif wrapped and decoder:
            info.kind, info.convert_from = "mae-full", "mae"
            info.title = "official MAE release with its decoder (encoder + decoder)"
        elif wrapped and any(k.startswith("head.") for k in keys):
            info.kind, info.convert_from = "mae-finetuned", "mae"
            info.title = "official MAE fine-tuned classifier (encoder + head)"
        elif wrapped:
            info.kind, info.convert_from = "mae-encoder", "mae"
            info.title = "official MAE release, encoder only"
        else:
            info.kind, info.convert_from = "timm", "timm"
            info.title = "timm VisionTransformer state dict"
        _vit_fields(info, vit, meta)
        if decoder:
            dec = state.get("decoder_embed.weight")
            depth = 1 + max((int(k.split(".")[1]) for k in keys if k.startswith("decoder_blocks.")), default=-1)
            if dec is not None:
                info.fields["decoder"] = f"width {int(dec.shape[0])}, depth {depth}"
        norm_pix = meta.get("norm_pix_loss")
        if norm_pix is None and args is not None:
            norm_pix = getattr(args, "norm_pix_loss", None)
            ratio = getattr(args, "mask_ratio", None)
            if ratio is not None:
                info.fields["mask ratio"] = str(ratio)
        if norm_pix is None and info.kind == "maedet-pretrain":
            model_cfg = _config_beside(source).get("model") or {}
            norm_pix = model_cfg.get("norm_pix_loss")
            if "mask_ratio" in model_cfg:
                info.fields["mask ratio"] = f"{model_cfg['mask_ratio']} (config.yaml beside the file)"
        if meta.get("mask_ratio") is not None:
            info.fields["mask ratio"] = str(meta["mask_ratio"])
        info.fields["norm_pix_loss"] = _NOT_STORED if norm_pix is None else str(bool(norm_pix)).lower()
        _iteration(info, obj, meta)
        info.uses.append(f"start a detector from it: model.backbone.pretrained={source}")
    elif any(k.startswith("layer1.0.conv1.") for k in keys) and "conv1.weight" in state:
        info.kind = "torchvision-resnet"
        blocks = [
            1 + max((int(k.split(".")[1]) for k in keys if k.startswith(f"layer{i}.")), default=-1) for i in range(1, 5)
        ]
        info.title = "torchvision ResNet state dict"
        info.fields["model"] = f"ResNet, blocks per stage {blocks}"
        info.fields["parameters"] = _count(sum(v.numel() for v in state.values()))
        info.uses.append(f"start a ResNet detector from it: model.backbone.pretrained={source}")
    else:
        sample = ", ".join(keys[:4]) if keys else ", ".join(str(k) for k in list(obj)[:4])
        info.fields["keys"] = f"{len(keys)} tensors; first: {sample or 'none'}"
    _conversions(info, source, config)
    return info


def describe_for_error(obj: Any, source: str) -> str:
    """``"; the file is: <summary>; <first use>"`` for a loader's error message (empty when the
    object cannot be described)."""
    try:
        info = describe_checkpoint(obj, source)
    except Exception:  # noqa: BLE001 - never let the description hide the original error
        return ""
    hint = f"; {info.uses[0]}" if info.uses and info.kind != "maedet-det" else ""
    return f"; the file is: {info.summary()}{hint}"
