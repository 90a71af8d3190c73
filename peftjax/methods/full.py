"""Full fine-tuning: every parameter trains.

    theta <- theta - eta * grad L(theta)   for all of theta

The baseline every PEFT method is measured against, as a method so that it
goes through the same ``apply``, optimizer, counting and saving path (an
adapter file then holds the whole model). ``exclude`` keeps modules frozen
(e.g. the embeddings). Nothing is wrapped.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from peftjax.methods.base import register_method
from peftjax.methods.selection import ParamSelectionConfig


@register_method("full")
@dataclasses.dataclass(frozen=True, kw_only=True)
class FullFineTuningConfig(ParamSelectionConfig):
    """Train every parameter (under ``targets``, outside ``exclude``)."""

    def trains(self, *, model: nnx.Module, module_path: str, module: nnx.Module | None, name: str) -> bool:
        return True

    def describe_selection(self) -> str:
        return "every parameter"
