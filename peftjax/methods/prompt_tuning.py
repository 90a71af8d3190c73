"""Prompt tuning (Lester et al. 2021): trainable virtual tokens before the input.

N virtual-token embeddings P (N x d) are prepended to the token embeddings
X (T x d) of every example, and the attention mask is extended with ones:

    X' = [P; X],   mask' = [1 ... 1; mask]

The model then runs unchanged on N + T positions; only P trains (N d
parameters). The ``InputEmbeddings`` insertion point carries this out. The
reference models compute what transformers computes on HF PEFT's prompted
``inputs_embeds`` (tests compare MiniLM classifier logits and tiny-Llama
logits with HF PEFT's): the virtual tokens take positions 0 .. N-1, and
BERT's pooler and RoBERTa's classifier read position 0, the first virtual
token, not [CLS]. Some outputs differ on purpose: token-level outputs drop
the N virtual positions, so they stay aligned with the caller's tokens;
Llama's sequence classifier reads the last real token at N + its index where
transformers reads the last position whatever the padding (and warns), so
the two agree on rows without padding; and RoBERTa numbers positions past
padding as it does for token ids, where transformers given embeddings counts
every position, so the two agree on right-padded batches.

Initialisation (``init``):

* ``"text"``: the embeddings of ``init_text_ids`` in the model's token table,
  the ids repeated and truncated to N as HF PEFT does (Lester et al. start
  from real vocabulary embeddings, which trains best);
* ``"random"``: normal with mean 0 and standard deviation ``init_std``,
  by default the standard deviation of the model's token embedding table, so
  the virtual tokens start at the scale of real ones. (Lester et al. draw
  uniform on [-0.5, 0.5], a scale that suits T5's embeddings; HF PEFT draws
  torch's N(0, 1). Both are far from the ~0.05 of a BERT table.) A model
  without a table (ViT) uses ``model.config.initializer_range``.

The virtual tokens change the model's output from the start (no identity at
init) and have no merged form.

HF PEFT's format: ``peft_type`` PROMPT_TUNING, P as ``prompt_embeddings``
(N, d), and the model's sizes (``num_layers``, ``token_dim``,
``num_attention_heads``), which loading checks. The initialisation is not
carried across (the file holds the trained prompt): peftjax writes
``prompt_tuning_init="RANDOM"``, so loading in PyTorch needs no tokenizer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.errors import PeftError
from peftjax.methods.base import AdapterWrapper, MethodConfig, Slot, register_method
from peftjax.points import InputEmbeddings
from peftjax.variables import AdapterParam

DEFAULT_TARGETS = ("input_embeddings",)


class PromptEmbeddings(AdapterParam):
    """The virtual tokens P, shaped (N, d)."""


def repeat_to_length(ids: Sequence[int], length: int) -> tuple[int, ...]:
    """``ids`` repeated and truncated to ``length`` (HF PEFT's text initialisation)."""
    return tuple(ids[i % len(ids)] for i in range(length))


def _token_table(model: nnx.Module) -> nnx.Embed | None:
    get = getattr(model, "get_input_embeddings", None)
    return get() if callable(get) else None


@register_method("prompt_tuning")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptTuningConfig(MethodConfig):
    """Trainable virtual tokens on the model's ``InputEmbeddings`` point.

    Attributes:
      num_virtual_tokens: N.
      init: ``"random"`` or ``"text"`` (see the module doc).
      init_text_ids: token ids whose embeddings start the prompt (``"text"``).
      init_std: standard deviation of the ``"random"`` start; None = the
        token table's own.
      targets: defaults to ``["input_embeddings"]``.
    """

    target_types = (InputEmbeddings,)
    hf_peft_type = "PROMPT_TUNING"
    hf_prompt_learning = True

    num_virtual_tokens: int = 20
    init: Literal["random", "text"] = "random"
    init_text_ids: tuple[int, ...] = ()
    init_std: float | None = None

    def __post_init__(self):
        if self.targets is None:
            self._set("targets", DEFAULT_TARGETS)
        super().__post_init__()
        self._set("init_text_ids", tuple(self.init_text_ids))
        self.check(
            isinstance(self.num_virtual_tokens, int) and self.num_virtual_tokens > 0,
            "num_virtual_tokens",
            "must be a positive integer",
        )
        self.check(self.init in ("random", "text"), "init", "must be 'random' or 'text'")
        self.check(
            all(isinstance(i, int) and i >= 0 for i in self.init_text_ids),
            "init_text_ids",
            "must hold non-negative token ids",
        )
        self.check(
            self.init != "text" or bool(self.init_text_ids), "init_text_ids", "must not be empty when init='text'"
        )
        self.check(self.init_std is None or self.init_std > 0, "init_std", "must be > 0 or None")

    def to_hf(self, names):
        return dict(peft_type="PROMPT_TUNING", num_virtual_tokens=self.num_virtual_tokens, prompt_tuning_init="RANDOM")

    @classmethod
    def from_hf(cls, fields, names, **common):
        for start in ("prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path", "tokenizer_kwargs"):
            fields.pop(start, None)  # how the prompt started; the file holds its trained value
        return cls(num_virtual_tokens=fields.pop("num_virtual_tokens"), **common)

    @classmethod
    def hf_model_fields(cls, model):
        config = getattr(model, "config", None)
        if not all(hasattr(config, k) for k in ("num_hidden_layers", "hidden_size", "num_attention_heads")):
            raise PeftError(f"HF PEFT's prompt tuning reads num_hidden_layers, hidden_size and num_attention_heads "
                            f"from model.config, which {type(model).__name__} does not have")
        return dict(num_layers=config.num_hidden_layers, token_dim=config.hidden_size,
                    num_attention_heads=config.num_attention_heads, num_transformer_submodules=1)

    def hf_model_tensors(self, model, adapter_name):
        from peftjax.core.inject import iter_wrappers  # the engine imports the methods package, which imports this file

        (prompt,) = [w.prompt for _, w in iter_wrappers(model) if w.adapter_name == adapter_name]
        return {"prompt_embeddings": Slot.of(prompt, prompt.shape)}

    def wrap(self, module, *, adapter_name, rngs):
        raise PeftError("PromptTuningConfig starts from the model's embeddings: apply it with peftjax.apply")

    def initial_prompt(self, model: nnx.Module, key: jax.Array) -> jax.Array:
        """P at initialisation, (N, d) float32, from ``model``'s token table or config."""
        table = _token_table(model)
        if self.init == "text":
            if table is None:
                raise PeftError(
                    f"PromptTuningConfig(init='text') reads the token embeddings, and {type(model).__name__} has "
                    "none (get_input_embeddings() gives None); use init='random'"
                )
            too_big = [i for i in self.init_text_ids if i >= table.num_embeddings]
            if too_big:
                raise PeftError(
                    f"PromptTuningConfig.init_text_ids {too_big} are outside the vocabulary of "
                    f"{table.num_embeddings} tokens"
                )
            ids = jnp.asarray(repeat_to_length(self.init_text_ids, self.num_virtual_tokens))
            return table.embedding[...][ids].astype(jnp.float32)
        if table is not None:
            width = table.features
            std = self.init_std or jnp.std(table.embedding[...].astype(jnp.float32))
        else:
            config = getattr(model, "config", None)
            width = getattr(config, "hidden_size", None)
            if not isinstance(width, int):
                raise PeftError(
                    f"PromptTuningConfig needs the embedding width: {type(model).__name__} has neither "
                    "get_input_embeddings() nor config.hidden_size"
                )
            std = self.init_std or getattr(config, "initializer_range", 0.02)
        return std * jax.random.normal(key, (self.num_virtual_tokens, width), jnp.float32)

    def wrap_all(
        self, modules: Sequence[nnx.Module], *, model: nnx.Module, adapter_name: str, rngs: nnx.Rngs
    ) -> list[AdapterWrapper]:
        return [
            PromptTuning(module, self.initial_prompt(model, rngs.params()), adapter_name=adapter_name)
            for module in modules
        ]


class PromptTuning(AdapterWrapper):
    """An ``InputEmbeddings`` point that prepends the virtual tokens."""

    def __init__(self, base: nnx.Module, prompt_nd: jax.Array, *, adapter_name: str):
        super().__init__(base, adapter_name=adapter_name)
        self.prompt = PromptEmbeddings(prompt_nd)

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    def __call__(self, x_btd: jax.Array, mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
        x_btd, mask_bt = self.base(x_btd, mask_bt)
        if not self.adds_output:
            return x_btd, mask_bt
        batch, n = x_btd.shape[0], self.num_virtual_tokens
        prompt_bnd = jnp.broadcast_to(self.prompt[...].astype(x_btd.dtype), (batch, n, x_btd.shape[-1]))
        ones_bn = jnp.ones((batch, n), mask_bt.dtype)
        return jnp.concatenate([prompt_bnd, x_btd], axis=1), jnp.concatenate([ones_bn, mask_bt], axis=1)
