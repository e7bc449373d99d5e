"""Convert checkpoints between maedet, the official MAE release, timm and detectron2's ViTDet.

Formats (``FORMATS``):

``mae``             official MAE pretraining release / maedet ``encoder_final.pth``:
                    ``{"model": encoder state}`` (input also: with the decoder).
                    Output: ``{"model": encoder state, "meta": {...}}``.
``maedet-pretrain`` maedet pretraining training checkpoint ``{"model": full MAE
                    state, "optimizer": ..., "iter": ...}`` (input only).
``timm``            timm ``VisionTransformer`` state dict (``vit_{base,large}_patch16_*``,
                    ``vit_huge_patch14_*``, their ``.mae`` tags). Output: a plain
                    state dict for ``num_classes=0, global_pool="token"`` models.
``d2-vitdet``       detectron2 ViTDet Mask R-CNN: ``.pth`` (``{"model": tensors}``)
                    or the model-zoo ``.pkl`` (``{"model": numpy arrays, "__author__": ...}``).
``maedet-det``      maedet detection checkpoint ``{"model": torchvision MaskRCNN
                    state, "meta": {"num_classes", "class_names", "label_to_cat_id", ...}}``.

Encoder formats (``mae``, ``maedet-pretrain``, ``timm``) share parameter names;
converting between them drops what the target has no place for (decoder,
``mask_token``, ``fc_norm``, ``head``), resizes ``pos_embed`` when the patch grid
changes (class-token slot kept) and resizes the patch kernel when the patch
size changes (:func:`resize_patch_embed`). Detection formats are mapped key by
key (:func:`maedet_key_to_d2`) with detectron2's class layout converted
exactly: ``cls_score`` has background last there and first in torchvision;
``bbox_pred`` has K x 4 rows there and (K + 1) x 4 here (background rows
unused); the mask predictor has K channels there and K + 1 here.

Every conversion returns a :class:`ConversionReport` (loaded / missing /
unexpected / dropped / changed keys) and refuses tensors whose shapes do not fit
the architecture with a :class:`~maedet.errors.CheckpointError` naming the file
and the key. Expected layouts are taken from the real modules (timm's
``VisionTransformer``, :func:`~maedet.models.mask_rcnn.build_vitdet_mask_rcnn`)
built on the ``meta`` device, so nothing large is allocated.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from maedet.checkpoint.io import _RestrictedNumpyUnpickler, atomic_save, load_checkpoint_file
from maedet.checkpoint.pretrained import LoadReport, _map_pos_embed, _prefix_tokens, _unwrap_state
from maedet.errors import CheckpointError, ConfigError
from maedet.fileio import atomic_write

__all__ = [
    "FORMATS",
    "INPUT_FORMATS",
    "OUTPUT_FORMATS",
    "SUPPORTED_CONVERSIONS",
    "PATCH_RESIZE_METHODS",
    "COCO_CATEGORIES",
    "ConversionReport",
    "ConversionResult",
    "convert_checkpoint",
    "load_for_conversion",
    "convert_vit_encoder",
    "maedet_det_to_d2",
    "d2_to_maedet_det",
    "maedet_key_to_d2",
    "d2_key_to_maedet",
    "infer_vitdet_config",
    "maedet_detection_layout",
    "vit_encoder_layout",
    "resize_patch_embed",
    "init_on_meta",
    "parse_arch",
]

FORMATS: Dict[str, str] = {
    "mae": "official MAE / maedet encoder checkpoint {'model': encoder state} (in: with or without decoder; out)",
    "maedet-pretrain": "maedet pretraining checkpoint {'model': full MAE state, 'optimizer', 'iter'} (in)",
    "timm": "timm VisionTransformer state dict (in; out: num_classes=0, global_pool='token')",
    "d2-vitdet": "detectron2 ViTDet Mask R-CNN, .pth {'model': tensors} or .pkl model-zoo numpy form (in, out)",
    "maedet-det": "maedet detection checkpoint {'model': torchvision MaskRCNN state, 'meta'} (in, out)",
}
INPUT_FORMATS = ("mae", "maedet-pretrain", "timm", "d2-vitdet", "maedet-det")
OUTPUT_FORMATS = ("mae", "timm", "d2-vitdet", "maedet-det")
_ENCODER_IN = ("mae", "maedet-pretrain", "timm")
_ENCODER_OUT = ("mae", "timm")
SUPPORTED_CONVERSIONS: Tuple[Tuple[str, str], ...] = tuple(
    [(a, b) for a in _ENCODER_IN for b in _ENCODER_OUT] + [("maedet-det", "d2-vitdet"), ("d2-vitdet", "maedet-det")]
)
PATCH_RESIZE_METHODS = ("pi", "bicubic")

# Keys of MAE / timm checkpoints that an encoder output has no place for.
_ENCODER_DROP_RE = re.compile(r"^(mask_token|decoder_.*|head\..*|head_dist\..*|fc_norm\..*|dist_token|reg_token)$")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
_DET_PREFIXES = ("backbone.", "roi_heads.", "rpn.", "proposal_generator.")
# detectron2 GeneralizedRCNN buffers persisted by older versions; maedet normalizes in the transform.
_D2_DROP = ("pixel_mean", "pixel_std")
# Default number of heads by width (heads do not change any tensor shape of an encoder).
_HEADS_BY_WIDTH = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16}

# COCO 2017 detection categories (id, name), sorted by id: contiguous label i + 1
# (maedet) / i (detectron2) is the i-th entry.
COCO_CATEGORIES: Tuple[Tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"),
    (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"),
    (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
)


# --------------------------------------------------------------------------- report


@dataclass
class ConversionReport:
    """What a conversion did.

    Attributes:
        source: input file (or "<state dict>").
        src_format, dst_format: format names.
        destination: output file, once written.
        loaded: (source key, output key) pairs carried over.
        missing: output keys the source could not provide.
        unexpected: source keys with no place in the output (not written).
        dropped: source keys left out on purpose (decoder, head, pixel_mean ...).
        changed: output key -> what was done to the tensor (resize, class reorder).
        notes: free-form lines (inferred architecture, defaults used).
    """

    source: str
    src_format: str
    dst_format: str
    destination: Optional[str] = None
    loaded: List[Tuple[str, str]] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    changed: "OrderedDict[str, str]" = field(default_factory=OrderedDict)
    notes: List[str] = field(default_factory=list)

    @staticmethod
    def _groups(keys: Sequence[str]) -> str:
        groups = LoadReport.group(list(keys))
        return ", ".join(p + (f" (x{n})" if n > 1 else "") for p, n in groups.items())

    def table(self) -> str:
        """A printable table: counts per category, then the keys behind each non-zero count."""
        head = f"{self.src_format} -> {self.dst_format}: {self.source}"
        if self.destination:
            head += f" -> {self.destination}"
        rows = [
            ("loaded", len(self.loaded), ""),
            ("missing", len(self.missing), self._groups(self.missing)),
            ("unexpected", len(self.unexpected), self._groups(self.unexpected)),
            ("dropped", len(self.dropped), self._groups(self.dropped)),
            ("changed", len(self.changed), ""),
        ]
        lines = [head, "  +------------+-------+", "  | keys       | count |", "  +------------+-------+"]
        for name, n, _ in rows:
            lines.append(f"  | {name:<10} | {n:>5} |")
        lines.append("  +------------+-------+")
        for name, n, keys in rows:
            if n and keys:
                lines.append(f"  {name}: {keys}")
        for k, what in self.changed.items():
            lines.append(f"  changed {k}: {what}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


@dataclass
class ConversionResult:
    """``checkpoint``: the object written (or to write); ``report``: see :class:`ConversionReport`."""

    checkpoint: Any
    report: ConversionReport


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def init_on_meta() -> Iterator[None]:
    """Create every parameter and buffer registered inside the block on the ``meta`` device.

    Constructors run normally (so code that needs real scalars, e.g. drop-path
    schedules, works); each tensor is moved to ``meta`` as it is registered, and
    the weight initializations that follow operate on ``meta`` tensors (no-ops).
    Used to read key / shape layouts of ViT-H models without allocating them.
    """
    from torch.nn.modules.module import (
        register_module_buffer_registration_hook,
        register_module_parameter_registration_hook,
    )

    def param_hook(module, name, param):
        if param is None or param.device.type == "meta":
            return None
        return torch.nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)

    def buffer_hook(module, name, buf):
        if buf is None or buf.device.type == "meta":
            return None
        return buf.to("meta")

    h1 = register_module_parameter_registration_hook(param_hook)
    h2 = register_module_buffer_registration_hook(buffer_hook)
    try:
        yield
    finally:
        h1.remove()
        h2.remove()


def parse_arch(arch: str) -> Tuple[dict, Optional[int]]:
    """``"vit_base"`` / ``"vit_huge_patch14"`` -> (``VIT_PRESETS`` entry, patch size or None)."""
    from maedet.models.vit import VIT_PRESETS

    m = re.fullmatch(r"(vit_[a-z]+)(?:_patch(\d+))?", str(arch))
    if not m or m.group(1) not in VIT_PRESETS:
        known = ", ".join(sorted(VIT_PRESETS))
        raise ConfigError(f"unknown --arch {arch!r}; use one of {known}, optionally with _patchN (e.g. vit_huge_patch14)")
    return dict(VIT_PRESETS[m.group(1)]), (int(m.group(2)) if m.group(2) else None)


def _shape(t: Any) -> Tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def _to_tensor(v: Any) -> Optional[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return v
    if type(v).__module__.startswith("numpy") and hasattr(v, "shape"):
        import numpy as np

        return torch.from_numpy(np.ascontiguousarray(v))
    return None


def _strip_module(state: Mapping[str, Any]) -> "OrderedDict[str, torch.Tensor]":
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, v in state.items():
        if not isinstance(k, str):
            continue
        t = _to_tensor(v)
        if t is None:
            continue
        out[k[len("module."):] if k.startswith("module.") else k] = t
    return out


def _model_dict(obj: Any, source: str) -> Mapping[str, Any]:
    """The tensor dict inside a checkpoint: ``obj["model"]``, ``obj["state_dict"]`` or ``obj``."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {source} is not a dictionary (got {type(obj).__name__})")
    for wk in ("model", "state_dict"):
        inner = obj.get(wk)
        if isinstance(inner, Mapping) and inner:
            return inner
    return obj


class _NumpyUnpicklerWithCodecs(_RestrictedNumpyUnpickler):
    """maedet's numpy-only ``.pkl`` unpickler, plus ``_codecs.encode``: Python 3 pickles
    of protocol <= 2 (e.g. detectron2 model-zoo files) store bytes through it. It only
    turns a str into bytes; PyTorch's weights_only unpickler allows it too."""

    _ALLOWED = _RestrictedNumpyUnpickler._ALLOWED | {("_codecs", "encode")}


def _unsafe_advice(path: str, msg: str) -> CheckpointError:
    detail = msg.split("refusing to unpickle", 1)[1].split(":")[0].strip() if "refusing to unpickle" in msg else ""
    what = f" (it pickles {detail})" if detail else ""
    return CheckpointError(
        f"checkpoint {path} holds Python objects that the safe weights-only loader refuses{what}; "
        "if you trust its source, rerun with --trust (library: trust=True), which unpickles it "
        "with weights_only=False and can run arbitrary code"
    )


def _load_safetensors(path: str) -> Dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"cannot read safetensors checkpoint {path}: {first}") from e


def load_for_conversion(path: str, trust: bool = False) -> Any:
    """Read a checkpoint file (``.pth`` / ``.pkl``) for conversion.

    With ``trust=False`` (default) the file is read with PyTorch's
    ``weights_only=True`` loader, or, for ``.pkl``, an unpickler that accepts
    numpy arrays and plain containers only. A file that needs more is refused
    with a :class:`CheckpointError` that says so and names ``--trust``.
    ``.safetensors`` files (timm's hub format) are read with safetensors.
    """
    if str(path).endswith(".safetensors"):
        return _load_safetensors(path)
    try:
        return load_checkpoint_file(path, map_location="cpu", weights_only=not trust)
    except CheckpointError as e:
        msg = " ".join(str(e).split())
        if trust or not ("refusing to unpickle" in msg or "safe loader refuses" in msg):
            raise
        if not (str(path).endswith(".pkl") and "refusing to unpickle _codecs.encode" in msg):
            raise _unsafe_advice(path, msg) from e
    try:  # a protocol-2 pickle written by Python 3
        with open(path, "rb") as f:
            return _NumpyUnpicklerWithCodecs(f).load()
    except Exception as e:  # noqa: BLE001 - the unpickler raises many types on garbage input
        msg = " ".join(str(e).split())
        if "refusing to unpickle" in msg:
            raise _unsafe_advice(path, msg) from e
        raise CheckpointError(f"cannot read pickle checkpoint {path}: {msg}") from e


# --------------------------------------------------------------------------- patch kernel


def resize_patch_embed(weight: torch.Tensor, patch_size: int, method: str = "pi") -> torch.Tensor:
    """Resize a (C, in_chans, p, p) patch-embedding kernel to (C, in_chans, P, P).

    Methods:
        ``"pi"`` (default): FlexiViT's pseudo-inverse resize (Beyer et al. 2023),
            via ``timm.layers.resample_patch_embed``: with ``B`` the (P^2 x p^2)
            matrix of bicubic (antialiased) resizing of a p x p patch to P x P,
            the new kernel is ``w B^+``. For upsampling (P > p, e.g. 14 -> 16)
            ``B^+ B = I``, so the new kernel applied to the bicubically
            upsampled patch gives exactly the old kernel's response on the
            original patch: a /16 model on an image enlarged by 16/14 computes
            what the /14 model computes on the original image (per patch).
        ``"bicubic"``: the kernel is resized like an image (bicubic,
            ``align_corners=False``) and scaled by p^2 / P^2, so that the
            response to a constant (or slowly varying) patch is preserved
            approximately. Simple, but only approximate.
    Returns:
        tensor of the input's dtype.
    """
    if method not in PATCH_RESIZE_METHODS:
        raise ConfigError(f"unknown patch resize method {method!r}; use one of {PATCH_RESIZE_METHODS}")
    if weight.dim() != 4:
        raise ValueError(f"expected a 4-D patch kernel, got shape {tuple(weight.shape)}")
    old_h, old_w = int(weight.shape[-2]), int(weight.shape[-1])
    if (old_h, old_w) == (patch_size, patch_size):
        return weight
    if method == "pi":
        from timm.layers import resample_patch_embed

        return resample_patch_embed(weight, [patch_size, patch_size], interpolation="bicubic", antialias=True)
    out = F.interpolate(weight.float(), size=(patch_size, patch_size), mode="bicubic", align_corners=False)
    return (out * (old_h * old_w / float(patch_size * patch_size))).to(weight.dtype)


# --------------------------------------------------------------------------- encoders


def vit_encoder_layout(
    embed_dim: int,
    depth: int,
    patch_size: int,
    img_size: int,
    in_chans: int = 3,
    mlp_hidden: Optional[int] = None,
    qkv_bias: bool = True,
) -> "OrderedDict[str, Tuple[int, ...]]":
    """Key -> shape of a timm ``VisionTransformer(num_classes=0, global_pool="token")``
    (= the encoder names of the MAE release), read from the module built on ``meta``."""
    return OrderedDict(_vit_encoder_layout(int(embed_dim), int(depth), int(patch_size), int(img_size),
                                           int(in_chans), int(mlp_hidden or 4 * embed_dim), bool(qkv_bias)))


@functools.lru_cache(maxsize=16)
def _vit_encoder_layout(embed_dim, depth, patch_size, img_size, in_chans, mlp_hidden, qkv_bias):
    from timm.models.vision_transformer import VisionTransformer

    with init_on_meta():
        model = VisionTransformer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, global_pool="token",
            embed_dim=embed_dim, depth=depth, num_heads=1, mlp_ratio=mlp_hidden / embed_dim, qkv_bias=qkv_bias,
        )
    return tuple((k, _shape(v)) for k, v in model.state_dict().items())


def convert_vit_encoder(
    state: Mapping[str, torch.Tensor],
    source: str = "<state dict>",
    *,
    arch: Optional[str] = None,
    img_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    patch_resize: str = "pi",
    allow_missing: bool = False,
    src_format: str = "mae",
    dst_format: str = "timm",
) -> Tuple["OrderedDict[str, torch.Tensor]", ConversionReport, Dict[str, Any]]:
    """Map an MAE / maedet / timm encoder state onto the MAE-timm encoder layout.

    Args:
        state: normalized tensors (no wrapper, no ``module.``), MAE/timm names.
        source: name used in messages.
        arch: expected architecture (``vit_base``, ``vit_huge_patch14`` ...); every
            tensor is checked against it. None: the architecture is read off the
            checkpoint and the tensors are checked for consistency with it.
        img_size: image side of the output's position table (grid =
            img_size / patch). None: keep the input's grid (with a patch-size
            change the image side scales with the patch).
        patch_size: output patch size; None keeps the input's.
        patch_resize: kernel resize method, see :func:`resize_patch_embed`.
        allow_missing: write the output even when keys are missing.
    Returns:
        (encoder state, report, info with embed_dim / depth / patch_size / img_size).
    Raises:
        CheckpointError: shape mismatch, blocks beyond the depth, missing keys.
    """
    report = ConversionReport(source, src_format, dst_format)
    kept: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, v in state.items():
        if _ENCODER_DROP_RE.match(k):
            report.dropped.append(k)
        else:
            kept[k] = v
    w = kept.get("patch_embed.proj.weight")
    if w is None:
        raise CheckpointError(f"checkpoint {source} lacks key 'patch_embed.proj.weight' (not a ViT encoder?)")
    if w.dim() != 4 or w.shape[-1] != w.shape[-2]:
        raise CheckpointError(
            f"checkpoint {source}: key 'patch_embed.proj.weight' has shape {_shape(w)}, expected (C, in_chans, p, p)"
        )
    embed_dim, in_chans, p_src = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    depth = 1 + max((int(m.group(1)) for m in map(_BLOCK_RE.match, kept) if m), default=-1)
    fc1 = kept.get("blocks.0.mlp.fc1.weight")
    mlp_hidden = int(fc1.shape[0]) if fc1 is not None and fc1.dim() == 2 else 4 * embed_dim
    qkv_bias = "blocks.0.attn.qkv.bias" in kept or depth == 0
    grid_src = None
    pos = kept.get("pos_embed")
    if pos is not None:
        if pos.dim() != 3:
            raise CheckpointError(f"checkpoint {source}: key 'pos_embed' has shape {_shape(pos)}, expected (1, [1 +] N, C)")
        try:
            grid_src = math.isqrt(int(pos.shape[1]) - _prefix_tokens(int(pos.shape[1])))
        except ValueError as e:
            raise CheckpointError(f"checkpoint {source}: key 'pos_embed' {_shape(pos)}: {e}") from e

    exp_dim, exp_depth, exp_hidden, exp_patch = embed_dim, depth, mlp_hidden, p_src
    if arch:
        preset, arch_patch = parse_arch(arch)
        exp_dim, exp_depth = int(preset["embed_dim"]), int(preset["depth"])
        exp_hidden = int(exp_dim * float(preset.get("mlp_ratio", 4.0)))
        exp_patch = arch_patch or p_src
        qkv_bias = True
        what = f"--arch {arch}"
    else:
        what = (f"the architecture read off the checkpoint (embed_dim {embed_dim}, depth {depth}, "
                f"patch {p_src}, mlp {mlp_hidden})")
    if exp_depth <= 0:
        raise CheckpointError(f"checkpoint {source} has no 'blocks.N.*' keys (not a ViT encoder?)")
    grid_for_layout = grid_src or 14
    src_layout = vit_encoder_layout(exp_dim, exp_depth, exp_patch, grid_for_layout * exp_patch, in_chans,
                                    exp_hidden, qkv_bias)
    for k, v in kept.items():
        exp = src_layout.get(k)
        if exp is None:
            m = _BLOCK_RE.match(k)
            if m and int(m.group(1)) >= exp_depth:
                raise CheckpointError(
                    f"checkpoint {source}: key '{k}' is beyond the depth of {what} "
                    f"({exp_depth} blocks; the checkpoint has {depth}; wrong model size?)"
                )
            report.unexpected.append(k)
            continue
        if k == "pos_embed":
            ok = v.dim() == 3 and v.shape[0] == 1 and v.shape[2] == exp[2]
        else:
            ok = _shape(v) == exp
        if not ok:
            exp_txt = f"(1, [1 +] N, {exp[2]})" if k == "pos_embed" else str(exp)
            raise CheckpointError(
                f"checkpoint {source}: key '{k}' has shape {_shape(v)}, {what} expects {exp_txt} (wrong model size?)"
            )

    p_dst = int(patch_size or exp_patch)
    if img_size:
        if img_size % p_dst:
            raise ConfigError(f"--img-size {img_size} is not a multiple of the patch size {p_dst}")
        grid_dst = img_size // p_dst
    elif grid_src is not None:
        grid_dst = grid_src
    else:
        grid_dst = 224 // p_dst
        report.notes.append(f"no pos_embed in the checkpoint; layout for img_size {grid_dst * p_dst}")
    dst_layout = vit_encoder_layout(exp_dim, exp_depth, p_dst, grid_dst * p_dst, in_chans, exp_hidden, qkv_bias)
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for k, exp in dst_layout.items():
        if k not in kept:
            report.missing.append(k)
            continue
        v = kept[k]
        if k == "patch_embed.proj.weight" and _shape(v) != exp:
            nv = resize_patch_embed(v, p_dst, patch_resize)
            how = ("pseudo-inverse (FlexiViT) resize" if patch_resize == "pi"
                   else "bicubic kernel resize, scaled by p^2/P^2")
            report.changed[k] = f"{_shape(v)} -> {_shape(nv)} ({how})"
            v = nv
        elif k == "pos_embed" and _shape(v) != exp:
            target = torch.zeros(exp, dtype=v.dtype, device=v.device)
            nv = _map_pos_embed(v, target, source)
            slot = "class-token slot kept" if _prefix_tokens(int(v.shape[1])) == 1 else "zero class-token slot added"
            report.changed[k] = f"{_shape(v)} -> {_shape(nv)} (grid {grid_src}x{grid_src} -> {grid_dst}x{grid_dst}, bicubic, {slot})"
            v = nv
        out[k] = v
        report.loaded.append((k, k))
    if report.missing and not allow_missing:
        raise CheckpointError(
            f"checkpoint {source} lacks key '{report.missing[0]}' ({len(report.missing)} missing in all: "
            f"{ConversionReport._groups(report.missing)}); pass --allow-missing to write the output without them"
        )
    info = {"embed_dim": exp_dim, "depth": exp_depth, "patch_size": p_dst, "img_size": grid_dst * p_dst,
            "in_chans": in_chans}
    return out, report, info


def _encoder_state_from_checkpoint(obj: Any, source: str, src_format: str) -> "OrderedDict[str, torch.Tensor]":
    inner = _model_dict(obj, source)
    det = [k for k in inner if isinstance(k, str) and k.startswith(_DET_PREFIXES)]
    if det:
        raise CheckpointError(
            f"checkpoint {source} looks like a detection checkpoint (key '{det[0]}'), not a '{src_format}' "
            "encoder; use --from maedet-det or --from d2-vitdet"
        )
    return _unwrap_state(obj, source)


# --------------------------------------------------------------------------- detection key map


_RE = {
    "rpn_conv": re.compile(r"rpn\.head\.conv\.(\d+)\.0\.(weight|bias)"),
    "rpn_cls": re.compile(r"rpn\.head\.cls_logits\.(weight|bias)"),
    "rpn_box": re.compile(r"rpn\.head\.bbox_pred\.(weight|bias)"),
    "box_conv": re.compile(r"roi_heads\.box_head\.(\d+)\.0\.(weight|bias)"),
    "box_norm": re.compile(r"roi_heads\.box_head\.(\d+)\.1\.(weight|bias)"),
    "box_fc": re.compile(r"roi_heads\.box_head\.(\d+)\.(weight|bias)"),
    "predictor": re.compile(r"roi_heads\.box_predictor\.(cls_score|bbox_pred)\.(weight|bias)"),
    "mask_conv": re.compile(r"roi_heads\.mask_head\.(\d+)\.0\.(weight|bias)"),
    "mask_norm": re.compile(r"roi_heads\.mask_head\.(\d+)\.1\.(weight|bias)"),
    "mask_deconv": re.compile(r"roi_heads\.mask_predictor\.conv5_mask\.(weight|bias)"),
    "mask_logits": re.compile(r"roi_heads\.mask_predictor\.mask_fcn_logits\.(weight|bias)"),
    # detectron2 names
    "d2_rpn_conv": re.compile(r"proposal_generator\.rpn_head\.conv\.(?:conv(\d+)\.)?(weight|bias)"),
    "d2_rpn_cls": re.compile(r"proposal_generator\.rpn_head\.objectness_logits\.(weight|bias)"),
    "d2_rpn_box": re.compile(r"proposal_generator\.rpn_head\.anchor_deltas\.(weight|bias)"),
    "d2_box_conv": re.compile(r"roi_heads\.box_head\.conv(\d+)\.(weight|bias)"),
    "d2_box_norm": re.compile(r"roi_heads\.box_head\.conv(\d+)\.norm\.(weight|bias)"),
    "d2_box_fc": re.compile(r"roi_heads\.box_head\.fc(\d+)\.(weight|bias)"),
    "d2_mask_conv": re.compile(r"roi_heads\.mask_head\.mask_fcn(\d+)\.(weight|bias)"),
    "d2_mask_norm": re.compile(r"roi_heads\.mask_head\.mask_fcn(\d+)\.norm\.(weight|bias)"),
    "d2_mask_deconv": re.compile(r"roi_heads\.mask_head\.deconv\.(weight|bias)"),
    "d2_mask_logits": re.compile(r"roi_heads\.mask_head\.predictor\.(weight|bias)"),
}
_BACKBONE_RE = re.compile(r"backbone\.(net\.|simfp_\d+\.)")


def _count_maedet(keys: Sequence[str]) -> Tuple[int, int]:
    """(number of box-head convs, number of RPN convs) of a maedet state."""
    box = {int(m.group(1)) for m in map(_RE["box_conv"].fullmatch, keys) if m}
    rpn = {int(m.group(1)) for m in map(_RE["rpn_conv"].fullmatch, keys) if m}
    return len(box), len(rpn)


def _n(m: "re.Match", i: int = 1) -> int:
    return int(m.group(i))


def _box_fc_to_d2(m: "re.Match", box: int) -> Optional[str]:
    j = _n(m) - box - 1  # Sequential index after the convs and Flatten; (Linear, ReLU) pairs
    return f"roi_heads.box_head.fc{j // 2 + 1}.{m.group(2)}" if j >= 0 and j % 2 == 0 else None


# (pattern in _RE, rename) pairs; the first pattern that matches decides: rename(match, *counts)
# gives the new key, or None for a key with no counterpart (e.g. a box conv index past the head's convs).
_TO_D2 = [
    ("rpn_conv", lambda m, box, rpn: "proposal_generator.rpn_head.conv."
     + (f"conv{m.group(1)}." if rpn > 1 else "") + m.group(2)),
    ("rpn_cls", lambda m, box, rpn: f"proposal_generator.rpn_head.objectness_logits.{m.group(1)}"),
    ("rpn_box", lambda m, box, rpn: f"proposal_generator.rpn_head.anchor_deltas.{m.group(1)}"),
    ("box_conv", lambda m, box, rpn: f"roi_heads.box_head.conv{_n(m) + 1}.{m.group(2)}" if _n(m) < box else None),
    ("box_norm", lambda m, box, rpn: f"roi_heads.box_head.conv{_n(m) + 1}.norm.{m.group(2)}" if _n(m) < box
     else None),
    ("box_fc", lambda m, box, rpn: _box_fc_to_d2(m, box)),
    ("predictor", lambda m, box, rpn: m.group(0)),
    ("mask_conv", lambda m, box, rpn: f"roi_heads.mask_head.mask_fcn{_n(m) + 1}.{m.group(2)}"),
    ("mask_norm", lambda m, box, rpn: f"roi_heads.mask_head.mask_fcn{_n(m) + 1}.norm.{m.group(2)}"),
    ("mask_deconv", lambda m, box, rpn: f"roi_heads.mask_head.deconv.{m.group(1)}"),
    ("mask_logits", lambda m, box, rpn: f"roi_heads.mask_head.predictor.{m.group(1)}"),
]
_FROM_D2 = [
    ("d2_rpn_conv", lambda m, box: f"rpn.head.conv.{int(m.group(1) or 0)}.0.{m.group(2)}"),
    ("d2_rpn_cls", lambda m, box: f"rpn.head.cls_logits.{m.group(1)}"),
    ("d2_rpn_box", lambda m, box: f"rpn.head.bbox_pred.{m.group(1)}"),
    ("d2_box_norm", lambda m, box: f"roi_heads.box_head.{_n(m) - 1}.1.{m.group(2)}" if _n(m) >= 1 else None),
    ("d2_box_conv", lambda m, box: f"roi_heads.box_head.{_n(m) - 1}.0.{m.group(2)}" if _n(m) >= 1 else None),
    ("d2_box_fc", lambda m, box: f"roi_heads.box_head.{box + 1 + 2 * (_n(m) - 1)}.{m.group(2)}" if _n(m) >= 1
     else None),
    ("predictor", lambda m, box: m.group(0)),
    ("d2_mask_norm", lambda m, box: f"roi_heads.mask_head.{_n(m) - 1}.1.{m.group(2)}" if _n(m) >= 1 else None),
    ("d2_mask_conv", lambda m, box: f"roi_heads.mask_head.{_n(m) - 1}.0.{m.group(2)}" if _n(m) >= 1 else None),
    ("d2_mask_deconv", lambda m, box: f"roi_heads.mask_predictor.conv5_mask.{m.group(1)}"),
    ("d2_mask_logits", lambda m, box: f"roi_heads.mask_predictor.mask_fcn_logits.{m.group(1)}"),
]


def _rename(key: str, table, *args) -> Optional[str]:
    if _BACKBONE_RE.match(key):
        return key
    for name, rename in table:
        m = _RE[name].fullmatch(key)
        if m:
            return rename(m, *args)
    return None


def maedet_key_to_d2(key: str, num_box_convs: int, num_rpn_convs: int = 2) -> Optional[str]:
    """detectron2 ViTDet name of a maedet (torchvision MaskRCNN) parameter, or None.

    ``num_box_convs`` places the box head's fc layers (torchvision's
    ``FastRCNNConvFCHead`` is a Sequential: convs, Flatten, (Linear, ReLU)...);
    ``num_rpn_convs == 1`` gives detectron2's single-conv name ``rpn_head.conv.weight``.
    """
    return _rename(key, _TO_D2, num_box_convs, num_rpn_convs)


def d2_key_to_maedet(key: str, num_box_convs: int) -> Optional[str]:
    """maedet (torchvision MaskRCNN) name of a detectron2 ViTDet parameter, or None."""
    return _rename(key, _FROM_D2, num_box_convs)


# Class-layout conversions (maedet key -> rows per class).
_CLS_KEYS = ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias")
_BOX_KEYS = ("roi_heads.box_predictor.bbox_pred.weight", "roi_heads.box_predictor.bbox_pred.bias")
_MASK_KEYS = ("roi_heads.mask_predictor.mask_fcn_logits.weight", "roi_heads.mask_predictor.mask_fcn_logits.bias")


def _to_d2_tensor(mkey: str, t: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor], str]:
    """(detectron2 tensor, background rows removed or None, note) for one maedet tensor."""
    if mkey in _CLS_KEYS:
        return torch.cat([t[1:], t[:1]], dim=0), None, "background row moved from first to last"
    if mkey in _BOX_KEYS:
        return t[4:], t[:4], f"{t.shape[0]} -> {t.shape[0] - 4} rows: background deltas (rows 0-3, unused) removed"
    if mkey in _MASK_KEYS:
        return t[1:], t[:1], f"{t.shape[0]} -> {t.shape[0] - 1} channels: background channel (unused) removed"
    return t, None, ""


def _to_maedet_tensor(
    mkey: str, t: torch.Tensor, num_classes: int, background: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, str]:
    """maedet tensor (and a note) from one detectron2 tensor; ``background``: stored unused rows or None."""
    if mkey in _CLS_KEYS:
        return torch.cat([t[-1:], t[:-1]], dim=0), "background row moved from last to first"
    rows = 4 if mkey in _BOX_KEYS else 1 if mkey in _MASK_KEYS else 0
    if not rows:
        return t, ""
    if t.shape[0] == rows and num_classes > 1:  # class-agnostic head: same prediction for every class
        return torch.cat([t] * (num_classes + 1), dim=0), (
            f"class-agnostic {rows} rows repeated for the {num_classes} classes and background")
    if background is not None and background.shape[1:] == t.shape[1:] and background.shape[0] == rows:
        bg, how = background.to(dtype=t.dtype, device=t.device), "restored from the file's maedet.background"
    else:
        bg, how = t.new_zeros((rows,) + tuple(t.shape[1:])), "zeros"
    kind = "background deltas" if rows == 4 else "background channel"
    return torch.cat([bg, t], dim=0), f"{t.shape[0]} -> {t.shape[0] + rows} rows: unused {kind} prepended ({how})"


# --------------------------------------------------------------------------- detection layout


def _numbered_widths(state: Mapping[str, torch.Tensor], pattern: str) -> List[int]:
    """Output widths of the layers ``pattern.format(1)``, ``pattern.format(2)``, ... up to the first missing one."""
    widths = []
    while pattern.format(len(widths) + 1) in state:
        widths.append(int(state[pattern.format(len(widths) + 1)].shape[0]))
    return widths


def infer_vitdet_config(d2_state: Mapping[str, torch.Tensor], source: str, arch: Optional[str] = None) -> Dict[str, Any]:
    """Keyword arguments of :func:`build_vitdet_mask_rcnn` read off a state with detectron2 names.

    The ViT's width, depth, patch, MLP width and position table come from the
    tensor shapes; heads from the rel-pos tables (C / head_dim); window vs global
    blocks and the input size from the rel-pos table lengths (2 * 14 - 1 for
    window 14, 2 * img_size / patch - 1 for global blocks; with two lengths, 27
    or else the more common one is taken as the window's); pyramid, RPN, box and
    mask head widths from their tensors; K from ``cls_score`` (K + 1 rows).
    ``arch`` (``vit_base`` ...) fixes width, depth, heads and window blocks instead.
    """

    def need(k: str) -> torch.Tensor:
        if k not in d2_state:
            raise CheckpointError(f"checkpoint {source} lacks key '{k}' (not a ViTDet Mask R-CNN?)")
        return d2_state[k]

    w = need("backbone.net.patch_embed.proj.weight")
    if w.dim() != 4:
        raise CheckpointError(f"checkpoint {source}: key 'backbone.net.patch_embed.proj.weight' has shape {_shape(w)}")
    embed_dim, in_chans, patch = int(w.shape[0]), int(w.shape[1]), int(w.shape[-1])
    blk_re = re.compile(r"backbone\.net\.blocks\.(\d+)\.")
    depth = 1 + max((int(m.group(1)) for m in map(blk_re.match, d2_state) if m), default=-1)
    fc1 = d2_state.get("backbone.net.blocks.0.mlp.fc1.weight")
    mlp_ratio = float(fc1.shape[0]) / embed_dim if fc1 is not None else 4.0
    vit: Dict[str, Any] = dict(
        patch_size=patch, in_chans=in_chans, embed_dim=embed_dim, depth=depth, mlp_ratio=mlp_ratio,
        qkv_bias="backbone.net.blocks.0.attn.qkv.bias" in d2_state, drop_path_rate=0.0,
    )
    pos = d2_state.get("backbone.net.pos_embed")
    vit["use_abs_pos"] = pos is not None
    if pos is not None:
        try:
            prefix = _prefix_tokens(int(pos.shape[1]))
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"checkpoint {source}: key 'backbone.net.pos_embed' {_shape(pos)}: {e}") from e
        vit["pretrain_use_cls_token"] = prefix == 1
        vit["pretrain_img_size"] = math.isqrt(int(pos.shape[1]) - prefix) * patch
    lengths = {}
    for i in range(depth):
        t = d2_state.get(f"backbone.net.blocks.{i}.attn.rel_pos_h")
        if t is not None:
            lengths[i] = int(t.shape[0])
    vit["use_rel_pos"] = bool(lengths)
    notes = []
    if lengths:
        head_dim = int(d2_state[f"backbone.net.blocks.{min(lengths)}.attn.rel_pos_h"].shape[1])
        vit["num_heads"] = max(1, embed_dim // head_dim)
        distinct = sorted(set(lengths.values()))
        if len(distinct) == 2:
            # Which length belongs to the window blocks: ViTDet's window 14 (27 rows) if
            # present, else the length most blocks share (ties: the shorter one).
            counts = {n: sum(1 for x in lengths.values() if x == n) for n in distinct}
            if 27 in counts:
                win = 27
            else:
                win = max(distinct, key=lambda n: (counts[n], -n))
            glob = distinct[0] if win == distinct[1] else distinct[1]
            vit["window_size"] = (win + 1) // 2
            vit["img_size"] = (glob + 1) // 2 * patch
            vit["window_block_indexes"] = tuple(i for i, n in sorted(lengths.items()) if n == win)
        elif len(distinct) == 1:
            vit["window_size"] = 14
            vit["img_size"] = (distinct[0] + 1) // 2 * patch
            vit["window_block_indexes"] = ()
            notes.append("all blocks have rel-pos tables of one length: read as global attention everywhere")
        else:
            raise CheckpointError(
                f"checkpoint {source}: rel-pos tables of {len(distinct)} different lengths {distinct}; "
                "cannot tell window from global blocks (pass --arch)"
            )
    else:
        vit["num_heads"] = _HEADS_BY_WIDTH.get(embed_dim, max(1, embed_dim // 64))
        vit["img_size"] = 1024
        vit["window_block_indexes"] = ()
    if arch:
        preset, arch_patch = parse_arch(arch)
        for k in ("embed_dim", "depth", "num_heads", "window_block_indexes"):
            vit[k] = preset[k]
        vit["mlp_ratio"] = float(preset.get("mlp_ratio", 4.0))
        vit["patch_size"] = arch_patch or patch
        vit.setdefault("window_size", 14)
        vit["qkv_bias"] = True

    stages = sorted({int(m.group(1)) for m in map(re.compile(r"backbone\.simfp_(\d+)\.").match, d2_state) if m})
    if not stages:
        raise CheckpointError(f"checkpoint {source} lacks the simple feature pyramid (keys 'backbone.simfp_N.*')")
    norms = [k for k in d2_state if k.startswith("backbone.simfp_") and k.endswith(".norm.weight")]
    out_channels = int(d2_state[norms[0]].shape[0]) if norms else 256
    scale_factors = tuple(vit["patch_size"] / float(2**s) for s in stages)
    rpn_names = [m for m in map(_RE["d2_rpn_conv"].fullmatch, d2_state) if m and m.group(2) == "weight"]
    rpn_depth = len(rpn_names)
    anchors = int(need("proposal_generator.rpn_head.objectness_logits.weight").shape[0])
    if anchors != 3:
        raise CheckpointError(
            f"checkpoint {source}: key 'proposal_generator.rpn_head.objectness_logits.weight' has {anchors} anchors "
            "per location; maedet's ViTDet uses 3 (aspect ratios 0.5, 1, 2)"
        )
    box_convs = _numbered_widths(d2_state, "roi_heads.box_head.conv{}.weight")
    fcs = _numbered_widths(d2_state, "roi_heads.box_head.fc{}.weight")
    if len(fcs) != 1:
        raise CheckpointError(
            f"checkpoint {source}: box head has {len(fcs)} fc layers (roi_heads.box_head.fcN); "
            "maedet's ViTDet box head has exactly one"
        )
    mask_convs = _numbered_widths(d2_state, "roi_heads.mask_head.mask_fcn{}.weight")
    num_classes = int(need("roi_heads.box_predictor.cls_score.weight").shape[0]) - 1
    if num_classes < 1:
        raise CheckpointError(f"checkpoint {source}: key 'roi_heads.box_predictor.cls_score.weight' has fewer than 2 rows")
    levels = len(stages) + 1
    return dict(
        num_classes=num_classes,
        vit_kwargs=vit,
        pyramid_out_channels=out_channels,
        pyramid_scale_factors=scale_factors,
        anchor_sizes=tuple(32 * 2**i for i in range(levels)),
        rpn_conv_depth=rpn_depth,
        box_head_conv_dims=tuple(box_convs),
        box_head_fc_dim=fcs[0],
        mask_head_conv_dims=tuple(mask_convs),
        _notes=notes,
    )


def maedet_detection_layout(config: Mapping[str, Any]) -> "OrderedDict[str, torch.Tensor]":
    """``state_dict()`` of ``build_vitdet_mask_rcnn(**config)`` with ``meta`` tensors (keys and shapes only)."""
    from maedet.models.mask_rcnn import build_vitdet_mask_rcnn

    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    num_classes = kwargs.pop("num_classes")
    try:
        with init_on_meta():
            model = build_vitdet_mask_rcnn(num_classes, **kwargs)
    except (ValueError, TypeError, AssertionError) as e:
        raise CheckpointError(f"cannot build a ViTDet Mask R-CNN for this checkpoint's architecture: {e}") from e
    return OrderedDict(model.state_dict())


def _describe(config: Mapping[str, Any]) -> str:
    v = config["vit_kwargs"]
    glob = tuple(i for i in range(v["depth"]) if i not in set(v.get("window_block_indexes", ())))
    return (
        f"ViT embed_dim {v['embed_dim']}, depth {v['depth']}, heads {v['num_heads']}, patch {v['patch_size']}, "
        f"global blocks {glob}, window {v.get('window_size', 14)}, img_size {v.get('img_size')}, "
        f"pretrain_img_size {v.get('pretrain_img_size', 224)}; pyramid {config['pyramid_out_channels']} ch; "
        f"{config['num_classes']} classes"
    )


def _check_against(state: Mapping[str, torch.Tensor], layout: Mapping[str, Tuple[int, ...]], source: str,
                   report: ConversionReport, drop: Sequence[str] = (),
                   alt_shapes: Optional[Mapping[str, Sequence[Tuple[int, ...]]]] = None) -> None:
    alt_shapes = alt_shapes or {}
    for k, v in state.items():
        if k in drop:
            report.dropped.append(k)
            continue
        exp = layout.get(k)
        if exp is None:
            report.unexpected.append(k)
            continue
        if _shape(v) != tuple(exp) and _shape(v) not in alt_shapes.get(k, ()):
            raise CheckpointError(
                f"checkpoint {source}: key '{k}' has shape {_shape(v)}, expected {tuple(exp)} for this "
                "architecture (other model size or number of classes?)"
            )
    report.missing.extend(k for k in layout if k not in state)


def _raise_missing(report: ConversionReport, source: str) -> None:
    raise CheckpointError(
        f"checkpoint {source} lacks key '{report.missing[0]}' ({len(report.missing)} missing in all: "
        f"{ConversionReport._groups(report.missing)}); pass --allow-missing to write the output without them"
    )


def maedet_det_to_d2(
    state: Mapping[str, torch.Tensor],
    source: str = "<state dict>",
    *,
    arch: Optional[str] = None,
    allow_missing: bool = False,
) -> Tuple["OrderedDict[str, torch.Tensor]", Dict[str, torch.Tensor], ConversionReport, Dict[str, Any]]:
    """maedet (torchvision MaskRCNN) state -> detectron2 ViTDet state.

    Returns:
        (detectron2 state, background rows removed from the predictors (maedet
        names; unused by torchvision, kept so the way back is exact), report,
        inferred build config).
    """
    state = _strip_module(state)
    report = ConversionReport(source, "maedet-det", "d2-vitdet")
    d2_like = [k for k in state if k.startswith("proposal_generator.") or re.match(r"roi_heads\.box_head\.conv\d", k)]
    if d2_like:
        raise CheckpointError(
            f"checkpoint {source} looks like a detectron2 checkpoint (key '{d2_like[0]}'); use --from d2-vitdet"
        )
    n_box, n_rpn = _count_maedet(list(state))
    names = {k: maedet_key_to_d2(k, n_box, n_rpn) for k in state}
    cfg = infer_vitdet_config({names[k]: v for k, v in state.items() if names[k]}, source, arch)
    layout = maedet_detection_layout(cfg)
    _check_against(state, {k: _shape(v) for k, v in layout.items()}, source, report)
    if report.missing and not allow_missing:
        _raise_missing(report, source)
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    background: Dict[str, torch.Tensor] = OrderedDict()
    for k in layout:
        if k not in state:
            continue
        d2k = maedet_key_to_d2(k, n_box, n_rpn)
        if d2k is None:  # a module of the layout without a detectron2 counterpart
            report.unexpected.append(k)
            continue
        t, bg, note = _to_d2_tensor(k, state[k])
        if bg is not None:
            background[k] = bg
        if note:
            report.changed[d2k] = note
        out[d2k] = t
        report.loaded.append((k, d2k))
    report.notes.append("architecture: " + _describe(cfg))
    report.notes.extend(cfg.get("_notes", []))
    return out, background, report, cfg


def d2_to_maedet_det(
    state: Mapping[str, Any],
    source: str = "<state dict>",
    *,
    background: Optional[Mapping[str, torch.Tensor]] = None,
    arch: Optional[str] = None,
    allow_missing: bool = False,
) -> Tuple["OrderedDict[str, torch.Tensor]", ConversionReport, Dict[str, Any]]:
    """detectron2 ViTDet state (tensors or numpy arrays) -> maedet (torchvision MaskRCNN) state.

    ``background``: the unused background rows a maedet -> detectron2
    conversion stored (``maedet.background`` in the file); zeros when absent.
    Class-agnostic detectron2 box / mask predictors are repeated per class.
    Returns (state, report, inferred build config).
    """
    state = _strip_module(state)
    report = ConversionReport(source, "d2-vitdet", "maedet-det")
    tv_like = [k for k in state if k.startswith(("rpn.head.", "roi_heads.mask_predictor."))]
    if tv_like:
        raise CheckpointError(
            f"checkpoint {source} looks like a maedet detection checkpoint (key '{tv_like[0]}'); use --from maedet-det"
        )
    cfg = infer_vitdet_config(state, source, arch)
    layout = maedet_detection_layout(cfg)
    n_box, n_rpn = _count_maedet(list(layout))
    num_classes = int(cfg["num_classes"])
    # Expected detectron2 layout: the maedet layout mapped through the same tensor transforms.
    d2_layout: "OrderedDict[str, Tuple[int, ...]]" = OrderedDict()
    d2_to_m: Dict[str, str] = {}
    for k, t in layout.items():
        d2k = maedet_key_to_d2(k, n_box, n_rpn)
        if d2k is None:
            continue
        d2_layout[d2k] = _shape(_to_d2_tensor(k, t)[0])
        d2_to_m[d2k] = k
    alt = {}
    for k in _BOX_KEYS + _MASK_KEYS:  # class-agnostic predictors
        d2k = maedet_key_to_d2(k, n_box, n_rpn)
        rows = 4 if k in _BOX_KEYS else 1
        alt[d2k] = [(rows,) + d2_layout[d2k][1:]]
    _check_against(state, d2_layout, source, report, drop=_D2_DROP, alt_shapes=alt)
    if report.missing and not allow_missing:
        _raise_missing(report, source)
    background = dict(background or {})
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for d2k in d2_layout:
        if d2k not in state:
            continue
        mk = d2_to_m[d2k]
        t, note = _to_maedet_tensor(mk, state[d2k], num_classes, _to_tensor(background.get(mk)))
        if note:
            report.changed[mk] = note
        if _shape(t) != _shape(layout[mk]):
            raise CheckpointError(
                f"checkpoint {source}: key '{d2k}' converts to shape {_shape(t)}, the maedet model expects "
                f"{_shape(layout[mk])}"
            )
        out[mk] = t
        report.loaded.append((d2k, mk))
    report.notes.append("architecture: " + _describe(cfg))
    report.notes.extend(cfg.get("_notes", []))
    return out, report, cfg


# --------------------------------------------------------------------------- class names


def _class_meta(class_names: Union[str, Sequence[str], None], num_classes: int) -> Dict[str, Any]:
    if class_names is None:
        return {}
    if isinstance(class_names, str):
        if class_names.lower() == "coco":
            cats = list(COCO_CATEGORIES)
        else:
            try:
                with open(class_names, "r", encoding="utf-8") as f:
                    data = json.load(f)
                cats = sorted((int(c["id"]), str(c["name"])) for c in data["categories"])
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"--class-names {class_names}: not 'coco' nor a readable COCO json with "
                                  f"'categories' ({e})") from e
    else:
        cats = [(i + 1, str(n)) for i, n in enumerate(class_names)]
    if len(cats) != num_classes:
        raise ConfigError(f"--class-names gives {len(cats)} classes, the checkpoint has {num_classes}")
    return {"class_names": [n for _, n in cats], "label_to_cat_id": {i + 1: c for i, (c, _) in enumerate(cats)}}


# --------------------------------------------------------------------------- files


def _numpy_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    if isinstance(obj, Mapping):
        return {k: _numpy_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_numpy_tree(v) for v in obj)
    return obj


def _write(obj: Any, path: str, as_pickle: bool) -> None:
    if path.endswith(".safetensors"):
        from safetensors.torch import save

        if not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ConfigError(f"{path}: only a plain state dict (--to timm) can be written as .safetensors")
        data = save({k: v.detach().cpu().contiguous() for k, v in obj.items()})
        try:
            atomic_write(path, lambda f: f.write(data))
        except OSError as e:
            raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e
        return
    if not as_pickle:
        atomic_save(obj, path)
        return
    data = _numpy_tree(obj)
    try:
        # Protocol 4: numpy arrays pickle through numpy's _reconstruct (readable by
        # detectron2 and by maedet's numpy-only unpickler); protocol 5 would not.
        atomic_write(path, lambda f: pickle.dump(data, f, protocol=4))
    except OSError as e:
        raise CheckpointError(f"cannot write checkpoint {path}: {e.strerror or e}") from e


def convert_checkpoint(
    src: Union[str, os.PathLike, Mapping[str, Any]],
    src_format: str,
    dst_format: str,
    dst: Optional[Union[str, os.PathLike]] = None,
    *,
    trust: bool = False,
    arch: Optional[str] = None,
    img_size: Optional[int] = None,
    patch_size: Optional[int] = None,
    patch_resize: str = "pi",
    class_names: Union[str, Sequence[str], None] = None,
    allow_missing: bool = False,
    d2_pickle: Optional[bool] = None,
) -> ConversionResult:
    """Convert a checkpoint between formats (see the module docstring and ``FORMATS``).

    Args:
        src: input file (``.pth``, ``.pkl``, ``.safetensors``), or an already
            loaded checkpoint object.
        src_format, dst_format: names from ``INPUT_FORMATS`` / ``OUTPUT_FORMATS``;
            the pair must be in ``SUPPORTED_CONVERSIONS``.
        dst: output file; written atomically (nothing is written on error).
            None: only convert. ``.safetensors`` is allowed for ``timm`` outputs.
        trust: read the input with ``weights_only=False`` (arbitrary unpickling).
        arch: expected architecture (``vit_tiny|base|large|huge[_patchN]``),
            checked key by key; default: read off the checkpoint.
        img_size, patch_size, patch_resize: encoder outputs only; see
            :func:`convert_vit_encoder`.
        class_names: ``d2-vitdet -> maedet-det``: ``"coco"``, a COCO json path
            or a list of K names, stored in ``meta``.
        allow_missing: write the output even when keys are missing.
        d2_pickle: ``d2-vitdet`` output as a numpy ``.pkl``; default: by ``dst``'s extension.
    Returns:
        :class:`ConversionResult` (checkpoint object and report).
    Raises:
        CheckpointError: unreadable / unsafe input, wrong format, shape mismatch,
            missing keys (messages name the file and key).
        ConfigError: bad options.
    """
    if src_format not in INPUT_FORMATS:
        raise ConfigError(f"unknown input format {src_format!r}; use one of {', '.join(INPUT_FORMATS)}")
    if dst_format not in OUTPUT_FORMATS:
        raise ConfigError(f"unknown output format {dst_format!r}; use one of {', '.join(OUTPUT_FORMATS)}")
    if (src_format, dst_format) not in SUPPORTED_CONVERSIONS:
        pairs = ", ".join(f"{a}->{b}" for a, b in SUPPORTED_CONVERSIONS)
        raise ConfigError(f"conversion {src_format} -> {dst_format} is not supported; supported: {pairs}")
    if patch_resize not in PATCH_RESIZE_METHODS:
        raise ConfigError(f"unknown patch resize method {patch_resize!r}; use one of {PATCH_RESIZE_METHODS}")
    if dst_format not in _ENCODER_OUT and (img_size or patch_size):
        raise ConfigError("--img-size / --patch-size apply to encoder outputs (mae, timm) only")
    if dst is not None and os.fspath(dst).endswith(".safetensors") and dst_format != "timm":
        raise ConfigError("only --to timm can write a .safetensors file (the other formats carry metadata)")
    if class_names is not None and dst_format != "maedet-det":
        raise ConfigError("--class-names applies to --to maedet-det only")
    if isinstance(src, (str, os.PathLike)):
        source = os.fspath(src)
        obj = load_for_conversion(source, trust=trust)
    else:
        source, obj = "<state dict>", src
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {source} is not a dictionary (got {type(obj).__name__})")

    if src_format in _ENCODER_IN:
        state = _encoder_state_from_checkpoint(obj, source, src_format)
        enc, report, info = convert_vit_encoder(
            state, source, arch=arch, img_size=img_size, patch_size=patch_size, patch_resize=patch_resize,
            allow_missing=allow_missing, src_format=src_format, dst_format=dst_format,
        )
        src_meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
        heads = None
        if arch:
            heads = parse_arch(arch)[0]["num_heads"]
        elif src_meta.get("num_heads") and src_meta.get("embed_dim") == info["embed_dim"]:
            heads = int(src_meta["num_heads"])
        else:
            heads = _HEADS_BY_WIDTH.get(info["embed_dim"])
        report.notes.append(
            f"encoder: embed_dim {info['embed_dim']}, depth {info['depth']}, patch {info['patch_size']}, "
            f"img_size {info['img_size']}" + (f", heads {heads} (not stored in the weights)" if heads else "")
        )
        if dst_format == "mae":
            meta = {"format": "maedet-mae-encoder", "img_size": info["img_size"], "patch_size": info["patch_size"],
                    "embed_dim": info["embed_dim"], "depth": info["depth"], "converted_from": source,
                    "source_format": src_format}
            if heads:
                meta["num_heads"] = int(heads)
            checkpoint: Any = {"model": enc, "meta": meta}
        else:
            checkpoint = enc
        as_pickle = False
    elif src_format == "maedet-det":
        inner = _model_dict(obj, source)
        d2_state, background, report, cfg = maedet_det_to_d2(inner, source, arch=arch, allow_missing=allow_missing)
        src_meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
        extra: Dict[str, Any] = {"background": background}
        if src_meta:
            extra["meta"] = copy.deepcopy(dict(src_meta))
        checkpoint = {"model": d2_state, "__author__": "maedet", "maedet": extra}
        as_pickle = bool(d2_pickle) if d2_pickle is not None else bool(dst and os.fspath(dst).endswith(".pkl"))
        report.notes.append(
            "unused background rows of bbox_pred / mask_fcn_logits kept under 'maedet.background' "
            "(ignored by detectron2) so that converting back is exact"
        )
    else:  # d2-vitdet -> maedet-det
        inner = _model_dict(obj, source)
        extra = obj.get("maedet") if isinstance(obj.get("maedet"), Mapping) else {}
        state, report, cfg = d2_to_maedet_det(
            inner, source, background=extra.get("background"), arch=arch, allow_missing=allow_missing
        )
        det_meta: Dict[str, Any] = {}
        if isinstance(extra.get("meta"), Mapping):
            det_meta.update(copy.deepcopy(dict(extra["meta"])))
        det_meta.update({"format": "maedet-vitdet", "num_classes": int(cfg["num_classes"]),
                         "converted_from": source})
        det_meta.update(_class_meta(class_names, int(cfg["num_classes"])))
        if "class_names" in det_meta and len(det_meta["class_names"]) != det_meta["num_classes"]:
            det_meta.pop("class_names", None)
            det_meta.pop("label_to_cat_id", None)
        if "class_names" not in det_meta:
            report.notes.append("no class names stored (pass --class-names coco or a COCO json to add them)")
        checkpoint = {"model": state, "meta": det_meta}
        as_pickle = False

    if dst is not None:
        path = os.fspath(dst)
        _write(checkpoint, path, as_pickle)
        report.destination = path
    return ConversionResult(checkpoint, report)
