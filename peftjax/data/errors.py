"""The errors of the data package (members of :mod:`peftjax.errors`' family)."""

from peftjax.errors import DataError, DataFileNotFoundError

__all__ = ["DataError", "DataFileNotFoundError"]
