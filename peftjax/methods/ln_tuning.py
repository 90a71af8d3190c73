"""LN tuning: train only the normalisation layers (Zhao et al. 2024, "Tuning
LayerNorm in Attention"; on Llama it trains what HF PEFT's ``LNTuningConfig``
trains, which a test compares).

    LayerNorm(x) = gamma * (x - mu) / sigma + beta,   RMSNorm(x) = gamma * x / rms(x)

gamma (``scale``) and beta (``bias``) of every ``nnx.LayerNorm``,
``nnx.RMSNorm`` and ``nnx.BatchNorm`` train; everything else is frozen. Norms
are found by module type, not by name, so BERT's ``LayerNorm``, Llama's
``input_layernorm`` and ResNet's ``normalization`` are all found. On a CNN
this is batch-norm tuning: a batch norm that trains also updates its running
statistics (``peftjax.core.batch_stats``). Nothing is wrapped.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from flax import nnx

from peftjax.methods.base import register_method
from peftjax.methods.selection import ParamSelectionConfig


@register_method("ln_tuning")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LNTuningConfig(ParamSelectionConfig):
    """Train the scale and bias of every normalisation layer."""

    norm_types: ClassVar[tuple[type, ...]] = (nnx.LayerNorm, nnx.RMSNorm, nnx.BatchNorm)

    def trains(self, *, model: nnx.Module, module_path: str, module: nnx.Module | None, name: str) -> bool:
        return isinstance(module, self.norm_types)

    def describe_selection(self) -> str:
        return f"the parameters of {', '.join(t.__name__ for t in self.norm_types)} layers"
