"""Models: the MAE, backbones, necks and detectors. Importing this package registers
every built-in component under its name."""

from . import backbones, detectors, necks  # noqa: F401
