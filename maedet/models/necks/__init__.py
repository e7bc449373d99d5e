"""Necks; importing this package registers them (:data:`maedet.utils.registry.NECKS`)."""

from . import simple_fpn  # noqa: F401
