"""IA3: infused adapter by inhibiting and amplifying inner activations (Liu et al. 2022).

Learned vectors rescale the keys, the values and the feed-forward activation
element-wise, and nothing else changes:

    softmax(Q (l_k * K)^T / sqrt(d_k)) (l_v * V),      (l_ff * gamma(W_1 x)) W_2

Each vector belongs to one linear layer, as in HF PEFT (``target_modules``
and ``feedforward_modules``; tests compare outputs and, on MiniLM, gradients):

* a target that is not feed-forward scales its output,
  ``h = l * (W x + b)``, with l of size out_features (l_k, l_v on the key and
  value projections);
* a feed-forward target scales its input, ``h = W (l * x) + b``, with l of
  size in_features: on the FFN's second projection (BERT's ``output.dense``,
  Llama's ``down_proj``) that is the paper's l_ff on the activation.

Vectors start at 1, so the model is unchanged at initialisation. Both forms
fold into the kernel: output scaling multiplies the kernel's output columns
and the bias by l, input scaling the kernel's input rows. Unmerge divides by
l again, exact up to float32 rounding; a vector with a zero entry therefore
refuses to merge.

Left out, ``targets`` and ``feedforward`` take HF PEFT's defaults for the
model's architecture: on BERT/RoBERTa the key and value projections and every
``output.dense`` (the attention output's too, as HF PEFT's table has it), with
``output.dense`` feed-forward; on Llama/Mistral k_proj, v_proj and down_proj
(Qwen2: q_proj, v_proj, down_proj), with down_proj feed-forward. In HF PEFT's
format l is ``ia3_l``, shaped (out, 1) or, feed-forward, (1, in).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.core.kernels import SUPPORTED_LAYERS, KernelLayout
from peftjax.core.paths import ALL_LINEAR, Targets, dotted, matches, validate_targets
from peftjax.errors import PeftError
from peftjax.methods.base import AdapterWrapper, HfTensor, MethodConfig, model_type_of, register_method
from peftjax.variables import AdapterParam


# HF PEFT's TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and ..._FEEDFORWARD_MODULES_MAPPING.
_DEFAULT_TARGETS = {
    **dict.fromkeys(("bert", "roberta"), (("key", "value", "output.dense"), ("output.dense",))),
    **dict.fromkeys(("llama", "mistral"), (("k_proj", "v_proj", "down_proj"), ("down_proj",))),
    "qwen2": (("q_proj", "v_proj", "down_proj"), ("down_proj",)),
}


class IA3Vector(AdapterParam):
    """IA3's learned rescaling vector l (over the layer's output or input axes)."""


@register_method("ia3")
@dataclasses.dataclass(frozen=True, kw_only=True)
class IA3Config(MethodConfig):
    """IA3 on linear and einsum layers.

    Attributes:
      feedforward: which of the targets are feed-forward layers, whose input
        (not output) is scaled; same rules as ``targets`` (names or a regex).
        For BERT key/value/FFN only: ``targets=r".*\\.(key|value|layer\\.\\d+\\.output\\.dense)"``,
        ``feedforward=r".*\\.layer\\.\\d+\\.output\\.dense"``. ``None`` (the
        default): HF PEFT's for the architecture (those among listed targets),
        or none if it has no entry.
    """

    target_types = SUPPORTED_LAYERS
    default_targets = {model_type: targets for model_type, (targets, _) in _DEFAULT_TARGETS.items()}
    hf_peft_type = "IA3"

    feedforward: Targets | None = None

    def __post_init__(self):
        super().__post_init__()
        self.check(self.feedforward != ALL_LINEAR, "feedforward", "must name modules or be a regex, not 'all-linear'")
        if self.feedforward is None:
            return
        if isinstance(self.feedforward, str) or self.feedforward:
            try:
                self._set("feedforward", validate_targets(self.feedforward, f"{type(self).__name__}.feedforward"))
            except ValueError as err:
                raise PeftError(str(err)) from None
        else:
            self._set("feedforward", ())
        if isinstance(self.targets, tuple) and isinstance(self.feedforward, tuple):
            # As HF PEFT: a feed-forward module must also be a target.
            missing = [name for name in self.feedforward if name not in self.targets]
            self.check(not missing, "feedforward", f"must be among targets; {missing} are not")

    def for_model(self, model: nnx.Module) -> IA3Config:
        config = super().for_model(model)
        if config.feedforward is not None:
            return config
        _, feedforward = _DEFAULT_TARGETS.get(model_type_of(model), ((), ()))
        if isinstance(config.targets, tuple):  # a default feed-forward name that is not a target selects nothing
            feedforward = tuple(name for name in feedforward if name in config.targets)
        return dataclasses.replace(config, feedforward=feedforward)

    def is_feedforward(self, path: str) -> bool:
        return matches(path, self.feedforward) if self.feedforward else False

    def to_hf(self, names):
        return {"peft_type": "IA3", "feedforward_modules": names.to_hf(self.feedforward)}

    @classmethod
    def from_hf(cls, fields, names, **common):
        fields.pop("init_ia3_weights", None)  # how l starts: irrelevant to a trained adapter
        # HF PEFT matches a listed feed-forward name by a plain suffix; a dotted suffix selects the same modules here.
        return cls(feedforward=names.from_hf(fields.pop("feedforward_modules", None)), **common)

    def wrap_all(
        self, modules: Sequence[nnx.Module], *, model: nnx.Module, adapter_name: str, rngs: nnx.Rngs
    ) -> list[AdapterWrapper]:
        """Input or output scaling depends on where each module sits, so IA3
        wraps with the whole model in view."""
        paths = {id(module): dotted(path) for path, module in nnx.iter_modules(model)}
        return [
            IA3Linear(module, scales_input=self.is_feedforward(paths[id(module)]), adapter_name=adapter_name)
            for module in modules
        ]


class IA3Linear(AdapterWrapper):
    """An ``nnx.Linear`` or ``nnx.Einsum`` whose output (or input) is rescaled by l."""

    def __init__(self, base: nnx.Module, *, scales_input: bool, adapter_name: str):
        super().__init__(base, adapter_name=adapter_name)
        self.layout = KernelLayout.of(self.base_layer)
        self.scales_input = scales_input
        shape = self.layout.in_shape if scales_input else self.layout.out_shape
        # float32 whatever the base's param_dtype: bf16 rounds 1.0 plus a step below 0.002 back to 1.0.
        self.ia3_l = IA3Vector(jnp.ones(shape, jnp.float32))

    @property
    def axes(self) -> str:
        """The kernel axes l runs along."""
        return self.layout.in_axes if self.scales_input else self.layout.out_axes

    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.adds_output:
            return self.base(x)
        if self.scales_input:
            return self.base(
                self.layout.scale(x, self.layout.input_spec, self.ia3_l[...].astype(x.dtype), axes=self.axes)
            )
        y = self.base(x)
        return self.layout.scale(y, self.layout.output_spec, self.ia3_l[...].astype(y.dtype), axes=self.axes)

    def hf_tensors(self) -> dict[str, HfTensor]:
        if isinstance(self.base_layer, nnx.Einsum):
            raise PeftError(f"{type(self).__name__} on an nnx.Einsum has no HF PEFT form (HF PEFT adapts nn.Linear)")
        (size,) = self.ia3_l.shape
        return {"ia3_l": HfTensor("ia3_l", (0,), (1, size) if self.scales_input else (size, 1))}

    def _rescale(self, vector: jax.Array, *, divide: bool) -> None:
        """Multiply (or divide) the kernel along ``axes`` by ``vector``, and the
        bias too when the output is scaled; in float32. Dividing, not
        multiplying by 1 / l, makes unmerge the closest inverse of merge."""
        layer = self.base_layer

        def rescaled(values: jax.Array, spec: str, axes: str) -> jax.Array:
            spread = self.layout.scale(jnp.ones(values.shape, jnp.float32), spec, vector, axes=axes)
            values = values.astype(jnp.float32)
            return values / spread if divide else values * spread

        kernel = layer.kernel
        kernel[...] = rescaled(kernel[...], self.layout.kernel_spec, self.axes).astype(kernel.dtype)
        bias = getattr(layer, "bias", None)
        if self.scales_input or bias is None:
            return
        # The bias holds one value per output unit, ordered as the output names them.
        order = "".join(c for c in self.layout.output_spec if c in self.layout.out_axes)
        size = dict(zip(self.layout.out_axes, self.layout.out_shape, strict=True))
        values = jnp.reshape(bias[...], [size[c] for c in order])
        bias[...] = jnp.reshape(rescaled(values, order, self.layout.out_axes), bias.shape).astype(bias.dtype)

    def _merge(self) -> None:
        vector = self.ia3_l[...].astype(jnp.float32)
        if not bool(jnp.all(vector != 0)):
            raise PeftError(
                f"{type(self).__name__}: l has a zero entry, so unmerge could not divide it out; not merging"
            )
        self._rescale(vector, divide=False)

    def _unmerge(self) -> None:
        self._rescale(self.ia3_l[...].astype(jnp.float32), divide=True)
