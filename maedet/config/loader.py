"""YAML configs with ``_base_`` inheritance, dotted overrides and schema validation.

A config file may name one base or a list of bases (paths relative to the file);
bases are merged in order, then the file itself on top. The merged result is
validated against a dataclass schema (see :mod:`maedet.config.schema`): an
unknown key or a value of the wrong type fails at start-up with a
:class:`~maedet.errors.ConfigError` naming the key and the file (or override)
that set it.
"""
from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from maedet.errors import ConfigError
from maedet.fileio import atomic_write_text

__all__ = ["load_yaml_with_bases", "load_config", "save_config", "to_yaml"]

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
        with open(path, "r", encoding="utf-8") as f:
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
            raise ConfigError(f"{BASE_KEY} '{base}' named in {path} not found (looked for {os.path.abspath(base_path)})")
        chain.extend(load_yaml_with_bases(base_path, _stack + (path,)))
    chain.append((path, data))
    return chain


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
        a read-only ``DictConfig``.
    """
    cfg = OmegaConf.structured(schema) if schema is not None else OmegaConf.create({})
    for file, data in load_yaml_with_bases(path):
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
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def save_config(cfg: DictConfig, path: str) -> None:
    """Write the fully resolved config (atomically) so a run can be reproduced."""
    atomic_write_text(path, to_yaml(cfg))
