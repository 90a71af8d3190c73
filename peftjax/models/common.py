"""Pieces the reference models share: outputs, attention, masks, activations.

The three model families (BERT/RoBERTa, Llama, ViT) differ in their blocks but
compute attention the same way: project, let the ``AttentionKeyValue`` point
see the keys and values, build the mask from whatever key sequence came back,
then softmax in float32. Keeping that one function here means a prefix that a
method prepends is handled identically by every model.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import lean_backward

Array = jax.Array


@flax.struct.dataclass
class ModelOutput:
    """What every reference model returns; a pytree, so it crosses ``jit``.

    Attributes:
        last_hidden_state: (batch, seq, hidden) final hidden states, aligned
            with the caller's tokens (positions an ``InputEmbeddings`` point
            prepended are dropped); a ResNet's final feature maps,
            (batch, channels, height, width) as transformers returns them.
        logits: the head's output, or ``None`` for a model without a head:
            (batch, num_labels) for sequence/image classification,
            (batch, seq, num_labels) for token classification and
            (batch, seq, vocab) for causal language modelling.
        pooler_output: (batch, hidden) output of the BERT/ViT pooler (a
            ResNet's global average pool) when the model has one, else ``None``.
    """

    last_hidden_state: Array
    logits: Array | None = None
    pooler_output: Array | None = None


# Names as transformers' ACT2FN spells them, so configs round-trip unchanged.
ACTIVATIONS: Mapping[str, Callable[[Array], Array]] = {
    "gelu": lean_backward.gelu,
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_fast": functools.partial(jax.nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[Array], Array]:
    """Looks an activation up by its transformers name."""
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------
# Config validation helpers: every config reports the offending field by name.
# --------------------------------------------------------------------------


def require_positive(config: Any, *names: str) -> None:
    """Raises ``ValueError`` naming the first field that is not an int > 0."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(
                f"{type(config).__name__}.{name} must be a positive integer, got {value!r}."
            )


def require_probability(config: Any, *names: str) -> None:
    """Raises ``ValueError`` naming the first dropout rate outside [0, 1)."""
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
            raise ValueError(
                f"{type(config).__name__}.{name} must be a probability in [0, 1), got {value!r}."
            )


def require_choice(config: Any, name: str, choices: Mapping[str, Any] | tuple[str, ...]) -> None:
    """Raises ``ValueError`` naming the field when its value is not one of ``choices``."""
    value = getattr(config, name)
    if value not in choices:
        raise ValueError(
            f"{type(config).__name__}.{name}={value!r} is not supported; "
            f"choose one of {sorted(choices)}."
        )


def require_labels(config: Any) -> None:
    """Checks ``num_labels`` and that ``label_names``, when given, match it."""
    require_positive(config, "num_labels")
    if config.label_names and len(config.label_names) != config.num_labels:
        raise ValueError(
            f"{type(config).__name__}.label_names has {len(config.label_names)} names but "
            f"num_labels={config.num_labels}; give one name per label or none."
        )


def labels_from_hf(d: Mapping[str, Any]) -> dict[str, Any]:
    """Reads ``num_labels``/``id2label`` the way transformers does."""
    id2label = d.get("id2label")
    if id2label:
        names = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
        # transformers' placeholder names carry no information; keep none.
        if names == tuple(f"LABEL_{i}" for i in range(len(names))):
            names = ()
        return {"num_labels": len(id2label), "label_names": names}
    if d.get("num_labels") is not None:
        return {"num_labels": int(d["num_labels"])}
    return {}


def labels_to_hf(config: Any) -> dict[str, Any]:
    """Writes ``id2label``/``label2id`` so transformers rebuilds ``num_labels``."""
    names = config.label_names or tuple(f"LABEL_{i}" for i in range(config.num_labels))
    return {
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
    }


def known_fields(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of an HF config dict that are fields of ``cls`` (others ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in d.items() if k in names}


# --------------------------------------------------------------------------
# Initialisers: transformers' ``_init_weights`` draws N(0, initializer_range).
# --------------------------------------------------------------------------


def normal_init(stddev: float) -> nnx.Initializer:
    """Normal initialiser with transformers' default standard deviation."""
    return nnx.initializers.normal(stddev=stddev)


def linear(config: Any, din: int, dout: int, *, bias: bool = True, dtype, param_dtype, rngs) -> nnx.Linear:
    """A projection initialised as transformers does: normal(``config.initializer_range``) kernel, zero bias."""
    return nnx.Linear(
        din,
        dout,
        use_bias=bias,
        kernel_init=normal_init(config.initializer_range),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def layer_norm(config: Any, *, dtype, param_dtype, rngs) -> lean_backward.LayerNorm:
    # Two-pass variance, as torch computes it: parity within 1e-4 needs it.
    return lean_backward.LayerNorm(
        config.hidden_size,
        epsilon=config.layer_norm_eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def embedding_init(stddev: float, padding_idx: int | None) -> nnx.Initializer:
    """Normal initialiser that zeroes the padding row, as ``nn.Embedding`` does."""

    def init(key: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
        table = jax.random.normal(key, shape, dtype) * jnp.asarray(stddev, dtype)
        if padding_idx is not None:
            table = table.at[padding_idx].set(0)
        return table

    return init


# --------------------------------------------------------------------------
# Attention.
# --------------------------------------------------------------------------


def attention_mask(
    key_mask_bs: Array,
    q_len: int,
    *,
    causal: bool,
    sliding_window: int | None = None,
) -> Array:
    """Boolean (batch, q_len, kv_len) mask, True where a query may attend.

    Keys beyond the query length are a visible prefix (prepended by a method):
    query ``i`` sits at key position ``i + kv_len - q_len``, so the causal and
    sliding-window limits are offset by that amount.
    """
    kv_len = key_mask_bs.shape[1]
    mask_bts = key_mask_bs[:, None, :]
    if causal:
        q_pos_t = jnp.arange(q_len)[:, None] + (kv_len - q_len)
        k_pos_s = jnp.arange(kv_len)[None, :]
        allowed_ts = k_pos_s <= q_pos_t
        if sliding_window is not None:
            allowed_ts &= k_pos_s > q_pos_t - sliding_window
        mask_bts = mask_bts & allowed_ts[None]
    return mask_bts


def dot_product_attention(
    q_btnh: Array,
    k_bsmh: Array,
    v_bsmh: Array,
    mask_bts: Array,
    *,
    dropout: nnx.Dropout,
) -> Array:
    """Softmax attention with grouped keys/values; returns (batch, t, n, h).

    ``n`` query heads share ``m`` key/value heads in groups of ``n // m``
    (grouped-query attention). Scores and softmax are in float32, as in
    transformers. Fully masked rows (e.g. query positions of padding) get a
    uniform distribution instead of NaN.

    Without attention dropout (eval mode, or a rate of 0) this is
    ``lean_backward.attention``, whose backward pass keeps the probabilities
    but not the scores; dropout acts on the probabilities, which only JAX's
    own differentiation of the written-out form (``explicit_attention``) sees.
    """
    if dropout.rate == 0.0 or dropout.deterministic is True:
        return _over_groups(lean_backward.attention, q_btnh, k_bsmh, v_bsmh, mask_bts)
    return explicit_attention(q_btnh, k_bsmh, v_bsmh, mask_bts, dropout=dropout)


def explicit_attention(
    q_btnh: Array,
    k_bsmh: Array,
    v_bsmh: Array,
    mask_bts: Array,
    *,
    dropout: nnx.Dropout,
) -> Array:
    """``dot_product_attention`` written out for JAX to differentiate, with ``dropout``
    on the probabilities."""

    def attend(q_btmgh: Array, k_bsmh: Array, v_bsmh: Array, mask_bts: Array) -> Array:
        probs_bmgts = lean_backward.attention_probs(q_btmgh, k_bsmh, mask_bts).astype(v_bsmh.dtype)
        return jnp.einsum("bmgts,bsmh->btmgh", dropout(probs_bmgts), v_bsmh)

    return _over_groups(attend, q_btnh, k_bsmh, v_bsmh, mask_bts)


def _over_groups(attend: Callable[..., Array], q_btnh: Array, k_bsmh: Array, v_bsmh: Array, mask_bts: Array) -> Array:
    """``attend`` on the queries grouped by key/value head, (batch, t, m, g, h): the
    grouping is an einsum axis rather than a repeat, so no copy of the keys is made."""
    batch, q_len, num_heads, head_dim = q_btnh.shape
    num_kv_heads = k_bsmh.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(
            f"{num_heads} query heads cannot share {num_kv_heads} key/value heads evenly."
        )
    q_btmgh = q_btnh.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    return attend(q_btmgh, k_bsmh, v_bsmh, mask_bts).reshape(batch, q_len, num_heads, head_dim)


def as_bool_mask(mask: Array | None, shape: tuple[int, int]) -> Array:
    """A caller's 0/1 (or bool) attention mask as bool; all True when absent."""
    if mask is None:
        return jnp.ones(shape, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, expected {shape}.")
    return mask.astype(bool)


def run_layers(
    layers: nnx.List,
    x_btd: Array,
    *args: Array,
    remat: bool,
) -> Array:
    """Applies each layer in turn, rematerialising its activations if asked.

    ``nnx.remat`` is applied per layer so the backward pass keeps only layer
    inputs, trading one extra forward per layer for activation memory.
    ``graph_updates=False`` because the layers do not change their graph
    structure; Variable values (dropout RNG counters) still propagate, and
    unchanged Variables are not written back, so a model merged inside a
    JAX transform from outer-level state works with remat exactly as it
    does without (the default would rewrite every Variable, which NNX
    forbids across trace levels).
    """

    def apply(layer: nnx.Module, x: Array, *layer_args: Array) -> Array:
        return layer(x, *layer_args)

    if remat:
        apply = nnx.remat(apply, graph_updates=False)
    for layer in layers:
        x_btd = apply(layer, x_btd, *args)
    return x_btd


def num_prepended(x_btd: Array, input_len: int) -> int:
    """How many positions an ``InputEmbeddings`` point put in front (static)."""
    extra = x_btd.shape[1] - input_len
    if extra < 0:
        raise ValueError(
            f"An InputEmbeddings point returned {x_btd.shape[1]} positions for "
            f"{input_len} inputs; points may only prepend positions."
        )
    return extra


def shift_positions(position_ids_bt: Array, extra: int, *, first: int = 0) -> Array:
    """Positions for a sequence with ``extra`` prepended entries.

    The prepended entries take positions ``first .. first + extra - 1`` and
    the caller's positions move up by ``extra``, so the sequence reads as if
    the extra entries had been part of the input.
    """
    if extra == 0:
        return position_ids_bt
    batch = position_ids_bt.shape[0]
    prefix_bt = first + jnp.arange(extra, dtype=position_ids_bt.dtype)
    prefix_bt = jnp.broadcast_to(prefix_bt, (batch, extra))
    return jnp.concatenate([prefix_bt, position_ids_bt + extra], axis=1)


# --------------------------------------------------------------------------
# Plumbing the model families share.
# --------------------------------------------------------------------------


class Encoder(nnx.Module):
    """A stack of ``config.num_hidden_layers`` blocks (``encoder.layer.N``), run in turn."""

    def __init__(self, config: Any, block: Callable[..., nnx.Module], *, dtype, param_dtype, rngs: nnx.Rngs):
        self.remat = config.remat
        self.layer = nnx.List(
            [block(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )

    def __call__(self, x_btd: Array, mask_bt: Array) -> Array:
        return run_layers(self.layer, x_btd, mask_bt, remat=self.remat)


class Pooler(nnx.Module):
    """``act(dense(first token))``: BERT's pooled output (tanh, hidden size) and ViT's."""

    def __init__(self, config: Any, dout: int, act: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dense = linear(config, config.hidden_size, dout, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = act

    def __call__(self, x_btd: Array) -> Array:
        return activation(self.act)(self.dense(x_btd[:, 0]))


class ModelWithHead(nnx.Module):
    """A family's base model at ``config.base_model_prefix`` and a task head on its output.

    Subclasses name the base model's class, build their head in ``_init_head``
    (after the base model, so a random initialisation draws in the same order
    as before this class existed) and compute logits in their family's
    ``__call__``, whose arguments are the family's inputs.
    """

    base_model_class: ClassVar[type[nnx.Module]]

    def __init__(self, config: Any, *, dtype: Any = jnp.float32, param_dtype: Any = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        base = self.base_model_class(config, **self._base_options(config), **kwargs)
        setattr(self, config.base_model_prefix, base)
        self._init_head(config, **kwargs)

    def _base_options(self, config: Any) -> dict[str, Any]:
        """The base model's keyword arguments beyond dtypes and rngs (``add_pooling_layer``)."""
        return {}

    def _init_head(self, config: Any, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        raise NotImplementedError

    @property
    def base_model(self) -> nnx.Module:
        return getattr(self, self.config.base_model_prefix)

    def get_input_embeddings(self) -> nnx.Embed | None:
        return self.base_model.get_input_embeddings()
