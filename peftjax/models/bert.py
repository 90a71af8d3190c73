"""BERT and RoBERTa encoders in Flax NNX, laid out like transformers' modules.

Attribute names follow the Hugging Face checkpoints, so a module's dotted
path is the checkpoint key without its ``.weight`` (for example
``bert.encoder.layer.0.attention.self.query``) and adapter methods can be
targeted with the names users know from PEFT. RoBERTa is the same network
with two differences that ``BertConfig.model_type`` selects: position ids
start after the padding index, and the sequence classifier is a small MLP
(``classifier.dense`` then ``classifier.out_proj``) on the first token.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax.numpy as jnp
from flax import nnx

from peftjax.models import common
from peftjax.models.common import Array, ModelOutput
from peftjax.points import AttentionKeyValue, BranchOutput, InputEmbeddings, prefix_positions

MODEL_TYPES = ("bert", "roberta")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """Hyper-parameters of a BERT or RoBERTa encoder (transformers' field names).

    Frozen (and hashable) because models keep it as static graph data.
    ``remat`` recomputes each layer's activations in the backward pass.
    """

    model_type: str = "bert"
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    classifier_dropout: float | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    num_labels: int = 2
    label_names: tuple[str, ...] = ()
    remat: bool = False

    def __post_init__(self) -> None:
        common.require_choice(self, "model_type", MODEL_TYPES)
        common.require_positive(
            self,
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        )
        common.require_probability(
            self, "hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"
        )
        common.require_choice(self, "hidden_act", common.ACTIVATIONS)
        common.require_labels(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"BertConfig.hidden_size={self.hidden_size} must be divisible by "
                f"num_attention_heads={self.num_attention_heads}."
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(
                f"BertConfig.pad_token_id={self.pad_token_id} must index the vocabulary "
                f"(0 <= id < vocab_size={self.vocab_size})."
            )
        if self.model_type == "roberta" and self.max_position_embeddings <= self.pad_token_id + 1:
            raise ValueError(
                "BertConfig.max_position_embeddings must exceed pad_token_id + 1 for RoBERTa, "
                "whose positions start after the padding index."
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def base_model_prefix(self) -> str:
        """Attribute (and checkpoint prefix) of the encoder inside a head model."""
        return self.model_type

    @property
    def effective_classifier_dropout(self) -> float:
        """transformers falls back to the hidden dropout when none is set."""
        if self.classifier_dropout is None:
            return self.hidden_dropout_prob
        return self.classifier_dropout

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> BertConfig:
        """Builds a config from a transformers ``config.json`` dict."""
        fields = common.known_fields(cls, d)
        fields.pop("label_names", None)
        fields.pop("num_labels", None)
        fields.update(common.labels_from_hf(d))
        if fields.get("pad_token_id") is None:
            fields.pop("pad_token_id", None)
        if isinstance(fields.get("eos_token_id"), list):
            fields["eos_token_id"] = fields["eos_token_id"][0]
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(
                f"position_embedding_type={d['position_embedding_type']!r} is not supported; "
                "peftjax's BERT implements absolute position embeddings only."
            )
        return cls(**fields)

    def to_hf_dict(self) -> dict[str, Any]:
        """The transformers ``config.json`` dict (without ``architectures``)."""
        d = dataclasses.asdict(self)
        for name in ("label_names", "num_labels", "remat"):
            d.pop(name)
        d["position_embedding_type"] = "absolute"
        d.update(common.labels_to_hf(self))
        return d


class BertEmbeddings(nnx.Module):
    """Word + token-type + position embeddings, then LayerNorm and dropout."""

    def __init__(self, config: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.config = config
        init = common.embedding_init(config.initializer_range, config.pad_token_id)
        self.word_embeddings = nnx.Embed(
            config.vocab_size,
            config.hidden_size,
            embedding_init=init,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        position_padding = config.pad_token_id if config.model_type == "roberta" else None
        self.position_embeddings = nnx.Embed(
            config.max_position_embeddings,
            config.hidden_size,
            embedding_init=common.embedding_init(config.initializer_range, position_padding),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.token_type_embeddings = nnx.Embed(
            config.type_vocab_size,
            config.hidden_size,
            embedding_init=common.embedding_init(config.initializer_range, None),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.LayerNorm = common.layer_norm(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)
        self.input_embeddings = InputEmbeddings()

    def _default_positions(self, input_ids_bt: Array, mask_bt: Array, extra: int, start: int) -> Array:
        """Position ids over the (possibly extended) sequence, as transformers builds them
        after a KV cache of ``start`` positions (prefix tuning's prefixes).

        BERT counts start, start + 1, ... RoBERTa (fairseq) counts only
        non-padding tokens, from ``pad_token_id + 1 + start``, and gives
        padding the padding index; prepended positions count as tokens when
        their mask is True.
        """
        batch, seq_len = input_ids_bt.shape
        if self.config.model_type != "roberta":
            return jnp.broadcast_to(jnp.arange(start, start + seq_len + extra), (batch, seq_len + extra))
        pad = self.config.pad_token_id
        present_bt = input_ids_bt != pad
        if extra:
            present_bt = jnp.concatenate([mask_bt[:, :extra], present_bt], axis=1)
        present_bt = present_bt.astype(jnp.int32)
        return (jnp.cumsum(present_bt, axis=1) + start) * present_bt + pad

    def __call__(
        self,
        input_ids_bt: Array,
        mask_bt: Array,
        token_type_ids_bt: Array | None = None,
        position_ids_bt: Array | None = None,
        start: int = 0,
    ) -> tuple[Array, Array]:
        """Returns embeddings (batch, t', hidden) and the mask (batch, t').

        ``start``: key positions the attention layers put before the tokens
        (see ``peftjax.points``), which the tokens' positions follow.
        """
        seq_len = input_ids_bt.shape[1]
        x_btd = self.word_embeddings(input_ids_bt)
        x_btd, mask_bt_new = self.input_embeddings(x_btd, mask_bt)
        extra = common.num_prepended(x_btd, seq_len)

        first = self.config.pad_token_id + 1 if self.config.model_type == "roberta" else 0
        if position_ids_bt is None:
            # The table lookup returns NaN past its end instead of failing: refuse it here.
            last = first + start + seq_len + extra - 1
            if last >= self.config.max_position_embeddings:
                prepended = f" + {extra} prepended (e.g. prompt tuning's virtual tokens)" if extra else ""
                after = f" after {start} prefix positions (prefix tuning)" if start else ""
                raise ValueError(
                    f"{seq_len} tokens{prepended}{after} need position ids up to {last}, but "
                    f"max_position_embeddings={self.config.max_position_embeddings}; shorten the input."
                )
            position_ids_bt = self._default_positions(input_ids_bt, mask_bt_new, extra, start)
        else:
            position_ids_bt = common.shift_positions(position_ids_bt, extra, first=first) + start
        if token_type_ids_bt is None:
            token_type_ids_bt = jnp.zeros(x_btd.shape[:2], dtype=jnp.int32)
        elif extra:
            token_type_ids_bt = jnp.pad(token_type_ids_bt, ((0, 0), (extra, 0)))

        x_btd = x_btd + self.token_type_embeddings(token_type_ids_bt)
        x_btd = x_btd + self.position_embeddings(position_ids_bt)
        x_btd = self.LayerNorm(x_btd)
        return self.dropout(x_btd), mask_bt_new


class BertSelfAttention(nnx.Module):
    """Query/key/value projections and bidirectional scaled dot-product attention.

    ViT's encoder attention is the same module; ``bias`` is its ``qkv_bias``."""

    def __init__(self, config: Any, *, bias: bool = True, dtype, param_dtype, rngs: nnx.Rngs):
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        kwargs = dict(bias=bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = common.linear(config, config.hidden_size, config.hidden_size, **kwargs)
        self.key = common.linear(config, config.hidden_size, config.hidden_size, **kwargs)
        self.value = common.linear(config, config.hidden_size, config.hidden_size, **kwargs)
        self.dropout = nnx.Dropout(config.attention_probs_dropout_prob, rngs=rngs)
        self.attention_kv = AttentionKeyValue()

    def __call__(self, x_btd: Array, mask_bt: Array) -> Array:
        batch, seq_len, _ = x_btd.shape
        heads = (batch, seq_len, self.num_heads, self.head_dim)
        q_btnh = self.query(x_btd).reshape(heads)
        k_bsnh = self.key(x_btd).reshape(heads)
        v_bsnh = self.value(x_btd).reshape(heads)
        k_bsnh, v_bsnh, mask_bs = self.attention_kv(k_bsnh, v_bsnh, mask_bt)
        mask_bts = common.attention_mask(mask_bs, seq_len, causal=False)
        out_btnh = common.dot_product_attention(
            q_btnh, k_bsnh, v_bsnh, mask_bts, dropout=self.dropout
        )
        return out_btnh.reshape(batch, seq_len, -1)


class BertOutput(nnx.Module):
    """A block's projection back to the hidden size, then the residual LayerNorm (post-LN).

    The same module closes both halves of a layer: ``attention.output`` projects
    the attention heads (``din`` = hidden size), ``output`` the MLP's hidden
    units (``din`` = intermediate size).
    """

    def __init__(self, config: BertConfig, din: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense = common.linear(config, din, config.hidden_size, **kwargs)
        self.LayerNorm = common.layer_norm(config, **kwargs)
        self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

    def __call__(self, out_btf: Array, in_btd: Array, point: BranchOutput) -> Array:
        """``point`` sees the branch output after dropout, before ``LayerNorm(x + out)``."""
        out_btd = self.dropout(self.dense(out_btf))
        out_btd = point(out_btd, in_btd, self.LayerNorm)
        return self.LayerNorm(out_btd + in_btd)


class BertAttention(nnx.Module):
    """``self`` (attention proper) and ``output`` (projection + residual norm)."""

    def __init__(self, config: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self = BertSelfAttention(config, **kwargs)
        self.output = BertOutput(config, config.hidden_size, **kwargs)


class BertIntermediate(nnx.Module):
    """First MLP projection and its activation (ViT's MLP starts with the same module)."""

    def __init__(self, config: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dense = common.linear(
            config,
            config.hidden_size,
            config.intermediate_size,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.hidden_act = config.hidden_act

    def __call__(self, x_btd: Array) -> Array:
        return common.activation(self.hidden_act)(self.dense(x_btd))


class BertLayer(nnx.Module):
    """One post-LN transformer block with its two ``BranchOutput`` points.

    The points belong to the layer (``...layer.N.after_attention`` and
    ``...layer.N.after_mlp``) so every model family exposes them at the same
    place; the sub-modules that own the residual add receive them as
    arguments.
    """

    def __init__(self, config: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attention = BertAttention(config, **kwargs)
        self.intermediate = BertIntermediate(config, **kwargs)
        self.output = BertOutput(config, config.intermediate_size, **kwargs)
        self.after_attention = BranchOutput()
        self.after_mlp = BranchOutput()

    def __call__(self, x_btd: Array, mask_bt: Array) -> Array:
        attn_btd = self.attention.self(x_btd, mask_bt)
        x_btd = self.attention.output(attn_btd, x_btd, self.after_attention)
        h_btf = self.intermediate(x_btd)
        return self.output(h_btf, x_btd, self.after_mlp)


class BertModel(nnx.Module):
    """The bare encoder: ``embeddings``, ``encoder`` and an optional ``pooler``.

    Call with ``input_ids`` (batch, seq) and optionally ``attention_mask``
    (1 = token, 0 = padding), ``token_type_ids`` and ``position_ids``.
    Dropout is active until ``model.eval()`` (``from_pretrained`` returns the
    model in eval mode, as transformers does).
    """

    output_head_names: ClassVar[tuple[str, ...]] = ()
    hf_architecture_suffix: ClassVar[str] = "Model"

    def __init__(
        self,
        config: BertConfig,
        *,
        add_pooling_layer: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = config
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = BertEmbeddings(config, **kwargs)
        self.encoder = common.Encoder(config, BertLayer, **kwargs)
        # tanh(dense(first token)): the pooled output BERT's classifier reads.
        self.pooler = common.Pooler(config, config.hidden_size, "tanh", **kwargs) if add_pooling_layer else None

    def get_input_embeddings(self) -> nnx.Embed:
        return self.embeddings.word_embeddings

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
    ) -> ModelOutput:
        x_btd, extra = self.encode(input_ids, attention_mask, token_type_ids, position_ids)
        # The pooler reads position 0 of the whole sequence: under prompt tuning the first
        # virtual token, not [CLS], as transformers does on HF PEFT's prompted inputs_embeds.
        pooled_bd = self.pooler(x_btd) if self.pooler is not None else None
        return ModelOutput(last_hidden_state=x_btd[:, extra:], pooler_output=pooled_bd)

    def encode(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
    ) -> tuple[Array, int]:
        """The final hidden states over the whole sequence, positions an
        ``InputEmbeddings`` point prepended included, and how many those are."""
        mask_bt = common.as_bool_mask(attention_mask, input_ids.shape)
        start = prefix_positions(layer.attention.self.attention_kv for layer in self.encoder.layer)
        x_btd, mask_bt = self.embeddings(input_ids, mask_bt, token_type_ids, position_ids, start)
        return self.encoder(x_btd, mask_bt), common.num_prepended(x_btd, input_ids.shape[1])


class RobertaClassificationHead(nnx.Module):
    """RoBERTa's sentence classifier: dropout, dense, tanh, dropout, out_proj."""

    def __init__(self, config: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dense = common.linear(config, config.hidden_size, config.hidden_size, **kwargs)
        self.dropout = nnx.Dropout(config.effective_classifier_dropout, rngs=rngs)
        self.out_proj = common.linear(config, config.hidden_size, config.num_labels, **kwargs)

    def __call__(self, x_btd: Array) -> Array:
        x_bd = self.dropout(x_btd[:, 0])
        x_bd = jnp.tanh(self.dense(x_bd))
        return self.out_proj(self.dropout(x_bd))


class _BertWithHead(common.ModelWithHead):
    """The encoder under ``bert`` or ``roberta``, a head on its output."""

    base_model_class: ClassVar[type[nnx.Module]] = BertModel
    output_head_names: ClassVar[tuple[str, ...]] = ("classifier",)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
    ) -> ModelOutput:
        out = self.base_model(input_ids, attention_mask, token_type_ids, position_ids)
        return out.replace(logits=self._logits(out))

    def _logits(self, out: ModelOutput) -> Array:
        raise NotImplementedError


class BertForSequenceClassification(_BertWithHead):
    """Encoder plus a sentence classifier (``logits``: (batch, num_labels)).

    BERT classifies the pooler output; RoBERTa has no pooler here and uses
    ``RobertaClassificationHead`` on the first token, as transformers does.
    """

    hf_architecture_suffix: ClassVar[str] = "ForSequenceClassification"

    def _base_options(self, config: BertConfig) -> dict[str, Any]:
        return {"add_pooling_layer": config.model_type != "roberta"}

    def _init_head(self, config: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        kwargs = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if config.model_type == "roberta":
            self.dropout = None
            self.classifier = RobertaClassificationHead(config, **kwargs)
        else:
            self.dropout = nnx.Dropout(config.effective_classifier_dropout, rngs=rngs)
            self.classifier = common.linear(config, config.hidden_size, config.num_labels, **kwargs)

    def __call__(
        self,
        input_ids: Array,
        attention_mask: Array | None = None,
        token_type_ids: Array | None = None,
        position_ids: Array | None = None,
    ) -> ModelOutput:
        if self.dropout is None:
            # RoBERTa's head reads position 0 of the whole sequence (see BertModel.__call__).
            x_btd, extra = self.base_model.encode(input_ids, attention_mask, token_type_ids, position_ids)
            return ModelOutput(last_hidden_state=x_btd[:, extra:], logits=self.classifier(x_btd))
        return super().__call__(input_ids, attention_mask, token_type_ids, position_ids)

    def _logits(self, out: ModelOutput) -> Array:
        return self.classifier(self.dropout(out.pooler_output))


class BertForTokenClassification(_BertWithHead):
    """Encoder plus a per-token classifier (``logits``: (batch, seq, num_labels))."""

    hf_architecture_suffix: ClassVar[str] = "ForTokenClassification"

    def _base_options(self, config: BertConfig) -> dict[str, Any]:
        return {"add_pooling_layer": False}

    def _init_head(self, config: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs) -> None:
        self.dropout = nnx.Dropout(config.effective_classifier_dropout, rngs=rngs)
        self.classifier = common.linear(
            config, config.hidden_size, config.num_labels, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def _logits(self, out: ModelOutput) -> Array:
        return self.classifier(self.dropout(out.last_hidden_state))


__all__ = [
    "BertConfig",
    "BertModel",
    "BertForSequenceClassification",
    "BertForTokenClassification",
    "RobertaClassificationHead",
]
