"""Bottleneck adapters: Houlsby et al. 2019, Pfeiffer et al. 2021, He et al. 2022.

A bottleneck adapter is a two-layer MLP through a narrow hidden layer of size
b (d = the model's hidden size, b = d // reduction_factor unless given):

    adapter(h) = f(h W_down + b_down) W_up + b_up,   W_down: d x b,  W_up: b x d

It sits on a ``BranchOutput`` insertion point, which sees a residual branch's
output ``o`` (before the residual add) and the branch's input ``x``:

    sequential (Houlsby, Pfeiffer):  o <- o + s * adapter(o)     (s = 1 by default)
    parallel (He et al. 2022):       o <- o + s * adapter(x)     (s = 4 by default)

Houlsby places two adapters per layer, after the attention branch and after
the feed-forward branch; Pfeiffer one, after the feed-forward branch; the
parallel adapter runs beside the feed-forward branch, reading its input. He
et al.'s best "scaled parallel adapter" uses s = 4, which is also the default
of adapter-transformers' ``ParBnConfig``; the defaults of f follow
adapter-transformers too (Houlsby "swish", Pfeiffer and parallel "relu").

Simplification: both sequential variants act on the branch output before the
model's own residual add and layer norm, as in Houlsby et al.; Pfeiffer's
original also moves the residual and layer norm around the adapter
(adapter-transformers' ``original_ln_before``), which an insertion point does
not reach.

W_up and both biases start at zero and W_down uniform on +-1/sqrt(d)
(adapter-transformers' "mam_adapter" initialisation), so the adapted model
computes exactly what the base model did until W_up moves. Per adapter the
method trains 2 d b + b + d parameters. Adapters are nonlinear in the hidden
state, so they have no merged form.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.errors import PeftError
from peftjax.methods.base import AdapterWrapper, MethodConfig, register_method
from peftjax.points import BranchOutput
from peftjax.variables import AdapterParam

# Activation names as transformers and adapter-transformers spell them.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

# Per variant: the insertion points it wraps, its activation and its scale.
VARIANT_TARGETS = {
    "houlsby": ("after_attention", "after_mlp"),
    "pfeiffer": ("after_mlp",),
    "parallel": ("after_mlp",),
}
VARIANT_NON_LINEARITY = {"houlsby": "swish", "pfeiffer": "relu", "parallel": "relu"}
VARIANT_SCALING = {"houlsby": 1.0, "pfeiffer": 1.0, "parallel": 4.0}


class BottleneckDown(AdapterParam):
    """Down-projection W_down (d, b) and its bias (b,)."""


class BottleneckUp(AdapterParam):
    """Up-projection W_up (b, d) and its bias (d,); zero at initialisation."""


def model_hidden_size(model: nnx.Module, method: str) -> int:
    """``model.config.hidden_size``, or a ``PeftError`` saying what is missing."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise PeftError(
            f"{method} sizes its parameters from model.config.hidden_size, which "
            f"{type(model).__name__} does not have (the models in peftjax.models do)"
        )
    return hidden


@register_method("bottleneck")
@dataclasses.dataclass(frozen=True, kw_only=True)
class BottleneckConfig(MethodConfig):
    """Bottleneck adapters on the layers' ``BranchOutput`` insertion points.

    Attributes:
      variant: ``"houlsby"`` (after attention and after the FFN),
        ``"pfeiffer"`` (after the FFN) or ``"parallel"`` (beside the FFN, scaled).
      reduction_factor: b = hidden_size // reduction_factor (adapter-transformers'
        convention; its parallel preset uses 2, the others 16).
      bottleneck_size: b itself; overrides ``reduction_factor`` when given.
      non_linearity: f; None picks the variant's default (see module doc).
      scaling: s; None picks the variant's default (1, or 4 for parallel).
      targets: defaults to the variant's points, so ``BottleneckConfig(variant=
        "houlsby")`` needs no targets.
    """

    target_types = (BranchOutput,)

    variant: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str | None = None
    scaling: float | None = None

    def __post_init__(self):
        self.check(self.variant in VARIANT_TARGETS, "variant", f"must be one of {sorted(VARIANT_TARGETS)}")
        if self.targets is None:
            self._set("targets", VARIANT_TARGETS[self.variant])
        super().__post_init__()
        self.check(
            isinstance(self.reduction_factor, (int, float)) and self.reduction_factor > 0,
            "reduction_factor",
            "must be a number > 0",
        )
        self.check(
            self.bottleneck_size is None or (isinstance(self.bottleneck_size, int) and self.bottleneck_size > 0),
            "bottleneck_size",
            "must be a positive integer or None",
        )
        self.check(
            self.non_linearity is None or self.non_linearity in ACTIVATIONS,
            "non_linearity",
            f"must be one of {sorted(ACTIVATIONS)} or None",
        )
        self.check(self.scaling is None or self.scaling > 0, "scaling", "must be > 0 or None")

    @property
    def activation(self) -> str:
        """The activation in force: ``non_linearity`` or the variant's default."""
        return self.non_linearity or VARIANT_NON_LINEARITY[self.variant]

    @property
    def scale(self) -> float:
        """s in force: ``scaling`` or the variant's default."""
        return VARIANT_SCALING[self.variant] if self.scaling is None else float(self.scaling)

    def bottleneck_for(self, hidden_size: int) -> int:
        """b for a model of width ``hidden_size``."""
        if self.bottleneck_size is not None:
            return self.bottleneck_size
        size = int(hidden_size // self.reduction_factor)
        if size < 1:
            raise PeftError(
                f"BottleneckConfig.reduction_factor={self.reduction_factor!r} leaves no bottleneck for "
                f"hidden_size={hidden_size}; use a smaller factor or set bottleneck_size"
            )
        return size

    def wrap(self, module, *, adapter_name, rngs):
        raise PeftError("BottleneckConfig sizes its adapters from the model: apply it with peftjax.apply")

    def wrap_all(
        self, modules: Sequence[nnx.Module], *, model: nnx.Module, adapter_name: str, rngs: nnx.Rngs
    ) -> list[AdapterWrapper]:
        hidden = model_hidden_size(model, "BottleneckConfig")
        bottleneck = self.bottleneck_for(hidden)
        return [
            BottleneckAdapter(
                module, self, hidden_size=hidden, bottleneck_size=bottleneck, adapter_name=adapter_name, rngs=rngs
            )
            for module in modules
        ]


class BottleneckAdapter(AdapterWrapper):
    """A ``BranchOutput`` point plus a (scaled) bottleneck MLP with a residual."""

    def __init__(
        self,
        base: nnx.Module,
        config: BottleneckConfig,
        *,
        hidden_size: int,
        bottleneck_size: int,
        adapter_name: str,
        rngs: nnx.Rngs,
    ):
        super().__init__(base, adapter_name=adapter_name)
        self.parallel = config.variant == "parallel"
        self.activation = config.activation
        self.scale = config.scale
        bound = 1.0 / math.sqrt(hidden_size)
        down = jax.random.uniform(rngs.params(), (hidden_size, bottleneck_size), jnp.float32, -bound, bound)
        self.down_kernel = BottleneckDown(down)
        self.down_bias = BottleneckDown(jnp.zeros((bottleneck_size,), jnp.float32))
        self.up_kernel = BottleneckUp(jnp.zeros((bottleneck_size, hidden_size), jnp.float32))
        self.up_bias = BottleneckUp(jnp.zeros((hidden_size,), jnp.float32))

    def adapter(self, h_btd: jax.Array) -> jax.Array:
        """f(h W_down + b_down) W_up + b_up, computed in ``h``'s dtype."""
        dtype = h_btd.dtype
        z_btb = h_btd @ self.down_kernel[...].astype(dtype) + self.down_bias[...].astype(dtype)
        z_btb = ACTIVATIONS[self.activation](z_btb)
        return z_btb @ self.up_kernel[...].astype(dtype) + self.up_bias[...].astype(dtype)

    def __call__(self, out_btd: jax.Array, in_btd: jax.Array) -> jax.Array:
        out_btd = self.base(out_btd, in_btd)
        if not self.adds_output:
            return out_btd
        source_btd = in_btd if self.parallel else out_btd
        return out_btd + (self.scale * self.adapter(source_btd)).astype(out_btd.dtype)
