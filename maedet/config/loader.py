"""YAML configs with ``_base_`` inheritance, dotted overrides and schema validation.

A config file may name one base or a list of bases (paths relative to the file);
bases are merged in order, then the file itself on top. A mapping marked
``_replace_: true`` replaces the base's mapping instead of merging into it. The merged result is
validated against a dataclass schema (see :mod:`maedet.config.schema`): an
unknown key or a value of the wrong type fails at start-up with a
:class:`~maedet.utils.errors.ConfigError` naming the key and the file (or override)
that set it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from maedet.utils.errors import ConfigError
from maedet.utils.fileio import atomic_write_text

__all__ = [
    "load_yaml_with_bases",
    "load_config",
    "save_config",
    "to_yaml",
    "check_ranges",
    "check_complete",
    "describe_range",
]

BASE_KEY = "_base_"


class _YamlLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` whose only booleans are ``true`` / ``false`` (YAML 1.2).

    YAML 1.1 also reads ``on``/``off``/``yes``/``no`` as booleans, which would turn
    ``train.amp: off`` into ``False`` and then into the string ``"False"``. Here they
    stay strings; a boolean field still accepts them (OmegaConf converts
    ``yes``/``no``/``on``/``off`` for ``bool`` fields)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _parse_yaml(text) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def _read_yaml(path: str) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = _parse_yaml(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level, got {type(data).__name__}")
    return data


def load_yaml_with_bases(path: str, _stack: Tuple[str, ...] = ()) -> List[Tuple[str, Dict[str, Any]]]:
    """Resolve ``_base_`` inheritance.

    Returns:
        the chain of (file, content without ``_base_``) in merge order: the
        deepest base first, ``path`` itself last.
    """
    path = os.path.abspath(path)
    if path in _stack:
        cycle = " -> ".join(os.path.relpath(p) for p in _stack + (path,))
        raise ConfigError(f"_base_ cycle in configs: {cycle}")
    data = _read_yaml(path)
    bases = data.pop(BASE_KEY, None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{BASE_KEY} in {path} must be a path or a list of paths")
    chain: List[Tuple[str, Dict[str, Any]]] = []
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            raise ConfigError(
                f"{BASE_KEY} '{base}' named in {path} not found (looked for {os.path.abspath(base_path)})"
            )
        chain.extend(load_yaml_with_bases(base_path, _stack + (path,)))
    chain.append((path, data))
    return chain


REPLACE_KEY = "_replace_"


def _replaced_paths(data: Dict[str, Any], prefix: str = "") -> List[str]:
    """Dotted paths of the mappings in ``data`` that carry ``_replace_: true`` (the marker is removed).

    A plug-in section that switches to another component (say ``model.backbone``
    from ``vit`` to ``resnet``) must not inherit the base's keys: ``_replace_: true``
    in it makes the file's mapping replace the base's instead of merging into it.
    """
    out = []
    for key, value in list(data.items()):
        if isinstance(value, dict):
            if value.pop(REPLACE_KEY, False) is True:
                out.append(prefix + key)
            out.extend(_replaced_paths(value, prefix + key + "."))
    return out


def _describe(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if key:
        return f"key '{key}': {msg}"
    return msg


def _merge_checked(schema_cfg: DictConfig, part: Any, where: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema_cfg, part)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config in {where}: {_describe(e)}") from e


def load_config(path: str, overrides: Optional[Sequence[str]] = None, schema: Optional[Type] = None) -> DictConfig:
    """Load ``path`` with its bases, apply ``key.sub=value`` overrides, validate.

    Args:
        path: YAML file.
        overrides: strings ``a.b=value`` (value parsed as YAML).
        schema: a dataclass type; the result is a structured (typed, closed)
            config. Without it, the merged config is returned untyped.
    Returns:
        a read-only ``DictConfig``. Mandatory keys (``???``) may still be unset;
        :func:`check_complete` checks them (the builders do, before a run).
    """
    cfg = OmegaConf.structured(schema) if schema is not None else OmegaConf.create({})
    for file, data in load_yaml_with_bases(path):
        for key in _replaced_paths(data):  # sections marked `_replace_: true` replace the base's
            try:
                OmegaConf.update(cfg, key, {}, merge=False)
            except OmegaConfBaseException as e:
                raise ConfigError(f"invalid config in {file}: {_describe(e)}") from e
        cfg = _merge_checked(cfg, data, file)
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, value = item.split("=", 1)
        key = key.strip()
        try:
            parsed = _parse_yaml(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        try:
            update = OmegaConf.from_dotlist([])
            OmegaConf.update(update, key, parsed, force_add=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"invalid override '{item}': {_describe(e)}") from e
        cfg = _merge_checked(cfg, update, f"command-line override '{item}'")
    if schema is not None:
        check_ranges(cfg, schema)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def check_complete(cfg: DictConfig, path: str, prefix: str = "") -> None:
    """Raise a ConfigError for the first mandatory key (``???``) that no file or override set."""
    for key in cfg:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(
                f"key '{full}' is not set in {path} or its bases (it has no default; "
                f"set it in the config or with {full}=VALUE)"
            )
        node = cfg._get_node(key)
        if isinstance(node, DictConfig):
            check_complete(node, path, full + ".")


def describe_range(bounds: Dict[str, float]) -> str:
    """``{"ge": 0, "lt": 1}`` -> ``">= 0 and < 1"``."""
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    return " and ".join(f"{ops[k]} {v:g}" for k, v in bounds.items())


def _in_range(value: float, bounds: Dict[str, float]) -> bool:
    if isinstance(value, float) and math.isnan(value):
        return False
    checks = {
        "ge": lambda b: value >= b,
        "gt": lambda b: value > b,
        "le": lambda b: value <= b,
        "lt": lambda b: value < b,
    }
    return all(checks[k](b) for k, b in bounds.items())


def check_ranges(cfg: DictConfig, schema: Type, prefix: str = "") -> None:
    """Check every field declared with :func:`maedet.config.schema.bounded` against its range.

    Raises:
        ConfigError: naming the key, its value and the allowed range.
    """
    for f in dataclasses.fields(schema):
        value = cfg.get(f.name)
        full = f"{prefix}{f.name}"
        bounds = f.metadata.get("range")
        numeric = value is not None and not isinstance(value, bool) and isinstance(value, (int, float))
        if bounds and numeric and not _in_range(value, bounds):
            raise ConfigError(f"{full}={value}: must be {describe_range(bounds)}")
        sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        sub_type = type(sub()) if sub is not None else None
        if sub_type is not None and dataclasses.is_dataclass(sub_type) and isinstance(value, DictConfig):
            check_ranges(value, sub_type, full + ".")


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str) -> None:
    """Write the fully resolved config (atomically) so a run can be reproduced."""
    atomic_write_text(path, to_yaml(cfg))
