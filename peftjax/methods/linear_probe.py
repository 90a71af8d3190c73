"""Linear probing (feature extraction): train only the output head.

    y = W_head f(x) + b_head,   f frozen

The head is what the model names in ``output_head_names`` (``classifier``
for BERT and ViT, ``score`` for a Llama classifier, ``lm_head`` for a causal
LM): every parameter under a module of that name trains. A model that names
no head (a bare encoder) cannot be probed: build it with a head, e.g.
``from_config(..., num_labels=N)``. Nothing is wrapped.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from peftjax.methods.base import register_method
from peftjax.methods.selection import ParamSelectionConfig


def output_heads(model: nnx.Module) -> tuple[str, ...]:
    return tuple(getattr(type(model), "output_head_names", ()))


@register_method("linear_probe")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LinearProbeConfig(ParamSelectionConfig):
    """Train the parameters of the model's output head(s)."""

    def trains(self, *, model: nnx.Module, module_path: str, module: nnx.Module | None, name: str) -> bool:
        heads = output_heads(model)
        return any(part in heads for part in module_path.split("."))

    def describe_selection(self) -> str:
        return "the output head named by the model's output_head_names"
