"""Registries: the plug-in points of maedet, each mapping a name used in configs to a callable.

A new backbone, neck, detector, RoI head or augmentation pipeline is a new file
whose class (or factory function) is decorated with ``@REGISTRY.register("name")``;
its module is imported by its package's ``__init__`` (or by the user's own code
before building). A config then selects it by name::

    model:
      backbone: {name: vit, embed_dim: 768, depth: 12, ...}

The other keys of such a section are the keyword arguments of the registered
callable: their names, types and defaults are read off its signature
(:func:`maedet.config.params.signature_schema`), so an unknown or mistyped key
fails at start-up naming the key. Arguments that the builder supplies itself
(the backbone module a neck wraps, the number of classes of a head, ...) are
listed in :attr:`Registry.supplied`.

All registries of the project are defined here, in one place.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, Optional, Tuple, TypeVar

from maedet.utils.errors import ConfigError

__all__ = [
    "Registry",
    "BACKBONES",
    "NECKS",
    "PROPOSAL_GENERATORS",
    "ROI_HEADS",
    "DETECTORS",
    "PIPELINES",
]

T = TypeVar("T", bound=Callable)


class Registry:
    """A name -> callable table for one kind of component.

    Args:
        kind: what the entries are, used in messages ("backbone", ...).
        supplied: names of constructor arguments the builder passes itself;
            they are not config keys.
    """

    def __init__(self, kind: str, supplied: Tuple[str, ...] = ()):
        self.kind = kind
        self.supplied = tuple(supplied)
        self._entries: Dict[str, Callable] = {}

    def register(self, name: Optional[str] = None) -> Callable[[T], T]:
        """Decorator: ``@BACKBONES.register("vit")`` (default name: the callable's ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or obj.__name__
            old = self._entries.get(key)
            if old is not None and old is not obj:
                raise ValueError(f"{self.kind} {key!r} is already registered (by {old.__module__}.{old.__qualname__})")
            self._entries[key] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable:
        """The callable registered as ``name``; a ConfigError listing the known names otherwise."""
        if name not in self._entries:
            known = ", ".join(sorted(self._entries)) or "none"
            raise ConfigError(f"unknown {self.kind} {name!r}; registered: {known}")
        return self._entries[name]

    def names(self) -> Tuple[str, ...]:
        return tuple(sorted(self._entries))

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self.names())})"


# A backbone: ``cls(**kwargs) -> Backbone`` (see maedet.models.backbones.base).
BACKBONES = Registry("backbone")
# A neck turns a backbone's features into the detector's feature maps: ``cls(net=backbone, **kwargs)``.
NECKS = Registry("neck", supplied=("net",))
# Proposal generators (RPN): ``cls(input_shape=neck.output_shape(), **kwargs)``.
PROPOSAL_GENERATORS = Registry("proposal generator", supplied=("input_shape",))
# RoI heads (box + mask): ``cls(input_shape=..., num_classes=K, **kwargs)``.
ROI_HEADS = Registry("RoI heads", supplied=("input_shape", "num_classes"))
# Detectors ("meta architectures") that put the parts together.
DETECTORS = Registry("detector", supplied=("backbone", "proposal_generator", "roi_heads"))
# Data augmentation pipelines: ``fn(**kwargs) -> callable``.
PIPELINES = Registry("augmentation pipeline")
# Training samplers: ``fn(dataset=..., seed=..., rank=..., world_size=..., start=..., **kwargs) -> Sampler``
# yielding ``(index, sample_seed)`` forever (see maedet.data.samplers).
SAMPLERS = Registry("training sampler", supplied=("dataset", "seed", "rank", "world_size", "start"))
