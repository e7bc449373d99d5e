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
from maedet.data.transforms import max_output_side
from maedet.utils import registry
from maedet.utils.errors import ConfigError, MaedetError

__all__ = [
    "check_input_geometry",
    "load_detection_config",
    "load_pretrain_config",
    "resolve_section",
    "resolve_split",
]

logger = logging.getLogger("maedet")


def _import_components() -> None:
    """Import the packages whose modules register the built-in components."""
    import maedet.data.repeat_factor  # noqa: F401
    import maedet.data.samplers  # noqa: F401
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


def check_input_geometry(container: Dict[str, Any], train: bool = True, test: bool = True) -> None:
    """The images the pipelines make against the square the detector pads them to.

    ViTDet pads every batch to ``model.neck.square_pad`` and trains on LSJ crops of
    exactly that size (1024 and 1024), so a training image fills its square. A larger
    square pads every training image, its content always in the top-left corner, and
    the model learns that geometry instead of the objects: held-out AP drops several
    times while the training images are still fitted. That is refused (``train``).
    A test resize whose longer side differs from the square gets a warning: it is a
    valid choice (another test scale) but not the recipe's.

    Args:
        container: the resolved config as a dict (plug-in sections resolved).
        train: check the training pipeline (off where only evaluation runs).
        test: check the test resize (off where no dataset is evaluated: converter, Predictor).
    Raises:
        ConfigError: the training pipeline's largest side differs from the square; the
            message names both keys.
    """
    square = int(_get(container, "model.neck").get("square_pad", 0) or 0)
    if square <= 0:
        return
    train_side = max_output_side(_get(container, "data.train.pipeline")) if train else None
    if train_side is not None and train_side[1] != square:
        key, side = train_side
        why = (
            f"every training image would be padded to {square} x {square} with its content in the top-left corner"
            if side < square
            else f"training images of up to {side} px exceed the {square} square"
        )
        raise ConfigError(
            f"model.neck.square_pad={square} differs from data.train.pipeline.{key}={side}: {why}; "
            f"set both to the same size (ViTDet pads to its LSJ crop: 1024 and 1024)"
        )
    test_side = max_output_side(_get(container, "data.test.pipeline")) if test else None
    if test_side is not None and test_side[1] != square:
        key, side = test_side
        logger.warning(
            f"data.test.pipeline.{key}={side} differs from model.neck.square_pad={square}: test images "
            f"are {'padded more' if side < square else 'larger'} than the training inputs "
            f"(ViTDet tests at a longer side equal to the square)"
        )


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
    check_input_geometry(container, train="train" in splits, test="test" in splits)
    return _freeze(container, DetectionConfig)


def load_pretrain_config(path: str, overrides: Optional[List[str]] = None) -> DictConfig:
    """A pretraining config (its model and data keys are all declared in the schema), complete."""
    cfg = load_config(path, list(overrides or []), PretrainConfig)
    check_complete(cfg, path)
    return cfg
