"""BitFit: train only the bias terms (Ben Zaken et al. 2022).

    h = W x + b,   W frozen, b trained

Every parameter named ``bias`` trains (linear, einsum and normalisation
layers alike); narrow it with ``targets`` / ``exclude``, and add a new
classification head with ``also_train``. Nothing is wrapped, so the model
computes exactly what it did and "merging" is a no-op.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from peftjax.methods.base import register_method
from peftjax.methods.selection import ParamSelectionConfig


@register_method("bitfit")
@dataclasses.dataclass(frozen=True, kw_only=True)
class BitFitConfig(ParamSelectionConfig):
    """Train every bias (every parameter named ``bias``)."""

    def trains(self, *, model: nnx.Module, module_path: str, module: nnx.Module | None, name: str) -> bool:
        return name == "bias"

    def describe_selection(self) -> str:
        return "parameters named 'bias'"
