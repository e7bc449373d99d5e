"""detectron2 ViTDet (Cascade) Mask R-CNN checkpoints: ``.pth`` (``{"model": tensors}``) or
the model zoo's ``.pkl`` (``{"model": numpy arrays, "__author__": ...}``).

Keys map one to one (``docs/CHECKPOINTS.md`` has the table): the backbone
(``backbone.net.*``, ``backbone.simfp_*``) is unchanged; the RPN, box and mask heads
are renamed between detectron2's modules and torchvision's; a cascade head's
stage ``s`` lives under ``roi_heads.box_head.{s}`` / ``roi_heads.box_predictor.{s}``
in both. Class layouts differ: detectron2's ``cls_score`` has background as the
last class (first here); its class-specific ``bbox_pred`` has K x 4 rows
((K + 1) x 4 here, the background rows unused) and its mask predictor K channels
(K + 1 here). The unused background rows of a maedet model are kept in the
detectron2 file under ``maedet.background`` so that converting back is exact.
"""

from __future__ import annotations

import pickle
import re
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch

from maedet.checkpoint.io import atomic_save
from maedet.checkpoint.report import Report, shape_of, to_tensor
from maedet.utils.errors import CheckpointError
from maedet.utils.fileio import atomic_write

__all__ = ["maedet_key_to_d2", "d2_key_to_maedet", "maedet_det_to_d2", "d2_to_maedet_det", "write_d2", "head_layout"]

# detectron2 GeneralizedRCNN buffers persisted by older versions; maedet normalizes in the model.
D2_DROP = ("pixel_mean", "pixel_std")
_S = r"(?:(\d+)\.)?"  # optional cascade stage
# Each kind of tensor: (maedet key, detectron2 key) patterns; their groups are the
# cascade stage (when present), the layer index and weight/bias.
_PATTERNS = {
    "rpn_conv": (
        r"rpn\.head\.conv\.(\d+)\.0\.(weight|bias)",
        r"proposal_generator\.rpn_head\.conv\.(?:conv(\d+)\.)?(weight|bias)",
    ),
    "rpn_cls": (
        r"rpn\.head\.cls_logits\.(weight|bias)",
        r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)",
    ),
    "rpn_box": (r"rpn\.head\.bbox_pred\.(weight|bias)", r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)"),
    "box_conv": (
        r"roi_heads\.box_head\." + _S + r"(\d+)\.0\.(weight|bias)",
        r"roi_heads\.box_head\." + _S + r"conv(\d+)\.(weight|bias)",
    ),
    "box_norm": (
        r"roi_heads\.box_head\." + _S + r"(\d+)\.1\.(weight|bias)",
        r"roi_heads\.box_head\." + _S + r"conv(\d+)\.norm\.(weight|bias)",
    ),
    "box_fc": (
        r"roi_heads\.box_head\." + _S + r"(\d+)\.(weight|bias)",
        r"roi_heads\.box_head\." + _S + r"fc(\d+)\.(weight|bias)",
    ),
    "mask_conv": (
        r"roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)",
        r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)",
    ),
    "mask_norm": (
        r"roi_heads\.mask_head\.(\d+)\.1\.(weight|bias)",
        r"roi_heads\.mask_head\.mask_fcn(\d+)\.norm\.(weight|bias)",
    ),
    "mask_deconv": (
        r"roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)",
        r"roi_heads\.mask_head\.deconv\.(weight|bias)",
    ),
    "mask_logits": (
        r"roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)",
        r"roi_heads\.mask_head\.predictor\.(weight|bias)",
    ),
}
_RE = {name: re.compile(ours) for name, (ours, _) in _PATTERNS.items()}
_RE.update({f"d2_{name}": re.compile(theirs) for name, (_, theirs) in _PATTERNS.items()})
# Same name on both sides (cascade stages included).
_RE["predictor"] = re.compile(r"roi_heads\.box_predictor\." + _S + r"(cls_score|bbox_pred)\.(weight|bias)")
_BACKBONE_RE = re.compile(r"backbone\.(net\.|simfp_\d+\.)")


def _stage(m: re.Match, cascade: bool) -> Optional[str]:
    """The ``"{s}."`` prefix of a cascade key, "" for a standard key, None on a mismatch."""
    s = m.group(1)
    if cascade != (s is not None):
        return None
    return f"{s}." if s is not None else ""


def _box_fc_to_d2(m: re.Match, box: int, cascade: bool) -> Optional[str]:
    st = _stage(m, cascade)
    j = int(m.group(2)) - box - 1  # Sequential index after the convs and Flatten; (Linear, ReLU) pairs
    if st is None or j < 0 or j % 2:
        return None
    return f"roi_heads.box_head.{st}fc{j // 2 + 1}.{m.group(3)}"


def _box_layer_to_d2(kind: str) -> Callable:
    def rename(m: re.Match, box: int, rpn: int, cascade: bool) -> Optional[str]:
        st, i = _stage(m, cascade), int(m.group(2))
        if st is None or i >= box:
            return None
        return f"roi_heads.box_head.{st}conv{i + 1}.{'norm.' if kind == 'norm' else ''}{m.group(3)}"

    return rename


def _box_layer_from_d2(kind: str) -> Callable:
    def rename(m: re.Match, box: int, cascade: bool) -> Optional[str]:
        st, i = _stage(m, cascade), int(m.group(2))
        if st is None or i < 1:
            return None
        return f"roi_heads.box_head.{st}{i - 1}.{'1' if kind == 'norm' else '0'}.{m.group(3)}"

    return rename


def _predictor(m: re.Match, *args) -> Optional[str]:
    return None if _stage(m, args[-1]) is None else m.group(0)


# (pattern, rename) pairs, first match wins; rename returns the new key or None (no counterpart).
_TO_D2 = [
    (
        "rpn_conv",
        lambda m, box, rpn, c: (
            "proposal_generator.rpn_head.conv." + (f"conv{m.group(1)}." if rpn > 1 else "") + m.group(2)
        ),
    ),
    ("rpn_cls", lambda m, box, rpn, c: f"proposal_generator.rpn_head.objectness_logits.{m.group(1)}"),
    ("rpn_box", lambda m, box, rpn, c: f"proposal_generator.rpn_head.anchor_deltas.{m.group(1)}"),
    ("box_conv", _box_layer_to_d2("conv")),
    ("box_norm", _box_layer_to_d2("norm")),
    ("box_fc", lambda m, box, rpn, c: _box_fc_to_d2(m, box, c)),
    ("predictor", _predictor),
    ("mask_conv", lambda m, box, rpn, c: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.{m.group(2)}"),
    ("mask_norm", lambda m, box, rpn, c: f"roi_heads.mask_head.mask_fcn{int(m.group(1)) + 1}.norm.{m.group(2)}"),
    ("mask_deconv", lambda m, box, rpn, c: f"roi_heads.mask_head.deconv.{m.group(1)}"),
    ("mask_logits", lambda m, box, rpn, c: f"roi_heads.mask_head.predictor.{m.group(1)}"),
]
_FROM_D2 = [
    ("d2_rpn_conv", lambda m, box, c: f"rpn.head.conv.{int(m.group(1) or 0)}.0.{m.group(2)}"),
    ("d2_rpn_cls", lambda m, box, c: f"rpn.head.cls_logits.{m.group(1)}"),
    ("d2_rpn_box", lambda m, box, c: f"rpn.head.bbox_pred.{m.group(1)}"),
    ("d2_box_norm", _box_layer_from_d2("norm")),
    ("d2_box_conv", _box_layer_from_d2("conv")),
    (
        "d2_box_fc",
        lambda m, box, c: (
            None
            if _stage(m, c) is None or int(m.group(2)) < 1
            else f"roi_heads.box_head.{_stage(m, c)}{box + 1 + 2 * (int(m.group(2)) - 1)}.{m.group(3)}"
        ),
    ),
    ("predictor", _predictor),
    ("d2_mask_norm", lambda m, box, c: f"roi_heads.mask_head.{int(m.group(1)) - 1}.1.{m.group(2)}"),
    ("d2_mask_conv", lambda m, box, c: f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}"),
    ("d2_mask_deconv", lambda m, box, c: f"roi_heads.mask_predictor.conv5_mask.{m.group(1)}"),
    ("d2_mask_logits", lambda m, box, c: f"roi_heads.mask_predictor.mask_fcn_logits.{m.group(1)}"),
]


def _rename(key: str, table, *args) -> Optional[str]:
    if _BACKBONE_RE.match(key):
        return key
    for name, rename in table:
        m = _RE[name].fullmatch(key)
        if m:
            return rename(m, *args)
    return None


def maedet_key_to_d2(key: str, num_box_convs: int, num_rpn_convs: int = 2, cascade: bool = False) -> Optional[str]:
    """detectron2 ViTDet name of a maedet parameter, or None (a slot with no counterpart).

    ``num_box_convs`` places the box head's fc layers (torchvision's ``FastRCNNConvFCHead``
    is a Sequential: convs, Flatten, (Linear, ReLU)...); ``num_rpn_convs == 1`` gives
    detectron2's single-conv name ``rpn_head.conv.weight``; ``cascade``: box heads and
    predictors carry a stage index.
    """
    return _rename(key, _TO_D2, num_box_convs, num_rpn_convs, cascade)


def d2_key_to_maedet(key: str, num_box_convs: int, cascade: bool = False) -> Optional[str]:
    """maedet name of a detectron2 ViTDet parameter, or None."""
    return _rename(key, _FROM_D2, num_box_convs, cascade)


def head_layout(keys: Iterable[str]) -> Tuple[int, int, bool]:
    """(box-head convs per stage, RPN convs, cascade?) of a maedet detection state's keys."""
    keys = list(keys)
    cascade = any(re.fullmatch(r"roi_heads\.box_predictor\.\d+\.cls_score\.weight", k) for k in keys)
    box = {
        int(m.group(2))
        for m in map(_RE["box_conv"].fullmatch, keys)
        if m and (m.group(1) is not None) == cascade and m.group(1) in (None, "0")
    }
    rpn = {int(m.group(1)) for m in map(_RE["rpn_conv"].fullmatch, keys) if m}
    return len(box), len(rpn), cascade


def _is(kind: str, key: str) -> bool:
    m = _RE["predictor"].fullmatch(key)
    if kind in ("cls_score", "bbox_pred"):
        return bool(m) and m.group(2) == kind
    return bool(_RE["mask_logits"].fullmatch(key))


def _to_d2_tensor(key: str, t: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], str]:
    """(detectron2 tensor, background rows removed or None, note) for one maedet tensor."""
    if _is("cls_score", key):
        return torch.cat([t[1:], t[:1]], dim=0), None, "background row moved from first to last"
    if _is("bbox_pred", key) and t.shape[0] > 4:
        return t[4:], t[:4], f"{t.shape[0]} -> {t.shape[0] - 4} rows: background deltas (rows 0-3, unused) removed"
    if _is("mask_logits", key):
        return t[1:], t[:1], f"{t.shape[0]} -> {t.shape[0] - 1} channels: background channel (unused) removed"
    return t, None, ""


def _to_maedet_tensor(
    key: str, t: torch.Tensor, expected: Tuple[int, ...], background: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, str]:
    """maedet tensor (and a note) from a detectron2 tensor; ``expected``: the maedet shape."""
    if _is("cls_score", key):
        return torch.cat([t[-1:], t[:-1]], dim=0), "background row moved from last to first"
    rows = 4 if _is("bbox_pred", key) else 1 if _is("mask_logits", key) else 0
    if not rows or shape_of(t) == tuple(expected):
        return t, ""
    if t.shape[0] == rows:  # class-agnostic detectron2 head: the same prediction for every class
        reps = expected[0] // rows
        return torch.cat([t] * reps, dim=0), f"class-agnostic {rows} rows repeated for the {reps} classes"
    if background is not None and background.shape[1:] == t.shape[1:] and background.shape[0] == rows:
        bg, how = background.to(dtype=t.dtype, device=t.device), "restored from the file's maedet.background"
    else:
        bg, how = t.new_zeros((rows,) + tuple(t.shape[1:])), "zeros"
    kind = "background deltas" if rows == 4 else "background channel"
    return torch.cat([bg, t], dim=0), f"{t.shape[0]} -> {t.shape[0] + rows} rows: unused {kind} prepended ({how})"


def _tensors(state: Mapping[str, Any]) -> OrderedDict[str, torch.Tensor]:
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in state.items():
        t = to_tensor(v)
        if isinstance(k, str) and t is not None:
            out[k[len("module.") :] if k.startswith("module.") else k] = t
    return out


def maedet_det_to_d2(
    state: Mapping[str, torch.Tensor], report: Report, layout: Optional[Mapping[str, torch.Tensor]] = None
) -> Tuple[OrderedDict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """maedet detection state -> detectron2 state (and the unused background rows, maedet names).

    ``layout`` (the model built from its config on the ``meta`` device), when given,
    is checked key by key and shape by shape first.
    """
    state = _tensors(state)
    d2_like = [
        k for k in state if k.startswith("proposal_generator.") or re.match(r"roi_heads\.box_head\.(\d+\.)?conv\d", k)
    ]
    if d2_like:
        raise CheckpointError(
            f"checkpoint {report.source} looks like a detectron2 checkpoint (key '{d2_like[0]}'); use --from d2-vitdet"
        )
    if layout is not None:
        _check(state, {k: shape_of(v) for k, v in layout.items()}, report)
    box, rpn, cascade = head_layout(state)
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    background: Dict[str, torch.Tensor] = OrderedDict()
    for k, t in state.items():
        d2k = maedet_key_to_d2(k, box, rpn, cascade)
        if d2k is None:
            report.unexpected.append(k)
            continue
        t, bg, note = _to_d2_tensor(k, t)
        if bg is not None:
            background[k] = bg
        if note:
            report.changed[d2k] = note
        out[d2k] = t
        report.loaded.append((k, d2k))
    return out, background


def d2_to_maedet_det(
    state: Mapping[str, Any],
    report: Report,
    layout: Mapping[str, torch.Tensor],
    background: Optional[Mapping[str, Any]] = None,
) -> OrderedDict[str, torch.Tensor]:
    """detectron2 state (tensors or numpy arrays) -> maedet state laid out as ``layout``.

    Class-agnostic detectron2 box / mask predictors are repeated per class;
    ``background``: rows a maedet -> detectron2 conversion stored (zeros when absent).
    """
    state = _tensors(state)
    tv_like = [k for k in state if k.startswith(("rpn.head.", "roi_heads.mask_predictor."))]
    if tv_like:
        raise CheckpointError(
            f"checkpoint {report.source} looks like a maedet detection checkpoint "
            f"(key '{tv_like[0]}'); use --from maedet-det"
        )
    box, rpn, cascade = head_layout(layout)
    expected: OrderedDict[str, Tuple[int, ...]] = OrderedDict()
    to_maedet: Dict[str, str] = {}
    for k, t in layout.items():
        d2k = maedet_key_to_d2(k, box, rpn, cascade)
        if d2k is not None:
            expected[d2k] = shape_of(_to_d2_tensor(k, t)[0])
            to_maedet[d2k] = k
    agnostic = {
        d2k: [(1 if _is("mask_logits", k) else 4,) + expected[d2k][1:]]
        for d2k, k in to_maedet.items()
        if _is("bbox_pred", k) or _is("mask_logits", k)
    }
    _check(state, expected, report, drop=D2_DROP, alt_shapes=agnostic)
    bgs = {k: to_tensor(v) for k, v in (background or {}).items()}
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for d2k, mk in to_maedet.items():
        if d2k not in state:
            continue
        t, note = _to_maedet_tensor(mk, state[d2k], shape_of(layout[mk]), bgs.get(mk))
        if note:
            report.changed[mk] = note
        out[mk] = t
        report.loaded.append((d2k, mk))
    return out


def _check(
    state: Mapping[str, torch.Tensor],
    layout: Mapping[str, Tuple[int, ...]],
    report: Report,
    drop=(),
    alt_shapes: Optional[Mapping[str, List[Tuple[int, ...]]]] = None,
) -> None:
    alt_shapes = alt_shapes or {}
    for k, v in state.items():
        if k in drop:
            report.dropped.append(k)
            continue
        exp = layout.get(k)
        if exp is None:
            report.unexpected.append(k)
        elif shape_of(v) != tuple(exp) and shape_of(v) not in alt_shapes.get(k, ()):
            raise CheckpointError(
                f"checkpoint {report.source}: key '{k}' has shape {shape_of(v)}, expected "
                f"{tuple(exp)} for this architecture (other model size or number of classes?)"
            )
    report.missing.extend(k for k in layout if k not in state)


def _numpy_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    if isinstance(obj, Mapping):
        return {k: _numpy_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_numpy_tree(v) for v in obj)
    return obj


def write_d2(obj: Mapping[str, Any], path: str) -> None:
    """Write a detectron2 checkpoint: ``.pkl`` = the model zoo's numpy pickle, else ``torch.save``."""
    if not path.endswith(".pkl"):
        atomic_save(dict(obj), path)
        return
    data = _numpy_tree(obj)
    try:
        # Protocol 4: numpy arrays pickle through numpy's _reconstruct (readable by detectron2
        # and by maedet's numpy-only unpickler); protocol 5 would not.
        atomic_write(path, lambda f: pickle.dump(data, f, protocol=4))
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
