"""VeRA: vector-based random matrix adaptation (Kopiczko et al. 2024).

One pair of frozen random matrices is shared by every adapted layer, and each
layer trains only two scaling vectors:

    h = W x + Lambda_b B Lambda_d A x

with A (in -> r) and B (r -> out) random and frozen, Lambda_d = diag(d),
d in R^r, and Lambda_b = diag(b), b in R^out. d starts at ``d_initial`` = 0.1
and b at 0, so the model is unchanged at initialisation. A layer trains
r + out parameters.

The shared matrices are HF PEFT's (a test compares their shapes and
distributions with the ones HF PEFT draws on MiniLM): one A sized to the
largest fan-in among the adapted layers, I_max x r, and one B sized to the
largest fan-out, r x O_max, both Kaiming-uniform with torch's gain sqrt(2)
on their own fan-in, so A is uniform on +-sqrt(6 / I_max) and B on
+-sqrt(6 / r). A layer with fan-in I and fan-out O uses the slices A[:I] and
B[:, :O]. The draws come from ``jax.random.key(seed)`` (HF PEFT seeds a torch
generator with ``projection_prng_key``, so the values themselves differ).
Loading an adapter applies the same config to the same model, which selects
the same layers and so regenerates exactly the matrices it was trained with.
The matrices are float32 ``AdapterBuffer`` variables, not parameters: adapter
files hold only d and b.

Merge adds ``A diag(d) B diag(b)`` to the kernel; unmerge subtracts it.

HF PEFT's format: ``peft_type`` VERA, ``vera_lambda_d`` and ``vera_lambda_b``
under each module, and the shared matrices as ``base_model.vera_A`` (r, I_max)
and ``base_model.vera_B`` (O_max, r) (``save_projection``, which peftjax
always writes and requires when reading: torch's generator cannot be replayed
here). An adapter read from such a file keeps the file's matrices, which the
seed cannot regenerate, so it is saved again in HF PEFT's format only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.core.kernels import SUPPORTED_LAYERS, KernelLayout
from peftjax.errors import PeftError
from peftjax.methods.base import AdapterWrapper, HfTensor, MethodConfig, Slot, register_method
from peftjax.variables import AdapterBuffer, AdapterParam

_MATRIX_IDS = {"A": 0, "B": 1}


class VeraScaleD(AdapterParam):
    """d: scales the rank axis (r entries)."""


class VeraScaleB(AdapterParam):
    """b: scales the output axes (one entry per output unit)."""


class VeraProjection(AdapterBuffer):
    """A frozen random matrix shared by every layer of the adapter; rebuilt from the seed, never saved."""


@register_method("vera")
@dataclasses.dataclass(frozen=True, kw_only=True)
class VeraConfig(MethodConfig):
    """VeRA on linear and einsum layers.

    Attributes:
      rank: r, the inner dimension of the shared random matrices (256, HF
        PEFT's default; VeRA needs a much larger r than LoRA for the same
        quality, and r costs only r parameters per layer).
      d_initial: the initial value of every entry of d.
      dropout: dropout rate on the adapter's input, in [0, 1).
      seed: draws the shared random matrices (saved in the adapter config).
    """

    target_types = SUPPORTED_LAYERS
    hf_peft_type = "VERA"

    rank: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        self.check(isinstance(self.rank, int) and self.rank > 0, "rank", "must be a positive integer")
        self.check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")

    def projection(self, matrix: str, shape: tuple[int, int], fan_in: int) -> jax.Array:
        """The shared matrix ``matrix`` ("A" or "B"), float32, uniform on
        +-sqrt(6 / fan_in): torch's ``kaiming_uniform_`` with gain sqrt(2)."""
        key = jax.random.fold_in(jax.random.key(self.seed), _MATRIX_IDS[matrix])
        bound = math.sqrt(6.0 / fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound)

    def to_hf(self, names):
        if self.exclude:
            raise PeftError("HF PEFT's VeRA has no exclude_modules: choose the modules with targets alone to save "
                            "it in HF PEFT's format")
        return dict(peft_type="VERA", r=self.rank, d_initial=self.d_initial, vera_dropout=self.dropout,
                    projection_prng_key=self.seed, save_projection=True)

    @classmethod
    def from_hf(cls, fields, names, **common):
        if not fields.pop("save_projection", True):
            raise PeftError(
                "save_projection=false: the file leaves out VeRA's shared matrices, which HF PEFT regenerates with "
                "torch's generator and peftjax cannot; re-save the adapter in PyTorch with save_projection=True"
            )
        fields.pop("init_weights", None)  # how d and b start; the file holds their trained values
        return cls(rank=fields.pop("r", 256), d_initial=fields.pop("d_initial", 0.1),
                   dropout=fields.pop("vera_dropout", 0.0), seed=fields.pop("projection_prng_key", 0), **common)

    def hf_model_tensors(self, model, adapter_name):
        wrapper = _wrappers(model, adapter_name)[0]  # every wrapper holds the same two
        a, b = wrapper.projection_a, wrapper.projection_b
        return {"base_model.vera_A": Slot.of(a, a.shape[::-1], np.transpose, np.transpose),
                "base_model.vera_B": Slot.of(b, b.shape[::-1], np.transpose, np.transpose)}

    def check_own_format(self, model, adapter_name):
        wrapper = _wrappers(model, adapter_name)[0]
        a, b = wrapper.projection_a, wrapper.projection_b
        if not (jnp.array_equal(a[...], self.projection("A", a.shape, a.shape[0]))
                and jnp.array_equal(b[...], self.projection("B", b.shape, b.shape[0]))):
            raise PeftError(
                f"VeRA adapter {adapter_name!r} holds shared matrices read from an HF PEFT file, which peftjax's "
                "format does not store (it regenerates them from the seed); save it with format='peft'"
            )

    def wrap_all(
        self, modules: Sequence[nnx.Module], *, model: nnx.Module, adapter_name: str, rngs: nnx.Rngs
    ) -> list[AdapterWrapper]:
        """One A and one B, sized to the largest fan-in and fan-out, shared by the wrappers."""
        del model
        layouts = [KernelLayout.of(m.base_layer if isinstance(m, AdapterWrapper) else m) for m in modules]
        largest_in, largest_out = max(lay.fan_in for lay in layouts), max(lay.fan_out for lay in layouts)
        a = VeraProjection(self.projection("A", (largest_in, self.rank), largest_in))
        b = VeraProjection(self.projection("B", (self.rank, largest_out), self.rank))
        return [
            VeraLinear(module, self, projection_a=a, projection_b=b, adapter_name=adapter_name, rngs=rngs)
            for module in modules
        ]


def _wrappers(model: nnx.Module, adapter_name: str) -> list[VeraLinear]:
    from peftjax.core.inject import iter_wrappers  # the engine imports the methods package, which imports this file

    return [w for _, w in iter_wrappers(model) if isinstance(w, VeraLinear) and w.adapter_name == adapter_name]


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
        self.projection_a = projection_a
        self.projection_b = projection_b
        self.scale_d = VeraScaleD(jnp.full((config.rank,), config.d_initial, jnp.float32))
        self.scale_b = VeraScaleB(jnp.zeros(self.layout.out_shape, jnp.float32))
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout else None

    def factors(self, dtype) -> tuple[jax.Array, jax.Array]:
        """This layer's slices of the shared A and B in its kernel's layout
        (shaped as ``layout.down_shape`` and ``layout.up_shape``), in ``dtype``."""
        rank = self.scale_d.shape[0]
        a = self.projection_a[...][: self.layout.fan_in].reshape(self.layout.down_shape(rank))
        b = self.projection_b[...][:, : self.layout.fan_out].reshape(self.layout.up_shape(rank))
        return a.astype(dtype), b.astype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if not self.adds_output:
            return y
        dtype = self.base_layer.dtype or x.dtype
        a, b = self.factors(dtype)
        h = x if self.dropout is None else self.dropout(x)
        h = self.layout.project_down(h.astype(dtype), a) * self.scale_d[...].astype(dtype)
        h = self.layout.project_up(h, b)
        h = self.layout.scale(h, self.layout.output_spec, self.scale_b[...].astype(dtype), axes=self.layout.out_axes)
        return y + h.astype(y.dtype)

    def delta_kernel(self) -> jax.Array:
        """``A diag(d) B diag(b)`` in the base kernel's layout, in float32."""
        a, b = self.factors(jnp.float32)
        # B is (r, *output axes), so b broadcasts along its trailing axes.
        return self.layout.kernel_from_factors(a * self.scale_d[...], b * self.scale_b[...])

    def hf_tensors(self) -> dict[str, HfTensor]:
        if isinstance(self.base_layer, nnx.Einsum):
            raise PeftError(f"{type(self).__name__} on an nnx.Einsum has no HF PEFT form (HF PEFT adapts nn.Linear)")
        return {"vera_lambda_d": HfTensor("scale_d", (0,), self.scale_d.shape),
                "vera_lambda_b": HfTensor("scale_b", (0,), self.scale_b.shape)}

    def _merge(self) -> None:
        kernel = self.base_layer.kernel
        kernel[...] = (kernel[...].astype(jnp.float32) + self.delta_kernel()).astype(kernel.dtype)

    def _unmerge(self) -> None:
        kernel = self.base_layer.kernel
        kernel[...] = (kernel[...].astype(jnp.float32) - self.delta_kernel()).astype(kernel.dtype)
