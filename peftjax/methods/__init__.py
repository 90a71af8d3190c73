"""PEFT methods, one file each. Importing this package imports every module in
it, and each method file registers itself, so a new method is a new file here."""

import importlib
import pkgutil

from peftjax.methods.base import registered_methods

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["registered_methods"]
