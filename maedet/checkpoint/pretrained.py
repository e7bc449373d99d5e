"""Load a pretrained ViT encoder into the detection ViT (ViTDet backbone).

Accepted inputs (a file path or an already loaded object):

(a) an encoder checkpoint written by maedet pretraining: a plain dict of encoder
    tensors, or ``{"model": {...}}``; a full MAE state with decoder keys
    (``decoder_*``, ``mask_token``) is accepted and the decoder is dropped;
(b) an official MAE release checkpoint ``{"model": {...}}`` (``cls_token``,
    ``pos_embed`` (1, 1 + 14*14, C), ``patch_embed.*``, ``blocks.*``, ``norm.*``);
(c) a timm ViT state dict (same names; ``fc_norm.*``, ``head.*`` dropped).

A ``module.`` (DDP) prefix is stripped; a dict whose keys start with
``backbone.net.`` (a detectron2 / maedet ViTDet model) loads its ViT part,
including the rel-pos tables.

Mapping: ``cls_token``, decoder keys, ``norm.*`` / ``fc_norm.*`` (ViTDet has no
final norm) and ``head.*`` are dropped; ``pos_embed`` keeps its class-token
slot and its grid is resized (bicubic) when it differs from the model's;
``blocks.*`` and ``patch_embed.*`` load as they are. The model's
``rel_pos_*`` tables stay newly initialized (unless the checkpoint has them).

Anything that does not fit raises :class:`~maedet.errors.CheckpointError`
naming the file and the first offending key.
"""
from __future__ import annotations

import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F

from maedet.checkpoint.io import load_checkpoint_file
from maedet.errors import CheckpointError
from maedet.models.pos_embed import interpolate_pos_embed, resize_pos_embed_grid

__all__ = ["LoadReport", "load_pretrained_backbone", "map_vit_encoder_state"]

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.")
# Checkpoint keys that exist in MAE / timm encoders but have no place in ViTDet.
_DROP_RE = re.compile(r"^(cls_token|mask_token|dist_token|reg_token|decoder_.*|norm\..*|fc_norm\..*|head\..*|head_dist\..*)$")
_WRAPPER_KEYS = ("model", "state_dict", "encoder")


@dataclass
class LoadReport:
    """What :func:`load_pretrained_backbone` did.

    Attributes:
        source: file path (or "<state dict>").
        loaded_keys: model keys set from the checkpoint.
        new_keys: model keys left at their initialization (expected: rel_pos_*).
        unexpected_keys: checkpoint keys with no place in the model and not
            known to be droppable (e.g. layer-scale gammas).
        dropped_keys: checkpoint keys dropped on purpose (cls_token, decoder, norm, head).
        resized: key -> (checkpoint shape, model shape) for interpolated tensors.
    """

    source: str
    loaded_keys: List[str] = field(default_factory=list)
    new_keys: List[str] = field(default_factory=list)
    unexpected_keys: List[str] = field(default_factory=list)
    dropped_keys: List[str] = field(default_factory=list)
    resized: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...]]] = field(default_factory=dict)

    @staticmethod
    def group(keys: List[str]) -> "OrderedDict[str, int]":
        """Collapse block indexes: ``blocks.3.attn.rel_pos_h`` -> ``blocks.*.attn.rel_pos_h``."""
        out: "OrderedDict[str, int]" = OrderedDict()
        for k in keys:
            pattern = re.sub(r"(^|\.)(blocks|decoder_blocks)\.\d+\.", r"\1\2.*.", k)
            out[pattern] = out.get(pattern, 0) + 1
        return out

    def table(self) -> str:
        """One concise table: counts, then the non-loaded keys grouped by pattern."""
        rows = [
            ("loaded", len(self.loaded_keys)),
            ("newly initialized (model)", len(self.new_keys)),
            ("dropped (checkpoint)", len(self.dropped_keys)),
            ("unexpected (checkpoint)", len(self.unexpected_keys)),
        ]
        lines = [f"pretrained backbone from {self.source}:"]
        width = max(len(r[0]) for r in rows)
        for name, n in rows:
            lines.append(f"  {name:<{width}}  {n}")
        for title, keys in (
            ("newly initialized", self.new_keys),
            ("dropped", self.dropped_keys),
            ("unexpected", self.unexpected_keys),
        ):
            if keys:
                groups = ", ".join(f"{p}" + (f" (x{n})" if n > 1 else "") for p, n in self.group(keys).items())
                lines.append(f"  {title}: {groups}")
        for k, (old, new) in self.resized.items():
            lines.append(f"  resized {k}: {tuple(old)} -> {tuple(new)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _unwrap_state(obj: Any, source: str) -> Dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint object and normalize its keys."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {source} is not a state dict (got {type(obj).__name__})")
    state: Mapping = obj
    for _ in range(2):  # e.g. {"model": {...}} or {"state_dict": {"model": ...}}
        for wk in _WRAPPER_KEYS:
            inner = state.get(wk) if isinstance(state, Mapping) else None
            if isinstance(inner, Mapping) and inner:
                state = inner
                break
        else:
            break
    out: Dict[str, torch.Tensor] = OrderedDict()
    for k, v in state.items():
        if not isinstance(k, str):
            continue
        if k.startswith("module."):
            k = k[len("module."):]
        if isinstance(v, torch.Tensor):
            out[k] = v
        elif type(v).__module__ == "numpy" and hasattr(v, "shape"):  # detectron2 .pkl
            out[k] = torch.as_tensor(v)
    if any(k.startswith("backbone.net.") for k in out):
        out = OrderedDict((k[len("backbone.net."):], v) for k, v in out.items() if k.startswith("backbone.net."))
    if not any(k.startswith(("patch_embed.", "blocks.")) for k in out):
        sample = ", ".join(list(state.keys())[:5]) if isinstance(state, Mapping) else ""
        raise CheckpointError(
            f"checkpoint {source} has no recognizable ViT keys "
            f"(expected patch_embed.proj.weight, blocks.0.*; found: {sample or 'nothing'})"
        )
    return out


def _prefix_tokens(n: int) -> int:
    """Number of prefix (class) tokens in a (1, P + side^2, C) position table."""
    for p in (0, 1):
        side = math.isqrt(max(n - p, 0))
        if side * side == n - p and side > 0:
            return p
    raise ValueError(f"{n} positions are not a square grid with 0 or 1 prefix tokens")


def _map_pos_embed(ckpt: torch.Tensor, target: torch.Tensor, source: str) -> torch.Tensor:
    """Fit a checkpoint pos_embed (1, P + N, C) to the model's (1, P' + N', C)."""
    if ckpt.dim() != 3 or ckpt.shape[0] != 1 or ckpt.shape[-1] != target.shape[-1]:
        raise CheckpointError(
            f"checkpoint {source}: key 'pos_embed' has shape {tuple(ckpt.shape)}, "
            f"the model expects {tuple(target.shape)} (different embedding width / model size?)"
        )
    try:
        p_ckpt = _prefix_tokens(ckpt.shape[1])
        p_model = _prefix_tokens(target.shape[1])
    except ValueError as e:
        raise CheckpointError(f"checkpoint {source}: key 'pos_embed' {tuple(ckpt.shape)}: {e}") from e
    side = math.isqrt(target.shape[1] - p_model)
    ckpt = ckpt.to(target.dtype)
    if p_ckpt == 1 and p_model == 1:
        return interpolate_pos_embed(ckpt, side, num_prefix_tokens=1)
    grid = resize_pos_embed_grid(ckpt, side, num_prefix_tokens=p_ckpt).reshape(1, side * side, -1)
    if p_model == 0:
        return grid
    return torch.cat([target.new_zeros(1, 1, target.shape[-1]), grid], dim=1)


def _resize_rel_pos(ckpt: torch.Tensor, length: int) -> torch.Tensor:
    """Linearly interpolate a (L, head_dim) rel-pos table to ``length`` rows."""
    out = F.interpolate(ckpt.float().t()[None], size=length, mode="linear")
    return out[0].t().to(ckpt.dtype)


def map_vit_encoder_state(
    model_state: Mapping[str, torch.Tensor],
    ckpt_state: Mapping[str, torch.Tensor],
    source: str,
    depth: int,
) -> Tuple[Dict[str, torch.Tensor], LoadReport]:
    """Map an encoder state dict onto a ViTDet ``ViT`` state dict.

    Args:
        model_state: ``vit.state_dict()`` (targets and shapes).
        ckpt_state: normalized checkpoint tensors (no wrapper, no prefix).
        source: name used in error messages.
        depth: number of blocks of the model.
    Returns:
        (tensors to load, report without ``new_keys``).
    Raises:
        CheckpointError: shape mismatch, too many / too few blocks, missing keys.
    """
    report = LoadReport(source=source)
    mapped: Dict[str, torch.Tensor] = OrderedDict()
    ckpt_depth = 0
    for k in ckpt_state:
        m = _BLOCK_RE.match(k)
        if m:
            ckpt_depth = max(ckpt_depth, int(m.group(1)) + 1)
    for k, v in ckpt_state.items():
        if _DROP_RE.match(k):
            report.dropped_keys.append(k)
            continue
        m = _BLOCK_RE.match(k)
        if m and int(m.group(1)) >= depth:
            raise CheckpointError(
                f"checkpoint {source}: key '{k}' is beyond the model's depth "
                f"(checkpoint has {ckpt_depth} blocks, the model {depth}; wrong model size?)"
            )
        if k not in model_state:
            report.unexpected_keys.append(k)
            continue
        target = model_state[k]
        if k == "pos_embed":
            new = _map_pos_embed(v, target, source)
            if tuple(v.shape) != tuple(new.shape):
                report.resized[k] = (tuple(v.shape), tuple(new.shape))
            mapped[k] = new
        elif k.endswith(("rel_pos_h", "rel_pos_w")) and v.dim() == 2 and v.shape[1] == target.shape[1] and v.shape[0] != target.shape[0]:
            mapped[k] = _resize_rel_pos(v, target.shape[0])
            report.resized[k] = (tuple(v.shape), tuple(target.shape))
        elif tuple(v.shape) != tuple(target.shape):
            raise CheckpointError(
                f"checkpoint {source}: key '{k}' has shape {tuple(v.shape)}, "
                f"the model expects {tuple(target.shape)} (different model size?)"
            )
        else:
            mapped[k] = v.to(target.dtype)
        report.loaded_keys.append(k)
    # Keys every encoder checkpoint must provide: all but the rel-pos tables.
    for k in model_state:
        if k in mapped or k.endswith(("rel_pos_h", "rel_pos_w")):
            continue
        m = _BLOCK_RE.match(k)
        if m:
            raise CheckpointError(
                f"checkpoint {source} lacks model key '{k}' "
                f"(checkpoint has {ckpt_depth} blocks, the model {depth}; wrong model size or architecture?)"
            )
        raise CheckpointError(f"checkpoint {source} lacks model key '{k}'")
    return mapped, report


def load_pretrained_backbone(
    vit: torch.nn.Module,
    path_or_state: Union[str, Mapping[str, Any]],
    logger: Optional[logging.Logger] = None,
) -> LoadReport:
    """Load MAE / maedet / timm encoder weights into a detection ``ViT``.

    Args:
        vit: the :class:`maedet.models.vit.ViT` (e.g. ``model.backbone.net``).
        path_or_state: checkpoint file path, or a loaded checkpoint / state dict.
        logger: where the one-table summary goes (default: this module's logger).
    Returns:
        :class:`LoadReport`.
    Raises:
        CheckpointError: unreadable file, no ViT keys, or weights that do not fit
            the model (message names the file and the first offending key).
    """
    logger = logger or logging.getLogger(__name__)
    if isinstance(path_or_state, (str, bytes)) or hasattr(path_or_state, "__fspath__"):
        source = str(path_or_state)
        obj = load_checkpoint_file(source, map_location="cpu")
    else:
        source = "<state dict>"
        obj = path_or_state
    ckpt_state = _unwrap_state(obj, source)
    model_state = vit.state_dict()
    depth = len(getattr(vit, "blocks", []))
    mapped, report = map_vit_encoder_state(model_state, ckpt_state, source, depth)
    missing, unexpected = vit.load_state_dict(mapped, strict=False)
    assert not unexpected, unexpected  # mapped only holds model keys
    report.new_keys = list(missing)
    logger.info(report.table())
    return report
