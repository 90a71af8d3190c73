"""QLoRA: LoRA on a frozen 4-bit NormalFloat base (Dettmers et al. 2023).

Each targeted kernel W is stored as NF4 with blockwise absmax scales
(``peftjax.methods.nf4``), optionally double-quantised, and LoRA trains on
top in full precision:

    h = dequant(W_nf4) x + b + s * B A dropout(x)
    dequant(W_nf4) = NF4[codes] * c_j,    c_j = mu + D[q8_j] * s_k  (double quantisation)

The float kernel is dropped from the model when QLoRA is applied: the wrapper's
``base`` becomes an ``NF4Linear`` that holds the packed codes and scales as
``AdapterBuffer`` variables (not parameters: never trained, never saved, rebuilt
from the base weights when an adapter is loaded) and dequantises the kernel
inside each call. Storage is 4 + 32/64 = 4.5 bits per weight, or 4.127 with
double quantisation. ``NF4Linear`` declares the kernel as a logical parameter,
so ``count_params`` reports the model's size as if it were in float.

Layout. The kernel is quantised in torch's order, output axes first, (out, in)
for an ``nnx.Linear`` whose kernel is (in, out): the blocks of 64 run along
each output unit's input weights, and codes, scales and double-quantised
scales are the arrays bitsandbytes stores for the same weight (a test checks
them against a float64 transcription of its algorithm), so its checkpoints can
be loaded without requantising. It costs nothing: XLA compiles MiniLM's QLoRA
training step to the same FLOPs, bytes, memory plan and op counts with the
(out, in) or the (in, out) order (``benchmarks/nf4_layout.py``, section (l) of
``benchmarks/results/README.md``).

Decisions:

* Identity at initialisation holds with respect to the quantised base (B = 0),
  i.e. the model with its adapters disabled, not the float model it came from:
  the difference to that is the quantisation error, bounded per weight by
  ``nf4.max_error_factor()`` times its block's absmax c_j, plus
  ``nf4.absmax_error_factor()`` times its 8-bit block's s_k under double
  quantisation (see ``peftjax.methods.nf4``).
* Not mergeable: folding s B A into a 4-bit kernel would re-quantise it and
  lose most of the update, so ``peftjax.merge`` raises "cannot merge" (QLoRA's
  adapters are ordinary LoRA A and B; apply them to the float model to merge).
* QLoRA replaces the base layer, so it must be the first adapter on a module,
  and no other kernel method can be stacked on a quantised layer.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.core.kernels import SUPPORTED_LAYERS, KernelLayout
from peftjax.errors import PeftError
from peftjax.methods import nf4
from peftjax.methods.base import AdapterWrapper, register_method
from peftjax.methods.lora import LoraConfig, LoraLinear
from peftjax.variables import AdapterBuffer


class NF4Storage(AdapterBuffer):
    """Packed 4-bit codes of a kernel, or the (quantised) scales of their blocks."""


@register_method("qlora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class QLoraConfig(LoraConfig):
    """LoRA on NF4-quantised base kernels; LoRA's fields plus:

    Attributes:
      double_quant: quantise the block scales to 8 bits as well (double
        quantisation: 4.127 instead of 4.5 bits per weight).
      block_size: weights per NF4 block (64, as bitsandbytes); even.
      absmax_block_size: block scales per 8-bit block under double
        quantisation (256, as bitsandbytes).
    """

    target_types = SUPPORTED_LAYERS

    double_quant: bool = True
    block_size: int = 64
    absmax_block_size: int = 256

    def __post_init__(self):
        super().__post_init__()
        self.check(
            isinstance(self.block_size, int) and self.block_size > 0 and self.block_size % 2 == 0,
            "block_size",
            "must be a positive even integer (two 4-bit codes share a byte)",
        )
        self.check(
            isinstance(self.absmax_block_size, int) and self.absmax_block_size > 0,
            "absmax_block_size",
            "must be a positive integer",
        )

    def wrap(self, module, *, adapter_name, rngs):
        return QLoraLinear(module, self, adapter_name=adapter_name, rngs=rngs)


class NF4Linear(nnx.Module):
    """A frozen ``nnx.Linear`` or ``nnx.Einsum`` whose kernel is stored in NF4.

    Computes what the layer computed, with the kernel dequantised on the fly
    (in float32, then cast to the layer's computation dtype). The kernel is
    stored in torch's order, its output axes before its input axes
    (``stored_spec``). The bias, if any, is the layer's own ``nnx.Param``,
    unchanged and frozen by default.
    """

    def __init__(self, layer: nnx.Module, *, block_size: int, double_quant: bool, absmax_block_size: int):
        self.layout = KernelLayout.of(layer)
        self.kernel_shape = tuple(layer.kernel.shape)
        self.stored_spec = self.storage_order(self.layout)
        self.block_size = block_size
        self.absmax_block_size = absmax_block_size
        self.double_quant = double_quant
        self.dtype = layer.dtype
        self.param_dtype = layer.param_dtype
        self.bias = getattr(layer, "bias", None)
        stored = jnp.einsum(f"{self.layout.kernel_spec}->{self.stored_spec}", layer.kernel[...])
        codes, absmax = nf4.quantize_nf4(stored, block_size=block_size)
        self.codes = NF4Storage(codes)
        if double_quant:
            absmax_codes, absmax_scales, absmax_mean = nf4.quantize_absmax(absmax, block_size=absmax_block_size)
            self.absmax_codes = NF4Storage(absmax_codes)
            self.absmax_scales = NF4Storage(absmax_scales)
            self.absmax_mean = NF4Storage(absmax_mean)
        else:
            self.absmax = NF4Storage(absmax)

    @staticmethod
    def storage_order(layout: KernelLayout) -> str:
        """The stored kernel's axes: torch's order, output axes first, as bitsandbytes blocks it."""
        return layout.out_axes + layout.in_axes

    @property
    def logical_params(self) -> dict[str, int]:
        """The float kernel this layer stands for (see peftjax.core.counting)."""
        return {"kernel": math.prod(self.kernel_shape)}

    def storage(self) -> list[NF4Storage]:
        """Every array that stores the kernel (codes and scales)."""
        names = ("absmax_codes", "absmax_scales", "absmax_mean") if self.double_quant else ("absmax",)
        return [self.codes, *(getattr(self, name) for name in names)]

    def block_scales(self) -> jax.Array:
        """The absmax of each NF4 block, in float32 (dequantised if stored in 8 bits)."""
        if not self.double_quant:
            return self.absmax[...]
        return nf4.dequantize_absmax(
            self.absmax_codes[...], self.absmax_scales[...], self.absmax_mean[...], block_size=self.absmax_block_size
        )

    def dequantized_stored(self) -> jax.Array:
        """The kernel in its stored order, ``stored_spec``, in float32."""
        sizes = dict(zip(self.layout.kernel_spec, self.kernel_shape, strict=True))
        size = math.prod(self.kernel_shape)
        flat = nf4.dequantize_nf4(self.codes[...], self.block_scales(), size=size, block_size=self.block_size)
        return flat.reshape([sizes[axis] for axis in self.stored_spec])

    def dequantized_kernel(self) -> jax.Array:
        """The kernel as the float layer held it (its own axis order), in float32."""
        return jnp.einsum(f"{self.stored_spec}->{self.layout.kernel_spec}", self.dequantized_stored())

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or jnp.result_type(x.dtype, self.param_dtype)
        layout = self.layout
        y = jnp.einsum(
            f"{layout.input_spec},{self.stored_spec}->{layout.output_spec}",
            x.astype(dtype),
            self.dequantized_stored().astype(dtype),
        )
        if self.bias is not None:
            y = y + jnp.reshape(self.bias[...].astype(dtype), layout.bias_shape(y.ndim))
        return y


class QLoraLinear(LoraLinear):
    """LoRA over an ``NF4Linear``: the float layer is quantised when wrapped."""

    # No merged form in 4 bits (see the module docstring): peftjax.merge refuses.
    _merge = AdapterWrapper._merge
    _unmerge = AdapterWrapper._unmerge

    def __init__(self, base: nnx.Module, config: QLoraConfig, *, adapter_name: str, rngs: nnx.Rngs):
        if isinstance(base, AdapterWrapper):
            raise PeftError(
                f"QLoRA quantises the base layer itself, so it must be the first adapter on a module; this one is "
                f"already wrapped by {type(base).__name__} (adapter {base.adapter_name!r})"
            )
        super().__init__(base, config, adapter_name=adapter_name, rngs=rngs)
        self.base = NF4Linear(
            base,
            block_size=config.block_size,
            double_quant=config.double_quant,
            absmax_block_size=config.absmax_block_size,
        )
