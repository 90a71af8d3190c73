"""A kernel seen as a matrix: the layout that low-rank methods need.

LoRA, DoRA, VeRA and QLoRA all treat a layer's kernel as a map from its
contracted input axes to its output axes. ``KernelLayout`` reads that split off
an ``nnx.Linear`` (``...i,io->...o``) or an ``nnx.Einsum`` (its own equation),
so one implementation of each method serves both kinds of layer.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.errors import PeftError

SUPPORTED_LAYERS = (nnx.Linear, nnx.Einsum)
_RANK_AXIS = "z"  # index letter for the low-rank axis in our own equations


@dataclasses.dataclass(frozen=True)
class KernelLayout:
    """How a layer contracts its input with its kernel.

    Attributes:
      input_spec, kernel_spec, output_spec: the layer's einsum subscripts.
      in_axes: kernel letters contracted with the input (``in_shape`` sizes).
      out_axes: kernel letters that appear in the output (``out_shape`` sizes).
    """

    input_spec: str
    kernel_spec: str
    output_spec: str
    in_axes: str
    out_axes: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight_name = "kernel"  # the layer attribute that holds the kernel

    @classmethod
    def of(cls, layer: nnx.Module, *, path: str = "") -> KernelLayout:
        if isinstance(layer, nnx.Linear):
            equation, shape = "...i,io->...o", (layer.in_features, layer.out_features)
        elif isinstance(layer, nnx.Einsum):
            equation, shape = layer.einsum_str.replace(" ", ""), tuple(layer.kernel_shape)
        else:
            raise PeftError(
                f"{path or type(layer).__name__}: a {type(layer).__name__} has no kernel that "
                f"low-rank methods can adapt; supported layers: {[t.__name__ for t in SUPPORTED_LAYERS]}"
            )
        inputs, output_spec = equation.split("->")
        input_spec, kernel_spec = inputs.split(",")
        if _RANK_AXIS in equation:
            raise PeftError(f"{path}: einsum {equation!r} uses {_RANK_AXIS!r}, which the adapter needs")
        in_axes = "".join(c for c in kernel_spec if c in input_spec and c not in output_spec)
        out_axes = "".join(c for c in kernel_spec if c in output_spec and c not in input_spec)
        if len(in_axes) + len(out_axes) != len(kernel_spec):
            raise PeftError(
                f"{path}: einsum {equation!r} has kernel axes that are neither contracted nor output "
                "(batched kernels); low-rank methods need every kernel axis to be one or the other"
            )
        size = dict(zip(kernel_spec, shape, strict=True))
        return cls(
            input_spec,
            kernel_spec,
            output_spec,
            in_axes,
            out_axes,
            tuple(size[c] for c in in_axes),
            tuple(size[c] for c in out_axes),
        )

    @property
    def fan_in(self) -> int:
        return math.prod(self.in_shape)

    @property
    def fan_out(self) -> int:
        return math.prod(self.out_shape)

    def down_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of the down-projection A: input axes to the rank axis."""
        return (*self.in_shape, rank)

    def up_shape(self, rank: int) -> tuple[int, ...]:
        """Shape of the up-projection B: the rank axis to the output axes."""
        return (rank, *self.out_shape)

    def project_down(self, x: jax.Array, a: jax.Array) -> jax.Array:
        """``x`` (the layer's input) contracted with A: the layer's batch axes plus rank."""
        kept = "".join(c for c in self.input_spec if c not in self.in_axes)
        return jnp.einsum(f"{self.input_spec},{self.in_axes}{_RANK_AXIS}->{kept}{_RANK_AXIS}", x, a)

    def project_up(self, h: jax.Array, b: jax.Array) -> jax.Array:
        """Rank-space ``h`` to the layer's output layout through B."""
        kept = "".join(c for c in self.input_spec if c not in self.in_axes)
        return jnp.einsum(f"{kept}{_RANK_AXIS},{_RANK_AXIS}{self.out_axes}->{self.output_spec}", h, b)

    def kernel_from_factors(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """``A @ B`` laid out like the layer's kernel (for merging)."""
        return jnp.einsum(f"{self.in_axes}{_RANK_AXIS},{_RANK_AXIS}{self.out_axes}->{self.kernel_spec}", a, b)

    def scale(self, values: jax.Array, spec: str, vector: jax.Array, *, axes: str) -> jax.Array:
        """``values`` (laid out as ``spec``: the layer's input, output or kernel
        spec) times ``vector`` along ``axes`` (``in_axes`` or ``out_axes``),
        broadcast over the rest: IA3's and VeRA's vectors, DoRA's magnitudes."""
        return jnp.einsum(f"{spec},{axes}->{spec}", values, vector)

    def output_norms(self, kernel: jax.Array) -> jax.Array:
        """The L2 norm of each output unit's weights (over the input axes),
        shaped like the output axes (DoRA's column norms)."""
        return jnp.sqrt(jnp.einsum(f"{self.kernel_spec},{self.kernel_spec}->{self.out_axes}", kernel, kernel))

    def bias_shape(self, ndim: int) -> tuple[int, ...]:
        """The shape that makes a bias (one value per output unit) broadcast
        against an ``ndim``-dimensional output, as ``nnx.Linear`` and
        ``nnx.Einsum`` add it."""
        spec = self.output_spec
        before, after = spec.split("...") if "..." in spec else ("", spec)
        size = dict(zip(self.out_axes, self.out_shape, strict=True))
        batch = ndim - len(before) - len(after)
        return (*(size.get(c, 1) for c in before), *(1,) * batch, *(size.get(c, 1) for c in after))
