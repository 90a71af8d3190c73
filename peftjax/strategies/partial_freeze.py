"""Partial freezing: only the top ``top`` layer groups (or the named ones) train.

The textbook recipe between feature extraction and full fine-tuning: the
lower layers learn general features and stay as they are, the upper ones
adapt (Yosinski et al. 2014; Lee et al. 2019 for BERT). Groups are the
model's layer groups (``peftjax.layer_groups``): ``embeddings``, ``layer.0``
... ``layer.{L-1}``, ``final`` (final norm, pooler), ``head``. ``top: 4`` on
MiniLM trains the head, the pooler and layers 5 and 4; ``groups: [head, -3]``
names them, by name or index (0 the bottom group, -1 the top one).

This strategy only freezes: what trains inside the chosen groups is what the
methods train there. With ``full`` the chosen groups train entirely; with an
adapter method only its adapters in the chosen groups do (and the head if
the method trains it: ``also_train``).
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from peftjax.core.layer_groups import layer_groups, select_groups
from peftjax.errors import PeftError
from peftjax.methods.base import FROZEN, LabelRule
from peftjax.schema import require
from peftjax.strategies.base import Strategy, register_strategy


@register_strategy("partial_freeze")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PartialFreezeConfig(Strategy):
    """Freeze every layer group but the top ``top`` ones, or but ``groups``.

    Attributes:
      top: how many groups, counted from the top (the head first), train.
      groups: the groups that train, by name or index (0 the bottom one, -1
        the top one); instead of ``top``.
    """

    top: int | None = None
    groups: tuple[int | str, ...] = ()

    def _validate(self) -> None:
        require((self.top is None) != (not self.groups), "top", "set exactly one of top and groups")
        require(self.top is None or self.top >= 1, "top", f"must be at least 1, got {self.top}")

    def trained_groups(self, model: nnx.Module) -> list[str]:
        """The names of the groups that train, bottom first."""
        if self.groups:
            return [group.name for group in select_groups(model, self.groups, key="partial_freeze.groups")]
        names = [group.name for group in layer_groups(model)]
        if self.top > len(names):
            raise PeftError(f"partial_freeze.top={self.top}: {type(model).__name__} has {len(names)} layer "
                            f"groups {names}")
        return names[len(names) - self.top:]

    def label_rules(self, model: nnx.Module, stage: int) -> list[LabelRule]:
        trained = set(self.trained_groups(model))
        return [(group.pattern, FROZEN) for group in layer_groups(model) if group.name not in trained]
