"""Prefix tuning (Li & Liang 2021): trainable keys and values before every attention.

Each attention layer l gets N trainable key and value vectors per key/value
head, P_K^l and P_V^l (N x m x h; m key/value heads of size h), prepended to
the keys and values it computed, with the key mask extended with ones:

    head = softmax(q [P_K^l; K]^T / sqrt(h) + mask) [P_V^l; V]

so every query may attend to the prefix. The ``AttentionKeyValue``
insertion point carries this out, after the key projection and after RoPE in
Llama (so the prefix keys, like HF's ``past_key_values``, are stored
post-rotation and carry no position); the prefix is broadcast over the batch.
Trained directly this is L 2 N m h parameters for L layers (N x 2 kv_dim per
layer, kv_dim = m h).

Positions. HF PEFT feeds the prefixes to transformers as a KV cache of N
positions, so the tokens sit at positions N, N + 1, ...: BERT's absolute
position embeddings and Llama's RoPE count from N, and position ids a caller
passes are shifted by N. The reference models do the same (the wrapper
reports N as ``num_prefix_positions``; see ``peftjax.points``), which a test
checks against HF PEFT's own forward on MiniLM and a tiny Llama. ViT keeps
its patches' positions: they are fixed by the image, and transformers' ViT
takes no KV cache, so HF PEFT has no prefix tuning to compare with.

Reparameterisation (``prefix_projection=True``, Li & Liang section 4.3, HF
PEFT's ``PrefixEncoder``): training the prefixes directly is unstable, so
they are produced by an MLP from a smaller embedding P' (N x d, d = kv_dim
as HF PEFT, which calls it ``token_dim``):

    [P_K^l, P_V^l] = tanh(P' W_1 + b_1) W_2^l + b_2^l,   W_1: d x e,  W_2^l: e x 2 kv_dim

P', W_1 and b_1 are one module shared by every layer's wrapper (an NNX
shared reference: stored and counted once) and W_2^l, b_2^l are the layer's
slice of HF PEFT's output layer, so the count matches HF PEFT's (a test
compares them on a tiny Llama with grouped-query attention):
N d + d e + e + L (2 e kv_dim + 2 kv_dim), e = ``encoder_hidden_size``
(default kv_dim, as HF PEFT). After training, :func:`fold` evaluates the MLP
once and keeps only the resulting prefixes, which leaves the model's output
unchanged and the stored adapter at the directly-trained size, L 2 N kv_dim.

Prefixes are standard normal at initialisation (torch's ``nn.Embedding``
default, as HF PEFT), and MLP kernels and biases uniform on +-1/sqrt(fan_in)
(torch's ``nn.Linear`` default); the same test compares these with HF PEFT's.
The model's output changes from the start; there is no merged form.

HF PEFT's format: ``peft_type`` PREFIX_TUNING, every layer's prefixes in one
``prompt_embeddings`` (N, L 2 kv_dim), each row laid out (layer, key/value,
head, head_dim), as HF PEFT saves them: folded, whether trained with the
projection or not (so the files say ``prefix_projection=false``). HF PEFT
prefixes every layer, so an adapter on some layers only has no HF form.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.errors import PeftError
from peftjax.methods.base import AdapterWrapper, MethodConfig, Slot, register_method
from peftjax.points import AttentionKeyValue
from peftjax.variables import AdapterParam

DEFAULT_TARGETS = ("attention_kv",)
# HF PEFT's SEQ_CLS and TOKEN_CLS classes run prefix tuning only on a model whose forward (or
# its backbone's) names past_key_values; no transformers 5 model here does (peft 0.21, peft_model.py)
_NO_HF_PREFIX = ("ForSequenceClassification", "ForTokenClassification")


class PrefixKeyValue(AdapterParam):
    """Trained prefixes P_K, P_V of one layer, each (N, kv_heads, head_dim)."""


class PrefixEncoderParam(AdapterParam):
    """The reparameterisation's P', W_1, b_1 (shared) and W_2^l, b_2^l (per layer)."""


def _uniform(key: jax.Array, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def attention_shape(model: nnx.Module) -> tuple[int, int]:
    """(key/value heads, head size) from ``model.config``, as HF PEFT reads them."""
    config = getattr(model, "config", None)
    heads = getattr(config, "num_key_value_heads", None) or getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None)
    if not (isinstance(heads, int) and isinstance(head_dim, int)):
        raise PeftError(
            f"prefix tuning sizes its prefixes from model.config (num_key_value_heads or num_attention_heads, "
            f"and head_dim), which {type(model).__name__} does not have (the models in peftjax.models do)"
        )
    return heads, head_dim


@register_method("prefix_tuning")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PrefixTuningConfig(MethodConfig):
    """Trainable key/value prefixes on every ``AttentionKeyValue`` point.

    Attributes:
      num_virtual_tokens: N, the prefix length.
      prefix_projection: produce the prefixes with the shared MLP (train),
        then :func:`fold` it away (inference).
      encoder_hidden_size: e, the MLP's hidden width; None = kv_dim.
      targets: defaults to ``["attention_kv"]``: every attention layer.
    """

    target_types = (AttentionKeyValue,)
    hf_peft_type = "PREFIX_TUNING"
    hf_prompt_learning = True

    num_virtual_tokens: int = 20
    prefix_projection: bool = False
    encoder_hidden_size: int | None = None

    def __post_init__(self):
        if self.targets is None:
            self._set("targets", DEFAULT_TARGETS)
        super().__post_init__()
        self.check(
            isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens > 0,
            "num_virtual_tokens",
            "must be a positive integer",
        )
        self.check(
            self.encoder_hidden_size is None
            or (isinstance(self.encoder_hidden_size, int) and self.encoder_hidden_size > 0),
            "encoder_hidden_size",
            "must be a positive integer or None",
        )

    def to_hf(self, names):
        return dict(peft_type="PREFIX_TUNING", num_virtual_tokens=self.num_virtual_tokens, prefix_projection=False)

    @classmethod
    def from_hf(cls, fields, names, **common):
        for projection in ("prefix_projection", "encoder_hidden_size"):
            fields.pop(projection, None)  # the file holds the prefixes the projection made, as HF PEFT saves them
        return cls(num_virtual_tokens=fields.pop("num_virtual_tokens"), **common)

    @classmethod
    def hf_model_fields(cls, model):
        heads, head_dim = attention_shape(model)
        return dict(num_layers=model.config.num_hidden_layers, token_dim=heads * head_dim, num_attention_heads=heads,
                    num_transformer_submodules=1)

    def hf_model_tensors(self, model, adapter_name):
        from peftjax.core.inject import iter_wrappers  # the engine imports the methods package, which imports this file
        from peftjax.models.registry import hf_architecture

        if type(model).hf_architecture_suffix in _NO_HF_PREFIX:
            raise PeftError(
                f"prefix tuning on {hf_architecture(model)} has no HF PEFT form: HF PEFT's classification task "
                "classes need past_key_values in the forward signature, which transformers 5's models do not "
                "declare; prefix the bare model (task 'base') or save with format='peftjax'"
            )
        found = [(p, w) for p, w in iter_wrappers(model) if w.adapter_name == adapter_name]
        layers = [w for _, w in sorted(found, key=lambda item: [int(k) if k.isdigit() else k
                                                                 for k in item[0].split(".")])]
        if len(layers) != model.config.num_hidden_layers:
            raise PeftError(
                f"prefix tuning on {len(layers)} of {model.config.num_hidden_layers} layers has no HF PEFT form "
                "(HF PEFT prefixes every layer); target every attention layer or save with format='peftjax'"
            )
        heads, head_dim = attention_shape(model)
        shape = (self.num_virtual_tokens, len(layers), 2, heads, head_dim)

        def read() -> np.ndarray:
            stacked = [np.stack([np.asarray(kv) for kv in w.prefixes()], axis=1) for w in layers]  # (N, 2, m, h)
            return np.stack(stacked, axis=1).reshape(shape[0], -1)

        def write(array: np.ndarray) -> None:
            array = array.reshape(shape)
            for index, wrapper in enumerate(layers):
                wrapper.prefix_keys[...] = jnp.asarray(array[:, index, 0], wrapper.prefix_keys.dtype)
                wrapper.prefix_values[...] = jnp.asarray(array[:, index, 1], wrapper.prefix_values.dtype)

        written = tuple(v for w in layers for v in (w.prefix_keys, w.prefix_values) if v is not None)
        return {"prompt_embeddings": Slot((shape[0], math.prod(shape[1:])), read, write, written)}

    def wrap(self, module, *, adapter_name, rngs):
        raise PeftError("PrefixTuningConfig sizes its prefixes from the model: apply it with peftjax.apply")

    def wrap_all(
        self, modules: Sequence[nnx.Module], *, model: nnx.Module, adapter_name: str, rngs: nnx.Rngs
    ) -> list[AdapterWrapper]:
        heads, head_dim = attention_shape(model)
        encoder = None
        if self.prefix_projection:
            width = self.encoder_hidden_size or heads * head_dim
            encoder = SharedPrefixEncoder(self.num_virtual_tokens, heads * head_dim, width, rngs=rngs)
        return [
            PrefixTuning(
                module,
                num_virtual_tokens=self.num_virtual_tokens,
                kv_heads=heads,
                head_dim=head_dim,
                encoder=encoder,
                adapter_name=adapter_name,
                rngs=rngs,
            )
            for module in modules
        ]


class SharedPrefixEncoder(nnx.Module):
    """tanh(P' W_1 + b_1): the part of the reparameterisation every layer shares."""

    def __init__(self, num_virtual_tokens: int, embedding_size: int, hidden_size: int, *, rngs: nnx.Rngs):
        self.embedding = PrefixEncoderParam(jax.random.normal(rngs.params(), (num_virtual_tokens, embedding_size)))
        self.kernel = PrefixEncoderParam(_uniform(rngs.params(), (embedding_size, hidden_size), embedding_size))
        self.bias = PrefixEncoderParam(_uniform(rngs.params(), (hidden_size,), embedding_size))

    @property
    def hidden_size(self) -> int:
        return self.bias.shape[0]

    def __call__(self) -> jax.Array:
        """(N, e) float32."""
        return jnp.tanh(self.embedding[...] @ self.kernel[...] + self.bias[...])


class PrefixTuning(AdapterWrapper):
    """An ``AttentionKeyValue`` point that prepends the layer's key/value prefixes.

    Holds either the prefixes themselves (``prefix_keys``, ``prefix_values``)
    or the shared encoder and this layer's output projection (``out_kernel``
    (e, 2, m, h), ``out_bias`` (2, m, h)); :meth:`fold` turns the second
    form into the first.
    """

    def __init__(
        self,
        base: nnx.Module,
        *,
        num_virtual_tokens: int,
        kv_heads: int,
        head_dim: int,
        encoder: SharedPrefixEncoder | None,
        adapter_name: str,
        rngs: nnx.Rngs,
    ):
        super().__init__(base, adapter_name=adapter_name)
        self.num_virtual_tokens = num_virtual_tokens
        shape = (num_virtual_tokens, kv_heads, head_dim)
        # nnx.data: these hold Variables in one form and None in the other.
        self.encoder = nnx.data(encoder)
        if encoder is None:
            self.prefix_keys = nnx.data(PrefixKeyValue(jax.random.normal(rngs.params(), shape)))
            self.prefix_values = nnx.data(PrefixKeyValue(jax.random.normal(rngs.params(), shape)))
            self.out_kernel = self.out_bias = nnx.data(None)
        else:
            self.prefix_keys = self.prefix_values = nnx.data(None)
            width = encoder.hidden_size
            kernel = _uniform(rngs.params(), (width, 2, kv_heads, head_dim), width)
            self.out_kernel = nnx.data(PrefixEncoderParam(kernel))
            self.out_bias = nnx.data(PrefixEncoderParam(_uniform(rngs.params(), (2, kv_heads, head_dim), width)))

    @property
    def num_prefix_positions(self) -> int:
        """Key positions in front of the tokens': N while the prefix is in use, plus any below."""
        return self.base.num_prefix_positions + (self.num_virtual_tokens if self.adds_output else 0)

    @property
    def projected(self) -> bool:
        """Whether the prefixes come from the (not yet folded) encoder."""
        return self.encoder is not None

    def prefixes(self) -> tuple[jax.Array, jax.Array]:
        """This layer's (P_K, P_V), each (N, kv_heads, head_dim) float32."""
        if not self.projected:
            return self.prefix_keys[...], self.prefix_values[...]
        kv_n2mh = jnp.einsum("ne,ekmh->nkmh", self.encoder(), self.out_kernel[...]) + self.out_bias[...]
        return kv_n2mh[:, 0], kv_n2mh[:, 1]

    def fold(self) -> None:
        """Replace the encoder by the prefixes it produces now (output unchanged)."""
        if not self.projected:
            return
        keys, values = self.prefixes()
        self.prefix_keys, self.prefix_values = nnx.data(PrefixKeyValue(keys)), nnx.data(PrefixKeyValue(values))
        self.encoder = self.out_kernel = self.out_bias = nnx.data(None)

    def __call__(self, k_bsmh: jax.Array, v_bsmh: jax.Array, mask_bs: jax.Array):
        k_bsmh, v_bsmh, mask_bs = self.base(k_bsmh, v_bsmh, mask_bs)
        if not self.adds_output:
            return k_bsmh, v_bsmh, mask_bs
        keys_nmh, values_nmh = self.prefixes()
        batch = k_bsmh.shape[0]
        keys_bnmh = jnp.broadcast_to(keys_nmh.astype(k_bsmh.dtype), (batch, *keys_nmh.shape))
        values_bnmh = jnp.broadcast_to(values_nmh.astype(v_bsmh.dtype), (batch, *values_nmh.shape))
        ones_bn = jnp.ones((batch, keys_nmh.shape[0]), mask_bs.dtype)
        return (
            jnp.concatenate([keys_bnmh, k_bsmh], axis=1),
            jnp.concatenate([values_bnmh, v_bsmh], axis=1),
            jnp.concatenate([ones_bn, mask_bs], axis=1),
        )


def fold(model: nnx.Module) -> nnx.Module:
    """Fold every prefix-tuning reparameterisation of ``model`` away, in place.

    Each layer's prefixes are computed once from the MLP and stored directly;
    the shared encoder and the output projections are dropped, so the stored
    and trainable state shrinks to L 2 N kv_dim per adapter and the forward
    pass skips the MLP. The output is unchanged. The recorded configs become
    ``prefix_projection=False``, so :func:`peftjax.save_adapter` writes the
    folded form and :func:`peftjax.load_adapter` rebuilds it. Models already
    folded, or trained without projection, are returned as they are.

    Raises:
      PeftError: ``model`` has no prefix-tuning adapter.
    """
    # Imported here: the engine imports the methods package, which imports this file.
    from peftjax.core.inject import METHODS_ATTR, applied_methods, iter_wrappers

    prefix_adapters = {name for name, config in applied_methods(model) if isinstance(config, PrefixTuningConfig)}
    if not prefix_adapters:
        raise PeftError("fold() found no prefix-tuning adapter on this model (apply PrefixTuningConfig first)")
    for _, wrapper in iter_wrappers(model):
        if isinstance(wrapper, PrefixTuning):
            wrapper.fold()  # drops this layer's reference only: the others still reach the encoder
    methods = tuple(
        (name, dataclasses.replace(config, prefix_projection=False, encoder_hidden_size=None))
        if name in prefix_adapters
        else (name, config)
        for name, config in applied_methods(model)
    )
    setattr(model, METHODS_ATTR, methods)
    return model
