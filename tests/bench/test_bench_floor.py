"""The memory floor of ``peftjax.bench.floor`` is a floor.

Two witnesses that a step cannot do with less:

* XLA's compiled plan (abstract states: lowering and compilation only) is at least the
  floor. Each case costs a compilation, so the suite checks the methods that between them
  have every kind of floor term, on bert-tiny and llama-tiny (bf16 compute over fp32
  parameters, as the llama benchmarks run), and LoRA on bert-base and llama-1b cut to two
  layers (their widths and vocabulary; the per-layer terms are the same at any depth).
  ``test_bench_xla_counts.py`` checks full-depth bert-base LoRA, whose step it compiles
  anyway. Every method on all four models at full depth is the committed result of
  ``benchmarks/floor_check.py`` (minutes of compilation, beyond the suite's budget).
* What JAX's differentiation saves for the backward pass (``saved_residuals``: a trace,
  no compilation) is at least the floor's activations, for every method on both families.

And the floor's value, written out by hand for LoRA on both families, so that a floor
of nothing cannot pass.
"""

import dataclasses
import math

import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import peftjax
from peftjax.bench import analytic, floor
from peftjax.bench.methods import ALL_METHODS, method_config
from peftjax.bench.suite import BenchSpec, ModelBuilder, build_state
from peftjax.errors import PeftError
from peftjax.models import from_config
from peftjax.models.bert import BertConfig
from peftjax.models.llama import LlamaConfig
from peftjax.train.runner import loss_and_stats

saved_residuals = pytest.importorskip("jax._src.ad_checkpoint").saved_residuals

B, T = 2, 16
# Trained kernels and context (full), x A (LoRA), shared x A and output terms (VeRA), bottleneck terms and a
# lowest layer that keeps part of itself (bottleneck, Houlsby's), keys beyond the queries (prefix_tuning); Llama's SwiGLU, RMSNorm and
# head terms (full, and LoRA on llama-1b's widths). The other methods' terms are combinations of these.
XLA_CASES = (
    [("bert-tiny", "fp32", None, m) for m in ("full", "lora", "vera", "bottleneck", "prefix_tuning")]
    + [("llama-tiny", "bf16", None, "full")]
    + [("bert-base", "fp32", 2, "lora"), ("llama-1b", "bf16", 2, "lora")]
)


def abstract_step(model: str, dtype: str, layers: int | None, method: str):
    builder = ModelBuilder(BenchSpec(model=model, methods=(method,), batch=B, seq=T, dtype=dtype, abstract=True))
    if layers is not None:
        builder.config = dataclasses.replace(builder.config, num_hidden_layers=layers)
    try:
        state = build_state(builder, method_config(method, builder.config.model_type))
    except PeftError as err:  # linear probe and BitFit on Llama: nothing to train
        pytest.skip(str(err))
    return builder, state


@pytest.mark.parametrize("model, dtype, layers, method", XLA_CASES, ids=lambda v: str(v))
def test_xla_plan_is_at_least_the_floor(model, dtype, layers, method):
    builder, state = abstract_step(model, dtype, layers, method)
    batch = builder.batch(concrete=False)
    loss = loss_and_stats(builder.task)
    compiled = peftjax.make_train_step(lambda m, b: loss(m, b)).lower(state, batch).compile()
    plan = analytic.compiled_memory(compiled)
    activations = floor.activation_floor(
        state.model(), state.tx.labels, batch=B, seq=T, compute_dtype=builder.dtype,
        causal_lm=builder.task == "causal_lm",
    )  # fmt: skip
    bound = floor.memory_floor(state, batch, activations["total"])
    assert plan["total"] >= bound["total"], f"XLA {plan} < floor {bound}, activations {activations}"
    assert plan["temp"] >= activations["total"], (plan, activations)
    assert 0 <= plan["argument"] - (bound["total"] - activations["total"]) <= 4  # the step counter


FAMILIES = {
    "bert": BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=128, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0),
    "llama": LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128),
}  # fmt: skip


def lora_state(family: str, dtype, method: str = "lora"):
    causal = family == "llama"
    model = from_config(FAMILIES[family], num_labels=None if causal else 2, dtype=dtype)
    config = method_config(method, family)
    if hasattr(config, "variant"):
        config = dataclasses.replace(config, bottleneck_size=8)
    peftjax.apply(model, config)
    return peftjax.TrainState.create(model, peftjax.make_optimizer(model, optax.adamw(1e-4)))


@pytest.mark.parametrize("family, dtype", [("bert", jnp.float32), ("llama", jnp.bfloat16)], ids=["bert", "llama"])
@pytest.mark.parametrize("method", [m for m in ALL_METHODS if m not in ("lora:rank=4", "lora:rank=16")])
def test_jax_saves_at_least_the_floor(family, method, dtype):
    causal = family == "llama"
    try:
        state = lora_state(family, dtype, method)
    except PeftError as err:
        pytest.skip(str(err))
    batch = {
        "input_ids": jnp.zeros((B, T), jnp.int32),
        "attention_mask": jnp.ones((B, T), jnp.int32),
        "labels": jnp.zeros((B, T) if causal else (B,), jnp.int32),
    }
    loss = loss_and_stats("causal_lm" if causal else "classification")

    def loss_of(trainable, rest):
        return loss(nnx.merge(state.graphdef, trainable, state.frozen, rest), batch)[0]

    def computed(description: str) -> bool:
        # Arguments, literals and references to the frozen kernels are stored, not computed; a cast
        # of a frozen kernel is computed but elementwise in an argument, which the floor never counts.
        return not any(word in description for word in ("argument", "literal", "constant"))

    saved = sum(
        math.prod(aval.shape) * aval.dtype.itemsize
        for aval, description in saved_residuals(loss_of, state.trainable, state.rest)
        if computed(description)
    )
    modelled = floor.activation_floor(
        state.model(), state.tx.labels, batch=B, seq=T, compute_dtype=dtype, causal_lm=causal
    )["total"]
    assert modelled <= saved, f"floor {modelled:,} above what JAX saves, {saved:,}"


def test_the_lora_floor_by_hand():
    """LoRA(q, v, r=8), 3 layers, B=2, T=16: n = 32 tokens, a = B H T T = 2048 attention entries."""
    n, a, r, c = B * T, B * 4 * T * T, 8, 4
    d, f = 64, 128
    # BERT, fp32. Per layer: two LayerNorm inputs and their two statistics, the GELU's input and x A for
    # q and v. Attention: the lowest layer needs k (for dq), v and the probabilities, not q (no dk).
    layer = 2 * (c * n * d + 2 * 4 * n) + c * n * f + 2 * c * n * r
    attention = (2 * c * n * d + c * a) + 2 * (3 * c * n * d + c * a)
    expected = 3 * layer + attention
    assert floor.activation_floor(**_floor_args("bert", jnp.float32))["total"] == expected
    # Llama, bf16 (c = 2), 2 key/value heads of 16. The lowest layer's input norm is below every
    # trained part, so it keeps nothing; SwiGLU keeps the gate's and the up projection's outputs;
    # the head keeps its input and the logits of the 15 predicted positions over 500 tokens.
    c, kv = 2, 32
    norms = (c * n * d + 4 * n) + 2 * 2 * (c * n * d + 4 * n)
    attention = (2 * c * n * kv + c * a) + 2 * (c * n * (d + 2 * kv) + c * a)
    rest = 3 * (2 * c * n * f + 2 * c * n * r) + c * n * d + c * B * (T - 1) * 500
    assert floor.activation_floor(**_floor_args("llama", jnp.bfloat16))["total"] == norms + attention + rest


def _floor_args(family: str, dtype) -> dict:
    state = lora_state(family, dtype)
    return dict(model=state.model(), labels=state.tx.labels, batch=B, seq=T, compute_dtype=dtype,
                causal_lm=family == "llama")
