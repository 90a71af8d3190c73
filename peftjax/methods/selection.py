"""Methods that train some of the model's own parameters and wrap nothing.

BitFit (biases), LN tuning (normalisation layers), linear probing (the output
head) and full fine-tuning (everything) change no computation: each is a
config with ``target_types = ()`` that goes through ``peftjax.apply`` like any
method (so it is recorded, saved and loaded) and only adds label rules. This
module holds what they share; each method is its own file.

A subclass says which parameters it trains with ``trains``. ``targets`` and
``exclude`` narrow the choice to parameters under the named modules (a
parameter is under a module when the module's path or one of its ancestors'
matches). A config that selects no parameter of the model (BitFit on a
model without biases) is an error, raised by ``peftjax.apply``.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator

from flax import nnx

from peftjax.core.paths import ALL_LINEAR, dotted, matches, suggest, unmatched
from peftjax.errors import PeftError
from peftjax.methods.base import LabelRule, MethodConfig

TRAINABLE = "trainable"


def owned_params(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Module | None, str, nnx.Param]]:
    """``(module path, module, attribute name, param)`` for every ``nnx.Param``
    in ``model``; ``module`` is ``None`` when the owner is not a module."""
    modules = dict(nnx.iter_modules(model))
    for path, variable in nnx.iter_graph(model):
        if isinstance(variable, nnx.Param):
            yield path[:-1], modules.get(path[:-1]), str(path[-1]), variable


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParamSelectionConfig(MethodConfig):
    """Base of the configs that only relabel parameters (not registered itself)."""

    target_types = ()

    def __post_init__(self):
        super().__post_init__()
        self.check(self.targets != ALL_LINEAR, "targets", "selects layers to wrap; this method wraps none")

    def trains(self, *, model: nnx.Module, module_path: str, module: nnx.Module | None, name: str) -> bool:
        """Whether the parameter ``name`` of ``module`` (at ``module_path``) trains."""
        raise NotImplementedError

    def _in_scope(self, module_path: tuple) -> bool:
        ancestors = [dotted(module_path[:i]) for i in range(1, len(module_path) + 1)]
        if self.targets is not None and not any(matches(p, self.targets) for p in ancestors):
            return False
        return not (self.exclude and any(matches(p, self.exclude) for p in ancestors))

    def selected_params(self, model: nnx.Module) -> list[str]:
        """Dotted paths of the parameters this config trains on ``model``."""
        return [
            dotted((*path, name))
            for path, module, name, _ in owned_params(model)
            if self._in_scope(path) and self.trains(model=model, module_path=dotted(path), module=module, name=name)
        ]

    def describe_selection(self) -> str:
        """What the config selects, for the error when it selects nothing."""
        return type(self).__name__

    def label_rules(self, model: nnx.Module) -> list[LabelRule]:
        if self.targets is not None:
            paths = [dotted(path) for path, _ in nnx.iter_modules(model) if path]
            missed = unmatched(self.targets, paths)
            if missed:
                raise PeftError(f"{type(self).__name__}.targets: {missed} match no module of this "
                                f"{type(model).__name__}; every entry must name a module." + suggest(missed, paths))
        selected = self.selected_params(model)
        if not selected:
            scope = (
                ""
                if self.targets is None and not self.exclude
                else f" (targets={self.targets!r}, exclude={self.exclude!r})"
            )
            raise PeftError(
                f"{type(self).__name__} selects no parameter of this {type(model).__name__}{scope}: "
                f"it trains {self.describe_selection()}, and the model has none"
            )
        exact = "|".join(re.escape(path) for path in selected)
        return [*super().label_rules(model), (exact, TRAINABLE)]
