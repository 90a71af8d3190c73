"""Bottleneck adapters: Houlsby et al. 2019, Pfeiffer et al. 2021, He et al. 2022.

A bottleneck adapter is a two-layer MLP through a narrow hidden layer of size
b (d = the model's hidden size, b = d // reduction_factor unless given):

    adapter(h) = f(h W_down + b_down) W_up + b_up,   W_down: d x b,  W_up: b x d

It sits on a ``BranchOutput`` insertion point, which sees a residual branch's
output ``o`` before the model adds it to the residual stream ``x`` (and, in
post-LN models such as BERT, normalises the sum with the layer's LayerNorm
``LN``). Each variant computes what adapter-transformers' ``DoubleSeqBnConfig``
(Houlsby), ``SeqBnConfig`` (Pfeiffer) and ``ParBnConfig`` (parallel) compute,
read off its ``Adapter.pre_forward`` / ``forward`` / ``post_forward``
(``src/adapters/methods/modeling.py``; the package is not installed here, so
the tests check the models against those functions transcribed). The point
returns the new o:

    Houlsby (after attention and after the FFN):  o <- o + s * adapter(o)
    Pfeiffer (after the FFN):                     o <- o + s * adapter(LN(o + x))   (pre-LN models: o + x)
    parallel (beside the FFN, He et al.):          o <- o + s * adapter(x)

Pfeiffer's adapter reads the normalised sum and keeps o as its residual, so a
post-LN layer outputs LN(o + x + s * adapter(LN(o + x))) with the layer's own
LN twice (``original_ln_before=True``). In pre-LN models adapter-transformers
passes no LayerNorm, and x is the un-normalised residual stream, also for
the parallel adapter. s = 1, or 4 for the parallel adapter (He et al.'s best
"scaled parallel adapter" and ``ParBnConfig``'s default); f defaults to
"swish" for Houlsby and "relu" otherwise, as in adapter-transformers.

Initialisation (``init_weights``, adapter-transformers' names and defaults):
``"bert"`` for Houlsby and Pfeiffer draws W_down and W_up from N(0, 0.02) with
zero biases, so the model changes slightly from the start; ``"mam_adapter"``
for the parallel adapter draws W_down uniform on +-1/sqrt(d) (torch's
``kaiming_uniform_(a=sqrt(5))``) and zeroes W_up and both biases, so the
adapted model computes exactly what the base model did until W_up moves.
Either can be chosen for any variant. Per adapter the method trains
2 d b + b + d parameters. Adapters are nonlinear in the hidden state, so they
have no merged form.
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
VARIANT_INIT = {"houlsby": "bert", "pfeiffer": "bert", "parallel": "mam_adapter"}
# adapter-transformers' init_bert_weights: N(0, 0.02) whatever the model's initializer_range.
BERT_INIT_STD = 0.02


class BottleneckDown(AdapterParam):
    """Down-projection W_down (d, b) and its bias (b,)."""


class BottleneckUp(AdapterParam):
    """Up-projection W_up (b, d) and its bias (d,)."""


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
      init_weights: ``"bert"`` or ``"mam_adapter"`` (see module doc); None
        picks the variant's default (``"mam_adapter"`` for parallel only).
      targets: defaults to the variant's points, so ``BottleneckConfig(variant=
        "houlsby")`` needs no targets.
    """

    target_types = (BranchOutput,)

    variant: Literal["houlsby", "pfeiffer", "parallel"] = "houlsby"
    reduction_factor: float = 16
    bottleneck_size: int | None = None
    non_linearity: str | None = None
    scaling: float | None = None
    init_weights: Literal["bert", "mam_adapter"] | None = None

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
        self.check(
            self.init_weights in (None, "bert", "mam_adapter"), "init_weights", "must be 'bert', 'mam_adapter' or None"
        )

    @property
    def activation(self) -> str:
        """The activation in force: ``non_linearity`` or the variant's default."""
        return self.non_linearity or VARIANT_NON_LINEARITY[self.variant]

    @property
    def initialisation(self) -> str:
        """The initialisation in force: ``init_weights`` or the variant's default."""
        return self.init_weights or VARIANT_INIT[self.variant]

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
        self.variant = config.variant
        self.activation = config.activation
        self.scale = config.scale
        shapes = {"down": (hidden_size, bottleneck_size), "up": (bottleneck_size, hidden_size)}
        if config.initialisation == "bert":
            down, up = (BERT_INIT_STD * jax.random.normal(rngs.params(), shapes[k], jnp.float32) for k in shapes)
        else:
            bound = 1.0 / math.sqrt(hidden_size)
            down = jax.random.uniform(rngs.params(), shapes["down"], jnp.float32, -bound, bound)
            up = jnp.zeros(shapes["up"], jnp.float32)
        self.down_kernel = BottleneckDown(down)
        self.down_bias = BottleneckDown(jnp.zeros((bottleneck_size,), jnp.float32))
        self.up_kernel = BottleneckUp(up)
        self.up_bias = BottleneckUp(jnp.zeros((hidden_size,), jnp.float32))

    def adapter(self, h_btd: jax.Array) -> jax.Array:
        """f(h W_down + b_down) W_up + b_up, computed in ``h``'s dtype."""
        dtype = h_btd.dtype
        z_btb = h_btd @ self.down_kernel[...].astype(dtype) + self.down_bias[...].astype(dtype)
        z_btb = ACTIVATIONS[self.activation](z_btb)
        return z_btb @ self.up_kernel[...].astype(dtype) + self.up_bias[...].astype(dtype)

    def __call__(self, out_btd: jax.Array, residual_btd: jax.Array, norm: nnx.Module | None) -> jax.Array:
        out_btd = self.base(out_btd, residual_btd, norm)
        if not self.adds_output:
            return out_btd
        if self.variant == "parallel":
            source_btd = residual_btd
        elif self.variant == "pfeiffer":
            source_btd = out_btd + residual_btd if norm is None else norm(out_btd + residual_btd)
        else:
            source_btd = out_btd
        return out_btd + (self.scale * self.adapter(source_btd)).astype(out_btd.dtype)
