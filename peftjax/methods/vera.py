"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024).

One pair of frozen random matrices is shared by every adapted layer, and each
layer trains only two scaling vectors:

    h = W x + Lambda_b B Lambda_d A x

with A (in -> r) and B (r -> out) random and frozen, Lambda_d = diag(d),
d in R^r, and Lambda_b = diag(b), b in R^out. As in the paper and HF PEFT,
A and B are Kaiming-uniform (bounds 1/sqrt(in) and 1/sqrt(r)), d starts at
``d_initial`` = 0.1 and b at 0, so the model is unchanged at initialisation.
A layer trains r + out parameters.

Sharing. HF PEFT draws one A and one B sized to the largest adapted
dimensions and slices them per layer. Here each matrix is drawn per distinct
shape instead, from ``jax.random.key(seed)`` folded with the matrix ("A" or
"B") and its shape, and one ``AdapterBuffer`` per shape is shared by every
layer of that shape (BERT: one A and one B for q/k/v/o, one pair each for the
two FFN shapes). A matrix depends only on the seed and its shape, not on
which other layers are adapted, so loading an adapter regenerates exactly the
matrices it was trained with. Buffers are not parameters: adapter files hold
only d and b.

Merge adds ``A diag(d) B diag(b)`` to the kernel; unmerge subtracts it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.core.kernels import SUPPORTED_LAYERS, KernelLayout
from peftjax.methods.base import AdapterWrapper, MethodConfig, register_method
from peftjax.variables import AdapterBuffer, AdapterParam

_MATRIX_IDS = {"A": 0, "B": 1}


class VeraScaleD(AdapterParam):
    """d: scales the rank axis (r entries)."""


class VeraScaleB(AdapterParam):
    """b: scales the output axes (one entry per output unit)."""


class VeraProjection(AdapterBuffer):
    """A frozen random matrix shared by all layers of its shape; rebuilt from the seed, never saved."""


@register_method("vera")
@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraConfig(MethodConfig):
    """VeRA on linear and einsum layers.

    Attributes:
      rank: r, the inner dimension of the shared random matrices (HF PEFT's
        default, 256; VeRA needs a much larger r than LoRA for the same
        quality, and r costs only r parameters per layer).
      d_initial: the initial value of every entry of d.
      dropout: dropout rate on the adapter's input, in [0, 1).
      seed: draws the shared random matrices (saved in the adapter config).
    """

    target_types = SUPPORTED_LAYERS

    rank: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.check(isinstance(self.rank, int) and self.rank > 0, "rank", "must be a positive integer")
        self.check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")

    def projection(self, matrix: str, shape: tuple[int, ...], fan_in: int, dtype) -> jax.Array:
        """The shared random matrix ``matrix`` ("A" or "B") of ``shape``:
        Kaiming-uniform on +-1/sqrt(fan_in), a function of the seed and the shape alone."""
        key = jax.random.fold_in(jax.random.key(self.seed), _MATRIX_IDS[matrix])
        for size in shape:
            key = jax.random.fold_in(key, size)
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    def wrap_all(
        self, modules: Sequence[nnx.Module], *, model: nnx.Module, adapter_name: str, rngs: nnx.Rngs
    ) -> list[AdapterWrapper]:
        """One A and one B buffer per distinct shape, shared by the wrappers."""
        del model
        shared: dict[tuple, VeraProjection] = {}

        def buffer(matrix: str, shape: tuple[int, ...], fan_in: int, dtype) -> VeraProjection:
            key = (matrix, shape, jnp.dtype(dtype).name)
            if key not in shared:
                shared[key] = VeraProjection(self.projection(matrix, shape, fan_in, dtype))
            return shared[key]

        wrappers = []
        for module in modules:
            layer = module.base_layer if isinstance(module, AdapterWrapper) else module
            layout = KernelLayout.of(layer)
            a = buffer("A", layout.down_shape(self.rank), layout.fan_in, layer.param_dtype)
            b = buffer("B", layout.up_shape(self.rank), self.rank, layer.param_dtype)
            wrappers.append(
                VeraLinear(module, self, projection_a=a, projection_b=b, adapter_name=adapter_name, rngs=rngs)
            )
        return wrappers


class VeraLinear(AdapterWrapper):
    """An ``nnx.Linear`` or ``nnx.Einsum`` plus ``Lambda_b B Lambda_d A x``."""

    def __init__(
        self,
        base: nnx.Module,
        config: VeraConfig,
        *,
        projection_a: VeraProjection,
        projection_b: VeraProjection,
        adapter_name: str,
        rngs: nnx.Rngs,
    ):
        super().__init__(base, adapter_name=adapter_name)
        self.layout = KernelLayout.of(self.base_layer)
        param_dtype = self.base_layer.param_dtype
        self.projection_a = projection_a
        self.projection_b = projection_b
        self.scale_d = VeraScaleD(jnp.full((config.rank,), config.d_initial, param_dtype))
        self.scale_b = VeraScaleB(jnp.zeros(self.layout.out_shape, param_dtype))
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if not self.adds_output:
            return y
        dtype = self.base_layer.dtype or x.dtype
        h = x if self.dropout is None else self.dropout(x)
        h = self.layout.project_down(h.astype(dtype), self.projection_a[...].astype(dtype)) * self.scale_d[...].astype(
            dtype
        )
        h = self.layout.project_up(h, self.projection_b[...].astype(dtype))
        h = self.layout.scale(h, self.layout.output_spec, self.scale_b[...].astype(dtype), axes=self.layout.out_axes)
        return y + h.astype(y.dtype)

    def delta_kernel(self) -> jax.Array:
        """``A diag(d) B diag(b)`` in the base kernel's layout, in float32."""
        a = self.projection_a[...].astype(jnp.float32) * self.scale_d[...].astype(jnp.float32)
        # B is (r, *output axes), so b broadcasts along its trailing axes.
        b = self.projection_b[...].astype(jnp.float32) * self.scale_b[...].astype(jnp.float32)
        return self.layout.kernel_from_factors(a, b)

    def _merge(self) -> None:
        kernel = self.base_layer.kernel
        kernel[...] = (kernel[...].astype(jnp.float32) + self.delta_kernel()).astype(kernel.dtype)

    def _unmerge(self) -> None:
        kernel = self.base_layer.kernel
        kernel[...] = (kernel[...].astype(jnp.float32) - self.delta_kernel()).astype(kernel.dtype)
