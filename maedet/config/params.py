"""Config schemas read off constructor signatures, for the plug-in sections.

A registered component (a backbone class, a pipeline factory, ...) declares its
configurable arguments once, in its signature, with type hints and defaults::

    class ViT(Backbone):
        def __init__(self, *, embed_dim: int, depth: int, num_heads: int,
                     window_size: int = 14, act_checkpoint: bool = False, ...)

:func:`signature_schema` turns that signature into a dataclass that OmegaConf
validates a config section against: unknown keys, wrong types and values outside
a ``Literal`` fail naming the key; an argument without a default must be set in
the config. Arguments whose type cannot come from a YAML file (modules,
callables) keep their Python defaults and are not configurable.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any, Callable, List, Literal, Optional, Sequence, Tuple, Type, Union

from omegaconf import MISSING

__all__ = ["signature_schema", "config_type"]

_SCALARS = (bool, int, float, str)


def config_type(hint: Any) -> Optional[Any]:
    """The OmegaConf-compatible type for a Python type hint, or None if a config cannot hold it.

    ``int``/``float``/``bool``/``str`` and ``Literal[...]`` stay; ``Optional[X]`` stays
    optional; any sequence (``Sequence[int]``, ``Tuple[int, ...]``, ``Tuple[float, float]``,
    ``List[List[float]]``) becomes a ``List`` of its element type; ``Any`` stays ``Any``.
    """
    if hint is Any or hint in _SCALARS:
        return hint
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        return hint
    if origin is Union:
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            inner = config_type(rest[0])
            return Optional[inner] if inner is not None else None
        return None
    if origin in (list, tuple, Sequence, typing.Sequence) or (
        origin is not None and isinstance(origin, type) and issubclass(origin, Sequence) and origin is not str
    ):
        elems = [a for a in args if a is not Ellipsis]
        if not elems:
            return List[Any]
        inner = [config_type(a) for a in elems]
        if any(t is None for t in inner):
            return None
        if len(set(map(repr, inner))) == 1:
            return List[inner[0]]
        return List[Any]
    return None


def _parameters(fn: Callable):
    """(name, parameter, type hints) of ``fn``'s arguments; a class whose ``__init__`` takes
    ``**kwargs`` also gets its base class's arguments (what the kwargs are passed on to)."""
    targets = [fn.__init__] if inspect.isclass(fn) else [fn]
    if inspect.isclass(fn):
        for base in fn.__mro__[1:]:
            params = inspect.signature(targets[-1]).parameters.values()
            if not any(p.kind == p.VAR_KEYWORD for p in params) or base.__init__ is object.__init__:
                break
            if "__init__" in base.__dict__:
                targets.append(base.__init__)
    for target in targets:
        try:
            hints = typing.get_type_hints(target)
        except Exception as e:  # noqa: BLE001 - unresolvable forward references
            raise TypeError(f"cannot read the type hints of {fn.__qualname__}: {e}") from e
        for name, p in inspect.signature(target).parameters.items():
            if name not in ("self", "cls") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                yield name, p, hints


def _plain_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain_default(v) for v in value]
    if isinstance(value, list):
        return [_plain_default(v) for v in value]
    return value


@functools.cache
def signature_schema(fn: Callable, supplied: Tuple[str, ...] = ()) -> Type:
    """A dataclass whose fields are the configurable keyword arguments of ``fn``.

    Args:
        fn: a class (its ``__init__`` is read, and its base class's when it takes
            ``**kwargs``; names in the class attribute ``config_exclude`` are left
            out) or a function.
        supplied: arguments the caller passes itself (not config keys).
    Returns:
        a dataclass type; field defaults are the signature's (``???`` when the
        argument has none).
    Raises:
        TypeError: an argument without a default has a type a config cannot hold
            and is not in ``supplied`` (a programming error in the component).
    """
    excluded = set(supplied) | set(getattr(fn, "config_exclude", ()))
    fields: List[Tuple[str, Any, Any]] = []
    for name, p, hints in _parameters(fn):
        if name in excluded or name in (f[0] for f in fields):
            continue
        t = config_type(hints.get(name, Any))
        has_default = p.default is not inspect.Parameter.empty
        if t is None:
            if has_default:
                continue  # not configurable; the Python default applies
            raise TypeError(f"{fn.__qualname__}: argument {name!r} has no default and no config type")
        if not has_default:
            fields.append((name, t, dataclasses.field(default=MISSING)))
            continue
        default = _plain_default(p.default)
        if isinstance(default, (list, dict)):
            fields.append((name, t, dataclasses.field(default_factory=functools.partial(_copy, default))))
        else:
            fields.append((name, t, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{fn.__name__}Params", fields)


def _copy(value: Any) -> Any:
    return [_copy(v) for v in value] if isinstance(value, list) else dict(value) if isinstance(value, dict) else value
