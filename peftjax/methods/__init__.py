"""PEFT methods, one file each. ``import_all`` imports every module in this
package and each method file registers itself, so a new method is a new file
here. ``peftjax/__init__.py`` calls it once the core is loaded (method files
import the core, and the core imports ``methods.base``)."""

import importlib
import pkgutil

from peftjax.methods.base import registered_methods


def import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


__all__ = ["import_all", "registered_methods"]
