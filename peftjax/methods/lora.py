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

Besides linear and einsum kernels, LoRA adapts ``nnx.Embed`` tables and
``nnx.Conv`` kernels (see ``peftjax.core.layouts``), as HF PEFT's Embedding
and Conv layers do: on a table, A (vocab, r) is looked up by token and starts
at zero while B starts standard normal (HF PEFT's choice, after the LoRA
reference code), and dropout does not apply; on a convolution, A convolves
with the base layer's window and B is 1x1.

Per-module ranks and alphas: ``rank_pattern`` / ``alpha_pattern`` map a
regex to a rank / alpha, as HF PEFT's fields of the same names: a module takes
the first key that ``re.match(rf"(.*\\.)?({key})$", path)`` accepts (the key
matches the path or a dot-separated tail of it), else ``rank`` / ``alpha``, and
its scale is its own alpha / r (alpha / sqrt(r) with rsLoRA). A key that
matches no adapted module is an error (HF PEFT warns and ignores it).

HF PEFT's format: ``peft_type`` LORA; A and B are ``lora_A.weight`` /
``lora_B.weight`` in torch's (out, in[, window]) order, or
``lora_embedding_A`` / ``lora_embedding_B`` on a table.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.core.kernels import SUPPORTED_LAYERS
from peftjax.core.layouts import low_rank_layout
from peftjax.errors import PeftError
from peftjax.core.paths import dotted
from peftjax.methods.base import AdapterWrapper, HfTensor, LabelRule, MethodConfig, register_method, registered_methods
from peftjax.schema import FrozenDict
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
    """Low-rank adaptation of linear, einsum, embedding and convolution layers.

    Attributes:
      rank: r, the inner dimension of B A.
      alpha: scaling numerator; s = alpha / r (alpha / sqrt(r) with ``rslora``).
      dropout: dropout rate on the adapter's input, in [0, 1).
      rslora: use rank-stabilised scaling.
      init: how A starts, as HF PEFT's ``init_lora_weights`` (a test compares
        the distributions): ``"kaiming"`` (its default, True): uniform on
        +-1/sqrt(fan_in), torch's ``kaiming_uniform_(a=sqrt(5))``;
        ``"gaussian"``: normal with std 1/r. B starts at zero (on an embedding
        table, A starts at zero and B standard normal, as in HF PEFT).
      loraplus_lr_ratio: LoRA+: B's learning rate over A's (the paper's lambda;
        16 is its usual choice). ``None`` trains A and B alike. Every LoraB in
        the model takes the ratio, so two stacked LoRA+ adapters must agree.
      rank_pattern: ``{regex: rank}`` for modules whose rank is not ``rank``
        (HF PEFT's field: see the module docstring for the matching).
      alpha_pattern: ``{regex: alpha}`` for modules whose alpha is not ``alpha``.
    """

    target_types = (*SUPPORTED_LAYERS, nnx.Embed, nnx.Conv)
    default_targets = {  # HF PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (it has none for ViT)
        **dict.fromkeys(("bert", "roberta"), ("query", "value")),
        **dict.fromkeys(("llama", "mistral", "qwen2"), ("q_proj", "v_proj")),
    }
    hf_peft_type = "LORA"

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rslora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"
    loraplus_lr_ratio: float | None = None
    rank_pattern: Mapping[str, int] = FrozenDict()
    alpha_pattern: Mapping[str, float] = FrozenDict()

    def __post_init__(self):
        super().__post_init__()
        self.check(isinstance(self.rank, int) and self.rank > 0, "rank", "must be a positive integer")
        self.check(self.alpha > 0, "alpha", "must be > 0")
        for field, valid, requirement in (
            ("rank_pattern", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "positive integers"),
            ("alpha_pattern", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0, "> 0"),
        ):
            pattern = getattr(self, field)
            self.check(isinstance(pattern, Mapping), field, "must be a mapping {module regex: value}")
            for key, value in pattern.items():
                self.check(isinstance(key, str) and _compiles(key), field, f"key {key!r} is not a valid regex")
                self.check(valid(value), field, f"values must be {requirement}; {key!r} has {value!r}")
            self._set(field, FrozenDict(pattern))
        self.check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        self.check(self.init in ("kaiming", "gaussian"), "init", "must be 'kaiming' or 'gaussian'")
        self.check(
            self.loraplus_lr_ratio is None or self.loraplus_lr_ratio > 0, "loraplus_lr_ratio", "must be None or > 0"
        )

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def for_module(self, path: str) -> LoraConfig:
        """This config with the rank and alpha that ``rank_pattern`` / ``alpha_pattern`` give ``path``."""
        if not self.rank_pattern and not self.alpha_pattern:
            return self
        rank, alpha = _pattern_value(self.rank_pattern, path), _pattern_value(self.alpha_pattern, path)
        return dataclasses.replace(self, rank=self.rank if rank is None else rank,
                                   alpha=self.alpha if alpha is None else float(alpha),
                                   rank_pattern=FrozenDict(), alpha_pattern=FrozenDict())

    def wrap(self, module, *, adapter_name, rngs):
        layer = module.base_layer if isinstance(module, AdapterWrapper) else module
        wrapper = LoraEmbed if isinstance(layer, nnx.Embed) else LoraLinear
        return wrapper(module, self, adapter_name=adapter_name, rngs=rngs)

    def wrap_all(self, modules, *, model, adapter_name, rngs):
        if not self.rank_pattern and not self.alpha_pattern:
            return super().wrap_all(modules, model=model, adapter_name=adapter_name, rngs=rngs)
        path_of = {id(m): dotted(p) for p, m in nnx.iter_modules(model)}
        paths = [path_of[id(m)] for m in modules]
        for field in ("rank_pattern", "alpha_pattern"):
            unused = [k for k in getattr(self, field) if not any(_pattern_matches(k, p) for p in paths)]
            if unused:
                raise PeftError(
                    f"{type(self).__name__}.{field} keys {unused} match none of the {len(paths)} adapted modules "
                    f"(a key must match a module path or a dot-separated tail of it, e.g. {paths[0]!r}); fix or "
                    "remove them"
                )
        return [self.for_module(path).wrap(m, adapter_name=adapter_name, rngs=rngs) for path, m in zip(paths, modules)]

    def to_hf(self, names):
        init = True if self.init == "kaiming" else "gaussian"
        return dict(peft_type="LORA", r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                    use_rslora=self.rslora, use_dora=False, init_lora_weights=init,
                    rank_pattern=_patterns_to_hf(self.rank_pattern, names),
                    alpha_pattern=_patterns_to_hf(self.alpha_pattern, names))

    @classmethod
    def from_hf(cls, fields, names, **common):
        init = fields.pop("init_lora_weights", True)
        if init not in (True, False, "gaussian"):
            raise PeftError(
                f"init_lora_weights={init!r}: only adapters initialised as plain LoRA (true, false or 'gaussian') "
                "load on an unchanged base model; convert the adapter to plain LoRA in HF PEFT first"
            )
        for unused_unless_set in ("megatron_core", "qalora_group_size"):  # read only with megatron_config / use_qalora
            fields.pop(unused_unless_set, None)
        config_cls = registered_methods()["dora"] if fields.pop("use_dora", False) else cls  # DoRA is a LoRA flag there
        return config_cls(
            rank=fields.pop("r", 8), alpha=float(fields.pop("lora_alpha", 8)), dropout=fields.pop("lora_dropout", 0.0),
            rslora=fields.pop("use_rslora", False), init="gaussian" if init == "gaussian" else "kaiming",
            rank_pattern=_patterns_from_hf(fields.pop("rank_pattern", None), names),
            alpha_pattern=_patterns_from_hf(fields.pop("alpha_pattern", None), names), **common
        )

    def label_rules(self, model: nnx.Module) -> list[LabelRule]:
        rules = super().label_rules(model)
        if self.loraplus_lr_ratio is not None:
            rules.append((LoraB, LORAPLUS_B_LABEL))
        return rules

    def lr_multipliers(self) -> dict[str, float]:
        return {} if self.loraplus_lr_ratio is None else {LORAPLUS_B_LABEL: self.loraplus_lr_ratio}


def _compiles(key: str) -> bool:
    try:
        re.compile(key)
    except re.error:
        return False
    return True


def _pattern_matches(key: str, path: str) -> bool:
    """HF PEFT's ``get_pattern_key`` test: ``key`` matches the path or a dot-separated tail of it."""
    return re.match(rf"(.*\.)?({key})$", path) is not None


def _pattern_value(pattern: Mapping[str, float], path: str):
    """The value of the first key of ``pattern`` that matches ``path`` (HF PEFT's order), or None."""
    return next((value for key, value in pattern.items() if _pattern_matches(key, path)), None)


def _patterns_to_hf(pattern: Mapping[str, float], names) -> dict[str, float]:
    """A pattern for HF PEFT, whose keys match transformers' module paths: as it is when
    those are ours, else each key spelled out as the transformers paths it matches."""
    if not names.renames:
        return dict(pattern)
    found = {}
    for key, value in pattern.items():
        for path in names.paths:
            if _pattern_matches(key, path):
                found.setdefault(re.escape(names.path(path)), value)
    return found


def _patterns_from_hf(pattern: Mapping[str, float] | None, names) -> FrozenDict:
    if not pattern:
        return FrozenDict()
    if not names.renames:
        return FrozenDict(pattern)
    found = {}
    for key, value in pattern.items():
        for path in names.paths:
            if _pattern_matches(key, names.path(path)):
                found.setdefault(re.escape(path), value)
    return FrozenDict(found)


def init_down_projection(config: LoraConfig, shape: tuple[int, ...], fan_in: int, key: jax.Array) -> jax.Array:
    """A's initial value for ``config.init`` (shared with LoRA variants)."""
    if config.init == "gaussian":
        return jax.random.normal(key, shape, jnp.float32) / config.rank
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class LoraLinear(AdapterWrapper):
    """An ``nnx.Linear``, ``nnx.Einsum`` or ``nnx.Conv`` plus a scaled low-rank update."""

    def __init__(self, base: nnx.Module, config: LoraConfig, *, adapter_name: str, rngs: nnx.Rngs):
        super().__init__(base, adapter_name=adapter_name)
        self.layout = low_rank_layout(self.base_layer)
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
        kernel = getattr(self.base_layer, self.layout.weight_name)
        kernel[...] = (kernel[...].astype(jnp.float32) + self.delta_kernel()).astype(kernel.dtype)

    def _unmerge(self) -> None:
        kernel = getattr(self.base_layer, self.layout.weight_name)
        kernel[...] = (kernel[...].astype(jnp.float32) - self.delta_kernel()).astype(kernel.dtype)

    def hf_tensors(self) -> dict[str, HfTensor]:
        if isinstance(self.base_layer, nnx.Einsum):
            raise PeftError(f"{type(self).__name__} on an nnx.Einsum has no HF PEFT form (HF PEFT adapts nn.Linear)")
        a, b = self.lora_a.shape, self.lora_b.shape
        window = len(a) - 2  # a convolution's spatial axes lead A's; a linear layer has none
        return {
            "lora_A.weight": HfTensor("lora_a", (window + 1, window, *range(window)), (a[-1], a[-2], *a[:window])),
            "lora_B.weight": HfTensor("lora_b", (1, 0), (b[1], b[0], *(1,) * window)),
        }


class LoraEmbed(LoraLinear):
    """An ``nnx.Embed`` plus a scaled low-rank update of its table (no dropout:
    the input is token ids); ``attend`` (a tied output head) uses the base table."""

    def __init__(self, base: nnx.Module, config: LoraConfig, *, adapter_name: str, rngs: nnx.Rngs):
        AdapterWrapper.__init__(self, base, adapter_name=adapter_name)
        self.layout = low_rank_layout(self.base_layer)
        self.scale = config.scale
        self.lora_a = LoraA(jnp.zeros(self.layout.down_shape(config.rank), jnp.float32))
        self.lora_b = LoraB(jax.random.normal(rngs.params(), self.layout.up_shape(config.rank), jnp.float32))
        self.dropout = None

    def __call__(self, ids: jax.Array) -> jax.Array:
        y = self.base(ids)
        if not self.adds_output:
            return y
        h = self.layout.project_down(ids, self.lora_a[...].astype(y.dtype))
        return y + self.scale * self.layout.project_up(h, self.lora_b[...].astype(y.dtype))

    def attend(self, query: jax.Array) -> jax.Array:
        return self.base_layer.attend(query)

    def hf_tensors(self) -> dict[str, HfTensor]:
        (vocab, rank), features = self.lora_a.shape, self.lora_b.shape[1]
        return {
            "lora_embedding_A": HfTensor("lora_a", (1, 0), (rank, vocab)),
            "lora_embedding_B": HfTensor("lora_b", (1, 0), (features, rank)),
        }
