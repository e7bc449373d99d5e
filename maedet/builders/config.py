"""Loading a config for a tool: the YAML chain, the overrides, then the plug-in sections and datasets resolved.

:func:`load_detection_config` / :func:`load_pretrain_config` return the config a
run uses and writes to ``output_dir/config.yaml``: every plug-in section
(``model.backbone``, ``model.roi_heads``, ``data.train.pipeline`` ...) checked
against the signature of the component its ``name`` selects and filled with
that component's defaults, and every dataset split resolved to the files it
reads. A second load of the written file resolves to the same config.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from maedet.config.loader import check_complete, check_ranges, load_config
from maedet.config.params import signature_schema
from maedet.config.schema import PLUGIN_SECTIONS, DetectionConfig, PretrainConfig
from maedet.data.catalog import DatasetCatalog
from maedet.utils import registry
from maedet.utils.errors import ConfigError, MaedetError

__all__ = ["load_detection_config", "load_pretrain_config", "resolve_section", "resolve_split"]

logger = logging.getLogger("maedet")


def _import_components() -> None:
    """Import the packages whose modules register the built-in components."""
    import maedet.data.transforms  # noqa: F401
    import maedet.models  # noqa: F401


def resolve_section(
    section: Dict[str, Any], path: str, reg: registry.Registry, builder_keys: Sequence[str] = ()
) -> Dict[str, Any]:
    """A plug-in section checked against its component's signature and completed with its defaults.

    Args:
        section: ``{"name": ..., **kwargs}`` as the YAML files and overrides left it.
        path: its key in the config (for messages), e.g. ``model.backbone``.
        reg: the registry ``name`` is looked up in.
        builder_keys: keys the builder reads itself (kept as they are).
    Raises:
        ConfigError: unknown name, unknown key, wrong type or value, mandatory key
            not set; the message names the key.
    """
    section = dict(section or {})
    name = section.pop("name", None)
    if not name:
        raise ConfigError(f"{path}.name is not set (registered: {', '.join(reg.names())})")
    try:
        fn = reg.get(str(name))
    except ConfigError as e:
        raise ConfigError(f"{path}.name: {e}") from None
    own = {k: section.pop(k) for k in builder_keys if k in section}
    schema = signature_schema(fn, reg.supplied)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), section)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        msg = str(e).splitlines()[0]
        if "not in" in msg or "Key '" in msg:
            msg = f"not an argument of {reg.kind} '{name}' ({fn.__module__}.{fn.__qualname__})"
        raise ConfigError(f"invalid config: key '{path}.{key}': {msg}") from None
    for key in merged:
        if OmegaConf.is_missing(merged, key):
            raise ConfigError(f"key '{path}.{key}' is not set ({reg.kind} '{name}' has no default for it)")
    return {"name": str(name), **own, **OmegaConf.to_container(merged, resolve=True)}


def resolve_split(split: Dict[str, Any], path: str) -> Dict[str, Any]:
    """A dataset split with its files: ``json`` + ``images`` when given (they win over
    ``name``; the resolved split then has no name), else the catalog's files for ``name``."""
    split = dict(split)
    if split.get("json") or split.get("images"):
        if not (split.get("json") and split.get("images")):
            raise ConfigError(
                f"{path}: give both json and images (got json={split.get('json')!r}, images={split.get('images')!r})"
            )
        if split.get("name"):
            logger.info(
                f"{path}: using json + images ({split['json']}); the catalog name {split['name']!r} is not used"
            )
            split["name"] = ""
        return split
    if not split.get("name"):
        raise ConfigError(f"{path}: set name (a registered dataset) or json and images")
    try:
        split["json"], split["images"] = DatasetCatalog.get(split["name"])
    except MaedetError as e:
        raise type(e)(f"{path}.name: {e}") from None
    return split


def _get(container: Dict[str, Any], path: str) -> Any:
    node = container
    for part in path.split("."):
        node = node[part]
    return node


def _set(container: Dict[str, Any], path: str, value: Any) -> None:
    parts = path.split(".")
    node = container
    for part in parts[:-1]:
        node = node[part]
    node[parts[-1]] = value


def _freeze(container: Dict[str, Any], schema) -> DictConfig:
    cfg = OmegaConf.merge(OmegaConf.structured(schema), container)
    check_ranges(cfg, schema)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def load_detection_config(
    path: str, overrides: Optional[List[str]] = None, splits: Sequence[str] = ("train", "test")
) -> DictConfig:
    """A detection config, ready for the builders (see the module docstring).

    ``splits``: the dataset splits to resolve to their files (evaluation needs only
    ``test``; the Predictor and the converter none, ``()``).
    """
    _import_components()
    cfg = load_config(path, list(overrides or []), DetectionConfig)
    check_complete(cfg, path)
    container = OmegaConf.to_container(cfg, resolve=True)
    for key, (reg_name, builder_keys) in PLUGIN_SECTIONS.items():
        _set(container, key, resolve_section(_get(container, key), key, getattr(registry, reg_name), builder_keys))
    for split in splits:
        _set(container, f"data.{split}", resolve_split(_get(container, f"data.{split}"), f"data.{split}"))
    return _freeze(container, DetectionConfig)


def load_pretrain_config(path: str, overrides: Optional[List[str]] = None) -> DictConfig:
    """A pretraining config (its model and data keys are all declared in the schema), complete."""
    cfg = load_config(path, list(overrides or []), PretrainConfig)
    check_complete(cfg, path)
    return cfg
