"""Errors raised while building or loading reference models.

All derive from ``ModelLoadError`` (a ``ValueError``) so callers can catch
one type; a checkpoint that cannot be found is also a ``FileNotFoundError``.
Messages name the file or key at fault and say how to fix it.
"""

from __future__ import annotations


class ModelLoadError(ValueError):
    """A checkpoint or configuration that cannot become a peftjax model."""


class CheckpointNotFoundError(ModelLoadError, FileNotFoundError):
    """The checkpoint folder, ``config.json`` or a weight file is missing."""


class UnsupportedModelError(ModelLoadError):
    """A ``model_type`` or task that peftjax has no implementation for."""
