"""Methods and strategies from outside the package.

A method or training strategy registers itself when its module is imported
(``@register_method`` / ``@register_strategy``), so using one from another
package only takes importing that module before configs are read. Three ways
say which modules:

* ``--plugin MODULE`` on any ``peftjax`` command (repeatable);
* ``plugins: [MODULE, ...]`` at the top of an experiment config;
* an installed distribution's entry points in the ``peftjax.methods`` or
  ``peftjax.strategies`` group (``[project.entry-points."peftjax.methods"]``,
  ``my_method = "my_package.my_method"``), loaded by every command and, when a
  config names a method or strategy nobody registered, by the registries.

Modules are imported by name from ``sys.path``, as ``import`` would.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
from collections.abc import Iterable

from peftjax.errors import PeftError

ENTRY_POINT_GROUPS = ("peftjax.methods", "peftjax.strategies")


class PluginError(PeftError):
    """A plugin module that cannot be imported."""


@functools.cache
def load_entry_points() -> tuple[str, ...]:
    """Import every module the installed distributions declare in ``ENTRY_POINT_GROUPS``
    (once per process); returns their ``name = value`` lines."""
    loaded = []
    for group in ENTRY_POINT_GROUPS:
        for entry in importlib.metadata.entry_points(group=group):
            try:
                entry.load()
            except Exception as err:  # noqa: BLE001 - any failure of a third party's import becomes one clear error
                owner = entry.dist.name if entry.dist else "an unknown distribution"
                raise PluginError(
                    f"entry point {entry.name} = {entry.value} (group {group}, from {owner}) failed to import: "
                    f"{type(err).__name__}: {err}. Fix or uninstall {owner}"
                ) from err
            loaded.append(f"{entry.name} = {entry.value}")
    return tuple(loaded)


def load_plugins(modules: Iterable[str] = ()) -> None:
    """Import the entry points, then ``modules`` (``--plugin`` / ``plugins:``), by module name."""
    load_entry_points()
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name is not None and name.startswith(err.name):  # the plugin itself, not one of its imports
                raise PluginError(
                    f"plugin module {name!r} not found: put the folder that holds it on PYTHONPATH, or install its "
                    "package (plugins name modules, as in 'import my_package.my_method', not files)"
                ) from None
            raise PluginError(f"plugin module {name!r} failed to import: {err}") from err
        except Exception as err:  # noqa: BLE001 - as for entry points
            raise PluginError(f"plugin module {name!r} failed to import: {type(err).__name__}: {err}") from err
