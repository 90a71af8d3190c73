"""DoRA: weight-decomposed low-rank adaptation (Liu et al. 2024).

A kernel is split into a magnitude per output unit and a direction, and LoRA
adapts the direction while the magnitude trains on its own:

    W' = m * (W + s B A) / ||W + s B A||_c

where ``||.||_c`` is the norm of each output unit's column (over the input
axes) and m starts at ``||W||_c``, so W' = W at initialisation (B = 0). The
norm is a constant in backprop (``jax.lax.stop_gradient``; the paper's
Section 4.3), which saves memory and barely changes accuracy; the gradients
equal HF PEFT's, which a test on MiniLM compares.

The layer computes, with g = m / ||W + s B A||_c and the base layer's bias b,

    h = W x + b + (g - 1) * W x' + g * s * B A x'

where x' is the dropped-out input (x itself without dropout): the base output
is reused, so the base kernel is read only once more (for the norm). Without
dropout this is h = g * (W + s B A) x + b exactly.

Merge writes g * (W + s B A) into the kernel and keeps the norm it used in an
``AdapterBuffer``; unmerge inverts it, W = W' / g - s B A, to float32
rounding. Everything else (A, B, their initialisation, scaling, LoRA+) is
LoRA's: the config subclasses ``LoraConfig`` and the wrapper ``LoraLinear``.
In HF PEFT's format DoRA is LoRA with ``use_dora``, and m is
``lora_magnitude_vector``. Unlike LoRA, it adapts linear and einsum layers only.

DoRA must be the first adapter on a module: its norm is of the base kernel,
and merging an adapter below it would change that kernel, so merged and
unmerged models would differ. Adapters stacked on top of DoRA are fine.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.core.kernels import SUPPORTED_LAYERS
from peftjax.errors import PeftError
from peftjax.methods.base import AdapterWrapper, HfTensor, register_method
from peftjax.methods.lora import LoraConfig, LoraLinear
from peftjax.variables import AdapterBuffer, AdapterParam


class DoraMagnitude(AdapterParam):
    """DoRA's magnitude m, one entry per output unit (shaped like the output axes)."""


class DoraMergedNorm(AdapterBuffer):
    """||W + s B A||_c at merge time: what unmerge needs to recover W."""


@register_method("dora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DoraConfig(LoraConfig):
    """DoRA on linear and einsum kernels; the fields are LoRA's (rank, alpha,
    dropout, rslora, init, loraplus_lr_ratio)."""

    target_types = SUPPORTED_LAYERS

    def wrap(self, module, *, adapter_name, rngs):
        return DoraLinear(module, self, adapter_name=adapter_name, rngs=rngs)

    def to_hf(self, names):
        return {**super().to_hf(names), "use_dora": True}


class DoraLinear(LoraLinear):
    """An ``nnx.Linear`` or ``nnx.Einsum`` with a DoRA-adapted kernel."""

    def __init__(self, base: nnx.Module, config: DoraConfig, *, adapter_name: str, rngs: nnx.Rngs):
        if isinstance(base, AdapterWrapper):
            raise PeftError(
                "DoRA normalises the base kernel, so it must be the first adapter on a module (merging an adapter "
                f"below it would change that kernel); this one is already wrapped by {type(base).__name__} "
                f"(adapter {base.adapter_name!r})"
            )
        super().__init__(base, config, adapter_name=adapter_name, rngs=rngs)
        self.magnitude = DoraMagnitude(self.adapted_norms())  # float32, like A and B
        self.merged_norm = DoraMergedNorm(jnp.ones(self.layout.out_shape, jnp.float32))

    def hf_tensors(self) -> dict[str, HfTensor]:
        return {**super().hf_tensors(), "lora_magnitude_vector": HfTensor("magnitude", (0,), self.magnitude.shape)}

    def adapted_norms(self) -> jax.Array:
        """||W + s B A||_c in float32, as a constant for differentiation."""
        kernel = self.base_layer.kernel[...].astype(jnp.float32) + self.delta_kernel()
        return jax.lax.stop_gradient(self.layout.output_norms(kernel))

    def _base_product(self, x: jax.Array, y: jax.Array, dtype) -> jax.Array:
        """W x without the bias, for the dropped-out input ``x``: read off the
        base output ``y`` without dropout (then ``x`` is what the base saw),
        else one more matmul."""
        layer = self.base_layer
        if self.dropout is None:
            bias = getattr(layer, "bias", None)
            if bias is None:
                return y
            return y - jnp.reshape(bias[...].astype(y.dtype), self.layout.bias_shape(y.ndim))
        equation = f"{self.layout.input_spec},{self.layout.kernel_spec}->{self.layout.output_spec}"
        return jnp.einsum(equation, x.astype(dtype), layer.kernel[...].astype(dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if not self.adds_output:
            return y
        dtype = self.base_layer.dtype or x.dtype
        gain = (self.magnitude[...].astype(jnp.float32) / self.adapted_norms()).astype(dtype)
        h = x if self.dropout is None else self.dropout(x)
        base_product = self._base_product(h, y, dtype)
        low_rank = self.layout.project_down(h.astype(dtype), self.lora_a[...].astype(dtype))
        low_rank = self.scale * self.layout.project_up(low_rank, self.lora_b[...].astype(dtype))
        spec, axes = self.layout.output_spec, self.layout.out_axes
        update = self.layout.scale(base_product, spec, gain - 1, axes=axes) + self.layout.scale(
            low_rank, spec, gain, axes=axes
        )
        return y + update.astype(y.dtype)

    def _merge(self) -> None:
        magnitude = self.magnitude[...].astype(jnp.float32)
        if not bool(jnp.all(magnitude != 0)):
            raise PeftError(f"{type(self).__name__}: a zero magnitude cannot be unmerged; not merging")
        kernel = self.base_layer.kernel
        norms = self.adapted_norms()
        adapted = kernel[...].astype(jnp.float32) + self.delta_kernel()
        self.merged_norm[...] = norms
        gain = magnitude / norms
        kernel[...] = self.layout.scale(adapted, self.layout.kernel_spec, gain, axes=self.layout.out_axes).astype(
            kernel.dtype
        )

    def _unmerge(self) -> None:
        kernel = self.base_layer.kernel
        gain = self.magnitude[...].astype(jnp.float32) / self.merged_norm[...]
        adapted = self.layout.scale(
            kernel[...].astype(jnp.float32), self.layout.kernel_spec, 1 / gain, axes=self.layout.out_axes
        )
        kernel[...] = (adapted - self.delta_kernel()).astype(kernel.dtype)
