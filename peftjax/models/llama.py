"""Llama-family decoders (Llama, Mistral, Qwen2) in Flax NNX.

One implementation covers the three families because they share the block:
pre-RMSNorm, rotary attention with grouped key/value heads, and a SwiGLU MLP.
What differs is configuration: which projections carry biases (Qwen2 biases
q/k/v only, Llama's ``attention_bias`` biases all four), whether some layers
use a sliding attention window (Mistral, some Qwen2), and RoPE scaling.

Module paths equal the checkpoints' keys (``model.layers.0.self_attn.q_proj``,
``model.layers.0.mlp.down_proj``, ``lm_head``, ``score``), and linear layers
are plain ``nnx.Linear`` so adapters can wrap them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar

import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.models import common, lean_backward
from peftjax.models.common import Array, ModelOutput
from peftjax.points import AttentionKeyValue, BranchOutput, InputEmbeddings, prefix_positions

MODEL_TYPES = ("llama", "mistral", "qwen2")
ROPE_TYPES = ("default", "linear", "llama3")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeParameters:
    """Rotary embedding settings, as transformers 5's ``rope_parameters`` dict.

    ``rope_type`` "default" uses ``rope_theta`` alone; "linear" divides every
    frequency by ``factor``; "llama3" rescales only low frequencies, with a
    smooth transition between ``low_freq_factor`` and ``high_freq_factor``
    measured against ``original_max_position_embeddings`` (Llama 3.1+).
    """

    rope_type: str = "default"
    rope_theta: float = 10000.0
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    def __post_init__(self) -> None:
        common.require_choice(self, "rope_type", ROPE_TYPES)
        if not self.rope_theta > 0:
            raise ValueError(f"RopeParameters.rope_theta must be > 0, got {self.rope_theta!r}.")
        needed = {
            "default": (),
            "linear": ("factor",),
            "llama3": (
                "factor",
                "low_freq_factor",
                "high_freq_factor",
                "original_max_position_embeddings",
            ),
        }[self.rope_type]
        for name in needed:
            if getattr(self, name) is None:
                raise ValueError(
                    f"RopeParameters.{name} is required for rope_type={self.rope_type!r}."
                )
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(
                "RopeParameters.high_freq_factor must exceed low_freq_factor for llama3 scaling."
            )

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> RopeParameters:
        """Reads ``rope_parameters`` (transformers 5) or ``rope_scaling`` + ``rope_theta`` (4.x)."""
        params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        if any(isinstance(v, Mapping) for v in params.values()):
            raise ValueError(
                "Per-layer-type rope_parameters are not supported by peftjax's Llama."
            )
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_type", "default")
        params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
        partial = params.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if partial not in (None, 1, 1.0):
            raise ValueError(
                f"partial_rotary_factor={partial} is not supported; peftjax rotates whole heads."
            )
        if params["rope_type"] not in ROPE_TYPES:
            raise ValueError(
                f"rope_type={params['rope_type']!r} is not supported; "
                f"choose one of {list(ROPE_TYPES)}."
            )
        if params["rope_type"] == "llama3":
            params.setdefault(
                "original_max_position_embeddings", d.get("max_position_embeddings")
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names and v is not None})

    def to_hf_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def inverse_frequencies(self, head_dim: int) -> np.ndarray:
        """(head_dim // 2,) float32 inverse frequencies, computed as transformers does.

        Float32 throughout, in transformers' operation order, so positions
        rotate by the same angles to the last bit that matters for 1e-4 parity.
        """
        exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(
            head_dim
        )
        inv_freq = (1.0 / (np.float32(self.rope_theta) ** exponents)).astype(np.float32)
        if self.rope_type == "linear":
            return (inv_freq / np.float32(self.factor)).astype(np.float32)
        if self.rope_type == "llama3":
            factor = np.float32(self.factor)
            old_len = self.original_max_position_embeddings
            low_freq_wavelen = old_len / self.low_freq_factor
            high_freq_wavelen = old_len / self.high_freq_factor
            wavelen = (2 * math.pi / inv_freq).astype(np.float32)
            scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - self.low_freq_factor) / (
                self.high_freq_factor - self.low_freq_factor
            )
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
            return np.where(is_medium, smoothed, scaled).astype(np.float32)
        return inv_freq


@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Hyper-parameters shared by Llama, Mistral and Qwen2 checkpoints.

    ``attention_bias`` biases q/k/v and ``attention_output_bias`` biases
    o_proj (Llama sets both from its one flag; Qwen2 has q/k/v only).
    ``layer_types`` names each layer's attention ("full_attention" or
    "sliding_attention", the latter limited to ``sliding_window`` keys);
    empty means all full. ``remat`` recomputes layer activations in backward.
    """

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_parameters: RopeParameters = RopeParameters()
    attention_bias: bool = False
    attention_output_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | tuple[int, ...] | None = 2
    num_labels: int = 2
    label_names: tuple[str, ...] = ()
    remat: bool = False

    def __post_init__(self) -> None:
        # Fill the derived defaults the way transformers does, keeping the
        # dataclass frozen for callers.
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None and self.num_attention_heads:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_parameters, Mapping):
            object.__setattr__(self, "rope_parameters", RopeParameters(**self.rope_parameters))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))

        common.require_choice(self, "model_type", MODEL_TYPES)
        common.require_positive(
            self,
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        )
        common.require_probability(self, "attention_dropout")
        common.require_choice(self, "hidden_act", common.ACTIVATIONS)
        common.require_labels(self)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig.num_attention_heads={self.num_attention_heads} must be a multiple "
                f"of num_key_value_heads={self.num_key_value_heads}."
            )
        if self.head_dim % 2:
            raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for RoPE.")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"LlamaConfig.pad_token_id={self.pad_token_id} must index the vocabulary "
                f"(0 <= id < vocab_size={self.vocab_size}) or be None."
            )
        if self.layer_types:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"LlamaConfig.layer_types has {len(self.layer_types)} entries for "
                    f"num_hidden_layers={self.num_hidden_layers}."
                )
            for layer_type in self.layer_types:
                if layer_type not in LAYER_TYPES:
                    raise ValueError(
                        f"LlamaConfig.layer_types entry {layer_type!r} is not one of "
                        f"{list(LAYER_TYPES)}."
                    )
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError(
                "LlamaConfig.sliding_window must be set when layer_types has sliding_attention."
            )
        if self.sliding_window is not None:
            common.require_positive(self, "sliding_window")
        # Each family writes its biases with its own flags; refuse what its
        # config.json could not express, so save_pretrained round-trips.
        qkv, out = self.attention_bias, self.attention_output_bias
        if self.model_type == "llama" and qkv != out:
            raise ValueError(
                "LlamaConfig.attention_output_bias must equal attention_bias for model_type "
                "'llama' (transformers biases all four projections with one flag)."
            )
        if self.model_type == "qwen2" and (not qkv or out):
            raise ValueError(
                "LlamaConfig for model_type 'qwen2' needs attention_bias=True and "
                "attention_output_bias=False (Qwen2 biases q/k/v only)."
            )
        if self.model_type == "mistral" and (qkv or out or self.mlp_bias):
            raise ValueError("LlamaConfig for model_type 'mistral' has no biases.")
        if self.model_type != "llama" and self.mlp_bias:
            raise ValueError("LlamaConfig.mlp_bias is only expressible for model_type 'llama'.")

    @property
    def base_model_prefix(self) -> str:
        return "model"

    def layer_window(self, index: int) -> int | None:
        """The sliding window of layer ``index``, or None for full attention."""
        if self.layer_types and self.layer_types[index] == "sliding_attention":
            return self.sliding_window
        return None

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Builds a config from a Llama, Mistral or Qwen2 ``config.json`` dict."""
        model_type = d.get("model_type", "llama")
        fields = common.known_fields(cls, d)
        for name in ("rope_parameters", "label_names", "num_labels", "layer_types"):
            fields.pop(name, None)
        fields.update(common.labels_from_hf(d))
        fields["rope_parameters"] = RopeParameters.from_hf_dict(d)
        if model_type == "llama":
            fields["attention_output_bias"] = bool(d.get("attention_bias", False))
        elif model_type == "qwen2":
            fields["attention_bias"] = True
            fields["attention_output_bias"] = False
        else:
            fields["attention_bias"] = fields["attention_output_bias"] = False
        num_layers = d.get("num_hidden_layers", 32)
        if model_type == "mistral":
            window = d.get("sliding_window")
            fields["sliding_window"] = window
            fields["layer_types"] = ("sliding_attention",) * num_layers if window else ()
        elif model_type == "qwen2":
            window = d.get("sliding_window") if d.get("use_sliding_window") else None
            fields["sliding_window"] = window
            layer_types = d.get("layer_types")
            if layer_types is None:
                first = d.get("max_window_layers", 28)
                layer_types = [
                    "sliding_attention" if window is not None and i >= first else "full_attention"
                    for i in range(num_layers)
                ]
            fields["layer_types"] = tuple(layer_types) if window is not None else ()
        else:
            fields["sliding_window"] = None
        if isinstance(fields.get("eos_token_id"), list):
            fields["eos_token_id"] = tuple(fields["eos_token_id"])
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The family's transformers ``config.json`` dict (without ``architectures``)."""
        d = dataclasses.asdict(self)
        for name in (
            "label_names",
            "num_labels",
            "remat",
            "attention_output_bias",
            "layer_types",
            "sliding_window",
        ):
            d.pop(name)
        d["rope_parameters"] = self.rope_parameters.to_hf_dict()
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        if self.model_type == "mistral":
            d.pop("attention_bias")
            d.pop("mlp_bias")
            d["sliding_window"] = self.sliding_window
        elif self.model_type == "qwen2":
            d.pop("attention_bias")
            d.pop("mlp_bias")
            d["use_sliding_window"] = self.sliding_window is not None
            d["sliding_window"] = self.sliding_window
            d["layer_types"] = list(self.layer_types) or ["full_attention"] * self.num_hidden_layers
            d["max_window_layers"] = next(
                (i for i, t in enumerate(self.layer_types) if t == "sliding_attention"),
                self.num_hidden_layers,
            )
        d.update(common.labels_to_hf(self))
        return d


def _rms_norm(config: LlamaConfig, *, dtype, param_dtype, rngs) -> lean_backward.RMSNorm:
    return lean_backward.RMSNorm(
        config.hidden_size,
        epsilon=config.rms_norm_eps,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def rope_cos_sin(
    position_ids_bt: Array, inv_freq: np.ndarray, dtype: Any
) -> tuple[Array, Array]:
    """cos and sin tables (batch, t, head_dim), angles computed in float32."""
    freqs_btk = position_ids_bt[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    angles_bth = jnp.concatenate([freqs_btk, freqs_btk], axis=-1)
    return jnp.cos(angles_bth).astype(dtype), jnp.sin(angles_bth).astype(dtype)


def apply_rope(x_btnh: Array, cos_bth: Array, sin_bth: Array) -> Array:
    """Rotates the two halves of each head (transformers' ``rotate_half`` layout)."""
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos_bth[:, :, None] + rotated * sin_bth[:, :, None]


class LlamaAttention(nnx.Module):
    """Causal grouped-query attention with rotary positions.

    ``attention_kv`` sees keys after RoPE, so a prefix a method prepends is
    position-free, and the causal mask then treats it as visible to all.
    """

    def __init__(
        self, config: LlamaConfig, *, sliding_window: int | None, dtype, param_dtype, rngs
    ):
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.sliding_window = sliding_window
        q_dim = self.num_heads * self.head_dim
        kv_dim = self.num_kv_heads * self.head_dim
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden, qkv_bias = config.hidden_size, config.attention_bias
        self.q_proj = common.linear(config, hidden, q_dim, bias=qkv_bias, **kwargs)
        self.k_proj = common.linear(config, hidden, kv_dim, bias=qkv_bias, **kwargs)
        self.v_proj = common.linear(config, hidden, kv_dim, bias=qkv_bias, **kwargs)
        self.o_proj = common.linear(config, q_dim, hidden, bias=config.attention_output_bias, **kwargs)
        self.attention_dropout = nnx.Dropout(config.attention_dropout, rngs=rngs)
        self.attention_kv = AttentionKeyValue()

    def __call__(self, x_btd: Array, cos_bth: Array, sin_bth: Array, mask_bt: Array) -> Array:
        batch, seq_len, _ = x_btd.shape
        q_btnh = self.q_proj(x_btd).reshape(batch, seq_len, self.num_heads, self.head_dim)
        k_bsmh = self.k_proj(x_btd).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        v_bsmh = self.v_proj(x_btd).reshape(batch, seq_len, self.num_kv_heads, self.head_dim)
        q_btnh = apply_rope(q_btnh, cos_bth, sin_bth)
        k_bsmh = apply_rope(k_bsmh, cos_bth, sin_bth)
        k_bsmh, v_bsmh, mask_bs = self.attention_kv(k_bsmh, v_bsmh, mask_bt)
        mask_bts = common.attention_mask(
            mask_bs, seq_len, causal=True, sliding_window=self.sliding_window
        )
        out_btnh = common.dot_product_attention(
            q_btnh, k_bsmh, v_bsmh, mask_bts, dropout=self.attention_dropout
        )
        return self.o_proj(out_btnh.reshape(batch, seq_len, -1))


class LlamaMLP(nnx.Module):
    """SwiGLU: ``down_proj(act(gate_proj(x)) * up_proj(x))``."""

    def __init__(self, config: LlamaConfig, *, dtype, param_dtype, rngs):
        kwargs = dict(bias=config.mlp_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden, inner = config.hidden_size, config.intermediate_size
        self.gate_proj = common.linear(config, hidden, inner, **kwargs)
        self.up_proj = common.linear(config, hidden, inner, **kwargs)
        self.down_proj = common.linear(config, inner, hidden, **kwargs)
        self.hidden_act = config.hidden_act

    def __call__(self, x_btd: Array) -> Array:
        act = common.activation(self.hidden_act)
        return self.down_proj(act(self.gate_proj(x_btd)) * self.up_proj(x_btd))


class LlamaDecoderLayer(nnx.Module):
    """Pre-norm block; its points see each branch's output and the residual stream it joins."""

    def __init__(self, config: LlamaConfig, index: int, *, dtype, param_dtype, rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = LlamaAttention(config, sliding_window=config.layer_window(index), **kwargs)
        self.mlp = LlamaMLP(config, **kwargs)
        self.input_layernorm = _rms_norm(config, **kwargs)
        self.post_attention_layernorm = _rms_norm(config, **kwargs)
        self.after_attention = BranchOutput()
        self.after_mlp = BranchOutput()

    def __call__(self, x_btd: Array, cos_bth: Array, sin_bth: Array, mask_bt: Array) -> Array:
        h_btd = self.input_layernorm(x_btd)
        out_btd = self.self_attn(h_btd, cos_bth, sin_bth, mask_bt)
        x_btd = x_btd + self.after_attention(out_btd, x_btd, None)
        h_btd = self.post_attention_layernorm(x_btd)
        out_btd = self.mlp(h_btd)
        return x_btd + self.after_mlp(out_btd, x_btd, None)


class LlamaModel(nnx.Module):
    """Token embeddings, decoder layers and the final norm (``model.*``).

    Call with ``input_ids`` (batch, seq) and optionally ``attention_mask``
    (1 = token, 0 = padding; right or left padding both work since the mask
    is applied per key) and ``position_ids``, which default to 0..seq-1 (N..
    after prefix tuning's N prefixes) as in transformers' forward; for left
    padding pass ``cumsum(mask) - 1`` to start every sequence at position 0.
    """

    output_head_names: ClassVar[tuple[str, ...]] = ()
    hf_architecture_suffix: ClassVar[str] = "Model"

    def __init__(
        self,
        config: LlamaConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed_tokens = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            embedding_init=common.embedding_init(config.initializer_range, config.pad_token_id),
            **kwargs,
        )
        self.input_embeddings = InputEmbeddings()
        self.layers = nnx.List(
            [LlamaDecoderLayer(config, i, **kwargs) for i in range(config.num_hidden_layers)]
        )
        self.norm = _rms_norm(config, **kwargs)

    def get_input_embeddings(self) -> nnx.Embed:
        return self.embed_tokens

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
    ) -> ModelOutput:
        batch, seq_len = input_ids.shape
        mask_bt = common.as_bool_mask(attention_mask, input_ids.shape)
        x_btd = self.embed_tokens(input_ids)
        x_btd, mask_bt = self.input_embeddings(x_btd, mask_bt)
        extra = common.num_prepended(x_btd, seq_len)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(seq_len), (batch, seq_len))
        start = prefix_positions(layer.self_attn.attention_kv for layer in self.layers)
        position_ids = common.shift_positions(position_ids, extra) + start
        inv_freq = self.config.rope_parameters.inverse_frequencies(self.config.head_dim)
        cos_bth, sin_bth = rope_cos_sin(position_ids, inv_freq, x_btd.dtype)
        x_btd = common.run_layers(
            self.layers, x_btd, cos_bth, sin_bth, mask_bt, remat=self.config.remat
        )
        x_btd = self.norm(x_btd)[:, extra:]
        return ModelOutput(last_hidden_state=x_btd)


class _LlamaWithHead(common.ModelWithHead):
    """The decoder under ``model``, a head on its output."""

    base_model_class: ClassVar[type[nnx.Module]] = LlamaModel

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        position_ids: Array | None = None,
    ) -> ModelOutput:
        out = self.model(input_ids, attention_mask, position_ids)
        return out.replace(logits=self._logits(out, input_ids, attention_mask))

    def _logits(self, out: ModelOutput, input_ids: Array, attention_mask: Array | None) -> Array:
        raise NotImplementedError


class LlamaForCausalLM(_LlamaWithHead):
    """Decoder plus language-model head (``logits``: (batch, seq, vocab)).

    With ``tie_word_embeddings`` there is no ``lm_head`` module: logits are
    computed against ``model.embed_tokens`` (an ``nnx.Linear`` kernel is the
    transpose of the embedding table, so the two cannot share one Variable).
    """

    output_head_names: ClassVar[tuple[str, ...]] = ("lm_head",)
    hf_architecture_suffix: ClassVar[str] = "ForCausalLM"

    def _init_head(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        self.lm_head = None if config.tie_word_embeddings else common.linear(
            config, config.hidden_size, config.vocab_size, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def _logits(self, out: ModelOutput, input_ids: Array, attention_mask: Array | None) -> Array:
        if self.lm_head is None:
            return self.model.embed_tokens.attend(out.last_hidden_state)
        return self.lm_head(out.last_hidden_state)


class LlamaForSequenceClassification(_LlamaWithHead):
    """Decoder plus ``score`` on the last real token (``logits``: (batch, num_labels)).

    The pooled token is the rightmost position whose ``attention_mask`` is 1
    (which handles right and left padding). Without a mask, the rightmost
    token that is not ``pad_token_id`` is used, as transformers does, or the
    last token when the config has no padding id.
    """

    output_head_names: ClassVar[tuple[str, ...]] = ("score",)
    hf_architecture_suffix: ClassVar[str] = "ForSequenceClassification"

    def _init_head(self, config: LlamaConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        self.score = common.linear(
            config, config.hidden_size, config.num_labels, bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def _logits(self, out: ModelOutput, input_ids: Array, attention_mask: Array | None) -> Array:
        if attention_mask is not None:
            real_bt = attention_mask.astype(bool)
        elif self.config.pad_token_id is not None:
            real_bt = input_ids != self.config.pad_token_id
        else:
            real_bt = jnp.ones(input_ids.shape, dtype=bool)
        positions_bt = jnp.arange(input_ids.shape[1])
        last_b = jnp.max(jnp.where(real_bt, positions_bt, 0), axis=1)
        pooled_bd = jnp.take_along_axis(
            out.last_hidden_state, last_b[:, None, None], axis=1
        )[:, 0]
        return self.score(pooled_bd)


__all__ = [
    "LlamaConfig",
    "RopeParameters",
    "LlamaModel",
    "LlamaForCausalLM",
    "LlamaForSequenceClassification",
]
