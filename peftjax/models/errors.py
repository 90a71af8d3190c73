"""Errors raised while building or loading reference models (members of :mod:`peftjax.errors`' family).

All derive from ``ModelLoadError`` (a ``PeftError``) so callers can catch
one type; a checkpoint that cannot be found is also a ``FileNotFoundError``.
Messages name the file or key at fault and say how to fix it.
"""

from peftjax.errors import CheckpointNotFoundError, ModelLoadError, UnsupportedModelError

__all__ = ["CheckpointNotFoundError", "ModelLoadError", "UnsupportedModelError"]
