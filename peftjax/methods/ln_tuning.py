"""LN tuning: train only the normalisation layers (Zhao et al. 2024, "Tuning
LayerNorm in Attention"; on Llama it trains what HF PEFT's ``LNTuningConfig``
trains, which a test compares).

    LayerNorm(x) = gamma * (x - mu) / sigma + beta,   RMSNorm(x) = gamma * x / rms(x)

gamma (``scale``) and beta (``bias``) of every ``nnx.LayerNorm`` and
``nnx.RMSNorm`` train; everything else is frozen. Norms are found by module
type, not by name, so BERT's ``LayerNorm`` and Llama's ``input_layernorm``
are both found. Nothing is wrapped.
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

    norm_types: ClassVar[tuple[type, ...]] = (nnx.LayerNorm, nnx.RMSNorm)

    def trains(self, *, model: nnx.Module, module_path: str, module: nnx.Module | None, name: str) -> bool:
        return isinstance(module, self.norm_types)

    def describe_selection(self) -> str:
        return f"the parameters of {' and '.join(t.__name__ for t in self.norm_types)} layers"
