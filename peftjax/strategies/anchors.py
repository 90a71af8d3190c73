"""What L2-SP and EWC share: anchor weights held fixed for a run, and the
weighted squared distance of the model's parameters from them.

``Anchors`` is the module those strategies' ``setup`` returns: per parameter
path, the anchor w* and optionally a weight F, both ``FixedBuffer`` arrays
(kept with the frozen parameters, never checkpointed, rebuilt at set-up; an
anchor that is the model's own starting array stays that one buffer).
``distance(model)`` is sum_i F_i (w_i - w*_i)^2 over them, in float32.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.core.paths import dotted
from peftjax.variables import FixedBuffer


def _key(path: str) -> str:
    # One key per parameter: dots would read as nesting in the anchors' own paths.
    return path.replace(".", "/")


def params_by_path(model: nnx.Module) -> dict[str, nnx.Param]:
    """Every ``nnx.Param`` of ``model`` by dotted path."""
    return {dotted(path): variable for path, variable in nnx.iter_graph(model) if isinstance(variable, nnx.Param)}


class Anchors(nnx.Module):
    """Anchor arrays (and weights) by parameter path; ``paths`` is static."""

    def __init__(self, anchors: Mapping[str, jax.Array], weights: Mapping[str, jax.Array] | None = None):
        self.paths = tuple(anchors)
        self.anchor = nnx.Dict({_key(path): FixedBuffer(array) for path, array in anchors.items()})
        self.weight = nnx.Dict({_key(path): FixedBuffer(weights[path]) for path in self.paths}) if weights else None

    def distance(self, model: nnx.Module) -> jax.Array:
        """sum_i F_i (w_i - w*_i)^2 over the anchored parameters of ``model`` (F = 1 without weights)."""
        params = params_by_path(model)
        total = jnp.zeros((), jnp.float32)
        for path in self.paths:
            key = _key(path)
            gap = params[path][...].astype(jnp.float32) - self.anchor[key][...].astype(jnp.float32)
            squared = jnp.square(gap) if self.weight is None else self.weight[key][...] * jnp.square(gap)
            total = total + jnp.sum(squared)
        return total
