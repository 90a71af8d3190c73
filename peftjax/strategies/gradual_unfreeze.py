"""Gradual unfreezing (Howard & Ruder 2018, ULMFiT): from the head down, one
more layer group trains every ``every`` steps or epochs.

Unfreezing everything at once lets the large gradients a new head sends
down in its first steps overwrite what the lower layers learned in
pre-training; unfreezing from the top gives the head time to settle first.
Stage 0 trains the top ``start`` groups (the head, ``peftjax.layer_groups``),
and each stage after adds ``per_stage`` more, until every group trains.

A stage is a label set (``Strategy.stage_starts``): the step compiles once
per stage, a frozen group is bitwise unchanged and has no optimizer state,
and a group gets its optimizer state when it starts training. Every group
trains under a label of its own (``rate_groups``), so Adam's step count,
and with it the bias correction of its fresh moments, starts there too: in
one shared label a group unfrozen at step 300 would take steps several
times too large while its moments fill. The run's learning-rate schedule
counts the run's steps for every group (``peftjax.core.labels.scheduled``),
so ``schedule.decay: slanted_triangular`` is ULMFiT's recipe.

Like ``partial_freeze``, this only freezes: within the unfrozen groups the
methods decide what trains (``full`` for ULMFiT itself).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

from flax import nnx

from peftjax.core.labels import RateGroup
from peftjax.core.layer_groups import layer_groups
from peftjax.errors import PeftError
from peftjax.methods.base import FROZEN, LabelRule
from peftjax.schema import require
from peftjax.strategies.base import Strategy, register_strategy
from peftjax.train.session import RunInfo


@register_strategy("gradual_unfreeze")
@dataclasses.dataclass(frozen=True, kw_only=True)
class GradualUnfreezeConfig(Strategy):
    """Unfreeze ``per_stage`` more layer groups, from the top, every ``every`` ``unit``.

    Attributes:
      every: the length of a stage, in ``unit``.
      unit: ``epochs`` (ULMFiT's) or ``steps`` (optimizer steps).
      start: how many groups, from the top, train from the first step.
      per_stage: how many more groups each stage unfreezes.
    """

    every: int
    unit: Literal["steps", "epochs"] = "epochs"
    start: int = 1
    per_stage: int = 1

    def _validate(self) -> None:
        for key in ("every", "start", "per_stage"):
            require(getattr(self, key) >= 1, key, f"must be at least 1, got {getattr(self, key)}")

    def _group_count(self, model: nnx.Module) -> int:
        count = len(layer_groups(model))
        if self.start > count:
            raise PeftError(f"gradual_unfreeze.start={self.start}: {type(model).__name__} has {count} layer groups")
        return count

    def stage_starts(self, info: RunInfo) -> tuple[int, ...]:
        stages = math.ceil((self._group_count(info.model) - self.start) / self.per_stage)
        length = self.every * (info.steps_per_epoch if self.unit == "epochs" else 1)
        return tuple(start for start in (length * k for k in range(1, stages + 1)) if start < info.total_steps)

    def label_rules(self, model: nnx.Module, stage: int) -> list[LabelRule]:
        groups = layer_groups(model)
        trained = min(self.start + stage * self.per_stage, self._group_count(model))
        return [(group.pattern, FROZEN) for group in groups[: len(groups) - trained]]

    def rate_groups(self, model: nnx.Module, stage: int) -> list[RateGroup]:
        return [(group.pattern, group.name, 1.0) for group in layer_groups(model)]
