"""Embedding tables and convolutions seen as low-rank targets.

``KernelLayout`` (``peftjax.core.kernels``) is how LoRA sees a linear or
einsum kernel; these are its counterparts for ``nnx.Embed`` and ``nnx.Conv``,
with the same interface where LoRA uses it (``down_shape``, ``up_shape``,
``fan_in``, ``project_down``, ``project_up``, ``kernel_from_factors`` and
``weight_name``), so one LoRA wrapper serves all four kinds of layer.

* Embed: the table (vocab, features) is the kernel and the token's one-hot
  vector the input, so A is (vocab, r), ``A x`` is a row lookup, and
  ``delta = A B`` is (vocab, features).
* Conv: A is a convolution with the base layer's window, strides and padding
  and r output channels, B a 1x1 convolution (a matrix on channels) from r to
  the output channels, so ``delta = A B`` contracts the rank axis of the
  (*window, in, r) and (r, out) kernels. Only plain convolutions qualify:
  no dilation, feature groups, mask or padding modes other than zeros.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn.linear import canonicalize_padding

from peftjax.core.kernels import KernelLayout
from peftjax.errors import PeftError


@dataclasses.dataclass(frozen=True)
class EmbedLayout:
    """An ``nnx.Embed`` table as a (vocab, features) kernel."""

    num_embeddings: int
    features: int
    weight_name = "embedding"

    @property
    def fan_in(self) -> int:
        return self.num_embeddings

    def down_shape(self, rank: int) -> tuple[int, ...]:
        return (self.num_embeddings, rank)

    def up_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, self.features)

    def project_down(self, ids: jax.Array, a: jax.Array) -> jax.Array:
        return jnp.take(a, ids, axis=0)  # as nnx.Embed looks rows up

    def project_up(self, h: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.einsum("...z,zd->...d", h, b)

    def kernel_from_factors(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return a @ b


@dataclasses.dataclass(frozen=True)
class ConvLayout:
    """An ``nnx.Conv`` kernel (*window, in, out), channels last."""

    window: tuple[int, ...]
    in_features: int
    out_features: int
    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    weight_name = "kernel"

    @classmethod
    def of(cls, layer: nnx.Conv) -> ConvLayout:
        window = tuple(layer.kernel_size)
        plain = (
            layer.feature_group_count == 1
            and layer.mask is None
            and all(d in (None, 1) for d in _per_axis(layer.input_dilation, window))
            and all(d in (None, 1) for d in _per_axis(layer.kernel_dilation, window))
            and (not isinstance(layer.padding, str) or layer.padding.upper() in ("SAME", "VALID"))
        )
        if not plain:
            raise PeftError(
                "LoRA adapts plain convolutions only (no dilation, feature groups, mask, or circular/reflect/causal "
                f"padding); this nnx.Conv has kernel_size={window}, feature_group_count={layer.feature_group_count}, "
                f"padding={layer.padding!r}. Exclude it from targets."
            )
        padding = canonicalize_padding(layer.padding, len(window))
        padding = padding.upper() if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        strides = tuple(s or 1 for s in _per_axis(layer.strides, window))
        return cls(window, layer.in_features, layer.out_features, strides, padding)

    @property
    def fan_in(self) -> int:
        return math.prod(self.window) * self.in_features

    def down_shape(self, rank: int) -> tuple[int, ...]:
        return (*self.window, self.in_features, rank)

    def up_shape(self, rank: int) -> tuple[int, ...]:
        return (rank, self.out_features)

    def project_down(self, x: jax.Array, a: jax.Array) -> jax.Array:
        """The convolution of ``x`` (batch..., *spatial, in) with A, as the base layer convolves."""
        batch = x.shape[: x.ndim - len(self.window) - 1]
        flat = x.reshape(-1, *x.shape[len(batch):])
        ndim = flat.ndim
        spec = (0, ndim - 1, *range(1, ndim - 1))
        numbers = jax.lax.ConvDimensionNumbers(spec, (ndim - 1, ndim - 2, *range(ndim - 2)), spec)
        padding = self.padding if isinstance(self.padding, str) else list(self.padding)
        h = jax.lax.conv_general_dilated(flat, a, self.strides, padding, dimension_numbers=numbers)
        return h.reshape(*batch, *h.shape[1:])

    def project_up(self, h: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.einsum("...z,zo->...o", h, b)

    def kernel_from_factors(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.einsum("...iz,zo->...io", a, b)


def _per_axis(value, window: tuple[int, ...]) -> tuple:
    return (value,) * len(window) if value is None or isinstance(value, int) else tuple(value)


def low_rank_layout(layer: nnx.Module) -> KernelLayout | EmbedLayout | ConvLayout:
    """The layout LoRA uses for ``layer``: an Embed's, a Conv's, or a kernel's."""
    if isinstance(layer, nnx.Embed):
        return EmbedLayout(layer.num_embeddings, layer.features)
    if isinstance(layer, nnx.Conv):
        return ConvLayout.of(layer)
    return KernelLayout.of(layer)
