"""Backbones; importing this package registers them (:data:`maedet.utils.registry.BACKBONES`)."""

from . import resnet, vit  # noqa: F401
from .base import Backbone  # noqa: F401
