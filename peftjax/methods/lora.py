"""LoRA (Hu et al. 2021), with rsLoRA scaling (Kalajdzievski 2023) and LoRA+
learning rates (Hayou et al. 2024).

    h = W x + s * B A dropout(x),   s = alpha / r   (rsLoRA: alpha / sqrt(r))

LoRA+ trains B with a learning rate ``loraplus_lr_ratio`` (lambda = eta_B / eta_A,
16 in the paper) times A's: B's parameters get their own label, ``"lora_b"``,
and ``make_optimizer`` scales their updates by the ratio.

A (in -> r) starts random, B (r -> out) starts at zero, so the wrapped model
computes exactly what the base model did until B moves. A and B are float32
whatever the base's ``param_dtype``, as HF PEFT's ``autocast_adapter_dtype``
keeps them (bf16 would round away any update below about 0.4% of a value),
and the update is computed in the layer's computation dtype. This file is the
template for a new method: a registered config, a wrapper whose parameters are
``AdapterParam`` types, and ``_merge`` / ``_unmerge`` if the method folds into
the base kernel.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.core.kernels import SUPPORTED_LAYERS, KernelLayout
from peftjax.methods.base import AdapterWrapper, LabelRule, MethodConfig, register_method
from peftjax.variables import AdapterParam

# The label of B's parameters under LoRA+ (see LoraConfig.loraplus_lr_ratio).
LORAPLUS_B_LABEL = "lora_b"


class LoraA(AdapterParam):
    """LoRA down-projection A, shaped (*input axes, r)."""


class LoraB(AdapterParam):
    """LoRA up-projection B, shaped (r, *output axes)."""


@register_method("lora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig(MethodConfig):
    """Low-rank adaptation of linear and einsum kernels.

    Attributes:
      rank: r, the inner dimension of B A.
      alpha: scaling numerator; s = alpha / r (alpha / sqrt(r) with ``rslora``).
      dropout: dropout rate on the adapter's input, in [0, 1).
      rslora: use rank-stabilised scaling.
      init: how A starts, as HF PEFT's ``init_lora_weights`` (a test compares
        the distributions): ``"kaiming"`` (its default, True): uniform on
        +-1/sqrt(fan_in), torch's ``kaiming_uniform_(a=sqrt(5))``;
        ``"gaussian"``: normal with std 1/r. B always starts at zero.
      loraplus_lr_ratio: LoRA+: B's learning rate over A's (the paper's lambda;
        16 is its usual choice). ``None`` trains A and B alike. Every LoraB in
        the model takes the ratio, so two stacked LoRA+ adapters must agree.
    """

    target_types = SUPPORTED_LAYERS

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    loraplus_lr_ratio: float | None = None

    def __post_init__(self):
        super().__post_init__()
        self.check(isinstance(self.rank, int) and self.rank > 0, "rank", "must be a positive integer")
        self.check(self.alpha > 0, "alpha", "must be > 0")
        self.check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self.check(self.init in ("kaiming", "gaussian"), "init", "must be 'kaiming' or 'gaussian'")
        self.check(
            self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 0, "loraplus_lr_ratio", "must be None or > 0"
        )

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def wrap(self, module, *, adapter_name, rngs):
        return LoraLinear(module, self, adapter_name=adapter_name, rngs=rngs)

    def label_rules(self, model: nnx.Module) -> list[LabelRule]:
        rules = super().label_rules(model)
        if self.loraplus_lr_ratio is not None:
            rules.append((LoraB, LORAPLUS_B_LABEL))
        return rules

    def lr_multipliers(self) -> dict[str, float]:
        return {} if self.loraplus_lr_ratio is None else {LORAPLUS_B_LABEL: self.loraplus_lr_ratio}


def init_down_projection(config: LoraConfig, shape: tuple[int, ...], fan_in: int, key: jax.Array) -> jax.Array:
    """A's initial value for ``config.init`` (shared with LoRA variants)."""
    if config.init == "gaussian":
        return jax.random.normal(key, shape, jnp.float32) / config.rank
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class LoraLinear(AdapterWrapper):
    """An ``nnx.Linear`` or ``nnx.Einsum`` plus a scaled low-rank update."""

    def __init__(self, base: nnx.Module, config: LoraConfig, *, adapter_name: str, rngs: nnx.Rngs):
        super().__init__(base, adapter_name=adapter_name)
        self.layout = KernelLayout.of(self.base_layer)
        self.scale = config.scale
        a = init_down_projection(config, self.layout.down_shape(config.rank), self.layout.fan_in, rngs.params())
        self.lora_a = LoraA(a)
        self.lora_b = LoraB(jnp.zeros(self.layout.up_shape(config.rank), jnp.float32))
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if not self.adds_output:
            return y
        dtype = self.base_layer.dtype or x.dtype
        h = x if self.dropout is None else self.dropout(x)
        h = self.layout.project_down(h.astype(dtype), self.lora_a[...].astype(dtype))
        return y + self.scale * self.layout.project_up(h, self.lora_b[...].astype(dtype)).astype(y.dtype)

    def delta_kernel(self) -> jax.Array:
        """s * A B in the base kernel's layout, in float32."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        return self.scale * self.layout.kernel_from_factors(a, b)

    def _merge(self) -> None:
        kernel = self.base_layer.kernel
        kernel[...] = (kernel[...].astype(jnp.float32) + self.delta_kernel()).astype(kernel.dtype)

    def _unmerge(self) -> None:
        kernel = self.base_layer.kernel
        kernel[...] = (kernel[...].astype(jnp.float32) - self.delta_kernel()).astype(kernel.dtype)
