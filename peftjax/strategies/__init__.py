"""Training strategies, one file each. ``import_all`` imports every module in this
package and each strategy file registers itself, so a new strategy is a new file
here; the API is in ``peftjax.strategies.base`` and docs/extending.md."""

import importlib
import pkgutil

from peftjax.strategies.base import Strategy, register_strategy, registered_strategies, strategy_from_dict


def import_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


import_all()

__all__ = ["Strategy", "import_all", "register_strategy", "registered_strategies", "strategy_from_dict"]
