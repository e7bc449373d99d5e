"""What a checkpoint load or conversion did (one report type), and the one checkpoint unwrapper."""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from maedet.utils.errors import CheckpointError

__all__ = ["Report", "group_keys", "unwrap_state_dict", "to_tensor", "shape_of"]

_WRAPPERS = ("model", "state_dict", "encoder")


def group_keys(keys: Sequence[str]) -> OrderedDict[str, int]:
    """Collapse numbered layers: ``blocks.3.attn.rel_pos_h`` -> ``blocks.*.attn.rel_pos_h``, with counts."""
    out: OrderedDict[str, int] = OrderedDict()
    for k in keys:
        pattern = re.sub(r"(^|\.)(blocks|decoder_blocks)\.\d+\.", r"\1\2.*.", k)
        out[pattern] = out.get(pattern, 0) + 1
    return out


def _grouped(keys: Sequence[str]) -> str:
    return ", ".join(p + (f" (x{n})" if n > 1 else "") for p, n in group_keys(list(keys)).items())


@dataclass
class Report:
    """What a checkpoint load or conversion did.

    Attributes:
        source: input file (or "<state dict>").
        action: e.g. ``"mae -> timm"`` or ``"pretrained backbone"``.
        destination: output file, once written.
        loaded: (source key, output key) pairs carried over.
        missing: output / model keys the source could not provide.
        unexpected: source keys with no place in the output (not written).
        dropped: source keys left out on purpose (decoder, head, pixel_mean ...).
        changed: output key -> what was done to the tensor (resize, class reorder).
        notes: free-form lines (architecture, defaults used).
    """

    source: str
    action: str
    destination: Optional[str] = None
    loaded: List[Tuple[str, str]] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    changed: OrderedDict[str, str] = field(default_factory=OrderedDict)
    notes: List[str] = field(default_factory=list)

    @property
    def loaded_keys(self) -> List[str]:
        return [dst for _, dst in self.loaded]

    def table(self) -> str:
        """A printable table: counts per category, then the keys behind each non-zero count."""
        head = f"{self.action}: {self.source}" + (f" -> {self.destination}" if self.destination else "")
        rows = [
            ("loaded", self.loaded),
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("dropped", self.dropped),
            ("changed", list(self.changed)),
        ]
        lines = [head, "  +------------+-------+", "  | keys       | count |", "  +------------+-------+"]
        lines += [f"  | {name:<10} | {len(keys):>5} |" for name, keys in rows]
        lines.append("  +------------+-------+")
        for name, keys in rows[1:4]:
            if keys:
                lines.append(f"  {name}: {_grouped(keys)}")
        lines += [f"  changed {k}: {what}" for k, what in self.changed.items()]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def to_tensor(v: Any) -> Optional[torch.Tensor]:
    """A tensor, or a numpy array (detectron2 ``.pkl``) as a tensor; None for anything else."""
    if isinstance(v, torch.Tensor):
        return v
    if type(v).__module__.startswith("numpy") and hasattr(v, "shape"):
        import numpy as np

        return torch.from_numpy(np.ascontiguousarray(v))
    return None


def shape_of(t: Any) -> Tuple[int, ...]:
    return tuple(int(s) for s in t.shape)


def unwrap_state_dict(obj: Any, source: str, strip_prefix: str = "") -> OrderedDict[str, torch.Tensor]:
    """The tensors of a checkpoint object, however it is wrapped.

    Looks through up to two levels of ``model`` / ``state_dict`` / ``encoder``
    wrappers, keeps string keys with tensor (or numpy) values, strips a leading
    ``module.`` (DDP) and, when given, ``strip_prefix`` from keys that have it
    (keys without it are then left out).

    Raises:
        CheckpointError: ``obj`` is not a dictionary, or holds no tensors.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {source} is not a dictionary (got {type(obj).__name__})")
    state: Mapping = obj
    for _ in range(2):
        inner = next((state[w] for w in _WRAPPERS if isinstance(state.get(w), Mapping) and state[w]), None)
        if inner is None:
            break
        state = inner
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for k, v in state.items():
        t = to_tensor(v)
        if not isinstance(k, str) or t is None:
            continue
        k = k[len("module.") :] if k.startswith("module.") else k
        if strip_prefix:
            if not k.startswith(strip_prefix):
                continue
            k = k[len(strip_prefix) :]
        out[k] = t
    if not out:
        sample = ", ".join(str(k) for k in list(state.keys())[:5])
        raise CheckpointError(f"checkpoint {source} holds no tensors (found keys: {sample or 'none'})")
    return out


def meta_of(obj: Any) -> Dict[str, Any]:
    """The ``meta`` dictionary of a maedet checkpoint (empty if absent)."""
    meta = obj.get("meta") if isinstance(obj, Mapping) else None
    return dict(meta) if isinstance(meta, Mapping) else {}
