"""The errors of the data package: each says what to fix."""

from __future__ import annotations

from peftjax.errors import PeftError


class DataError(PeftError):
    """Data that cannot be loaded or does not fit the model; the message says how to fix it."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or folder the config names does not exist."""
