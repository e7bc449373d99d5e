"""Exceptions for bad input. Each carries one message naming what and where.

Tools catch :class:`MaedetError` at the top level, print its message on one line
and exit with a non-zero code; anything else is a bug and keeps its traceback.
"""


class MaedetError(Exception):
    """Base class for errors caused by user input (files, configs, checkpoints)."""


class ConfigError(MaedetError):
    """A config file or override is invalid: unknown key, wrong type, bad ``_base_``."""


class DatasetError(MaedetError):
    """A dataset, annotation file or image cannot be read or is inconsistent."""


class CheckpointError(MaedetError):
    """A checkpoint is missing, truncated, not a checkpoint, or does not fit the model."""


class TrainingError(MaedetError):
    """Training cannot go on (for example a non-finite loss under the ``stop`` policy)."""
