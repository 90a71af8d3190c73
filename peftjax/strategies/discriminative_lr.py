"""Discriminative learning rates (Howard & Ruder 2018, ULMFiT): lower layer
groups learn more slowly.

Lower layers hold more general features and should move less. With the
layer groups (``peftjax.layer_groups``) below the head numbered l = 0 (the
embeddings) to L (the top one: the final norm or pooler, else the last
block), group l trains at

    eta_l = eta / factor ** (L - l)

(ULMFiT's factor is 2.6), and the head at ``head`` times eta. Each group is
a label of its own (``Strategy.rate_groups``), with its factor as a
multiplier on the update: one optimizer, not one per group. The factor
multiplies the update whatever the optimizer (for SGD and Adam alike it is
the learning rate's factor) and composes with the methods' own multipliers
(LoRA+) and with ``schedule``: ``decay: slanted_triangular`` gives ULMFiT's
schedule on every group.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from peftjax.core.labels import RateGroup
from peftjax.core.layer_groups import layer_groups
from peftjax.schema import require
from peftjax.strategies.base import Strategy, register_strategy


@register_strategy("discriminative_lr")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DiscriminativeLrConfig(Strategy):
    """Group l of L below the head at eta / ``factor`` ** (L - l); the head at ``head`` x eta.

    Attributes:
      factor: the ratio of a group's rate to the rate of the group above it.
      head: the head's multiplier of the learning rate.
    """

    factor: float = 2.6
    head: float = 1.0

    def _validate(self) -> None:
        require(self.factor >= 1, "factor", f"must be at least 1 (lower groups learn more slowly), got {self.factor}")
        require(self.head > 0, "head", f"must be positive, got {self.head}")

    def multipliers(self, model: nnx.Module) -> dict[str, float]:
        """Each layer group's multiplier of the learning rate, by name."""
        groups = layer_groups(model)
        body = [group.name for group in groups if group.kind != "head"]
        top = len(body) - 1
        found = {name: 1.0 / self.factor ** (top - level) for level, name in enumerate(body)}
        return {**found, **{group.name: self.head for group in groups if group.kind == "head"}}

    def rate_groups(self, model: nnx.Module, stage: int) -> list[RateGroup]:
        factors = self.multipliers(model)
        return [(group.pattern, group.name, factors[group.name]) for group in layer_groups(model)]
