"""Without attention dropout the models run ``lean_backward.attention`` (a hand-written
backward pass that keeps the probabilities, not the scores); it must be the function
the explicit path (kept for attention dropout, differentiated by JAX) computes.

Checked on the function (padding, a fully masked row, grouped-query heads, prefix keys
beyond the query length with a causal offset), and through whole models with prefix
tuning and padded batches, values and gradients, against JAX's own differentiation of
every lean backward pass at once (attention, GELU, LayerNorm on bert-tiny; attention,
RMSNorm on llama-tiny); plus: dropout still reaches the probabilities. That XLA counts
no more FLOPs for a LoRA step is in ``test_lean_backward.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peftjax
from peftjax import PrefixTuningConfig
from peftjax.models import common, from_config
from peftjax.train.runner import loss_and_stats

# Both paths do the same float32 operations in the same order; what XLA may still
# reassociate (the softmax sums, the gradient reductions) stays at a few ulps.
TOLERANCE = dict(rtol=2e-6, atol=2e-6)


def random_qkv(batch, q_len, kv_len, heads, kv_heads, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, head_dim)) * 3  # peaked rows: large score spreads
    k = rng.standard_normal((batch, kv_len, kv_heads, head_dim)) * 3
    v = rng.standard_normal((batch, kv_len, kv_heads, head_dim))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


CASES = {
    # batch 0 has every key masked (a padding example): both paths give a uniform row.
    "bidirectional-padding": dict(q_len=6, kv_len=6, heads=4, kv_heads=4, causal=False),
    # 3 prefix keys in front, causal limits offset by them, 2 query heads per key/value head.
    "causal-gqa-prefix": dict(q_len=6, kv_len=9, heads=4, kv_heads=2, causal=True),
}


@pytest.mark.parametrize("case", CASES)
def test_switch_is_the_explicit_path_within_float32_rounding(case):
    shape = CASES[case]
    q, k, v = random_qkv(3, shape["q_len"], shape["kv_len"], shape["heads"], shape["kv_heads"], 8)
    key_mask = jnp.asarray(np.random.default_rng(1).random((3, shape["kv_len"])) > 0.3).at[0].set(False)
    mask = common.attention_mask(key_mask, shape["q_len"], causal=shape["causal"])
    off = nnx.Dropout(0.0, rngs=nnx.Rngs(0))
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.float32)

    def value_and_vjp(attention):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, mask, dropout=off), q, k, v)
        return out, vjp(cotangent)

    fused, fused_grads = jax.jit(lambda: value_and_vjp(common.dot_product_attention))()
    explicit, explicit_grads = jax.jit(lambda: value_and_vjp(common.explicit_attention))()
    np.testing.assert_allclose(fused, explicit, **TOLERANCE)
    groups = shape["heads"] // shape["kv_heads"]
    uniform_nh = jnp.repeat(v[0].mean(0), groups, axis=0)  # every key weighted alike
    np.testing.assert_allclose(fused[0], jnp.broadcast_to(uniform_nh, fused[0].shape), **TOLERANCE)
    for a, b in zip(fused_grads, explicit_grads, strict=True):
        np.testing.assert_allclose(a, b, **TOLERANCE)


def test_attention_dropout_still_acts_on_the_probabilities():
    q, k, v = random_qkv(2, 5, 5, 2, 2, 8)
    mask = common.attention_mask(jnp.ones((2, 5), bool), 5, causal=False)
    on = lambda: nnx.Dropout(0.5, rngs=nnx.Rngs(dropout=3))  # noqa: E731  (the same draws each time)
    dropped = common.dot_product_attention(q, k, v, mask, dropout=on())
    np.testing.assert_array_equal(dropped, common.explicit_attention(q, k, v, mask, dropout=on()))
    undropped = common.dot_product_attention(q, k, v, mask, dropout=nnx.Dropout(0.5, deterministic=True))
    assert float(jnp.abs(dropped - undropped).max()) > 0.1


def prefix_model_grads(preset: str, task: str):
    """Logits and the trainable gradients of a prefix-tuned model on a padded batch."""
    model = from_config(preset, num_labels=2 if task == "classification" else None, seed=0)
    peftjax.apply(model, PrefixTuningConfig(num_virtual_tokens=3))
    model.eval()  # attention dropout off: the fused path
    ids = jax.random.randint(jax.random.key(1), (2, 8), 3, 500)
    batch = {
        "input_ids": ids,
        "attention_mask": jnp.array([[1] * 8, [1] * 5 + [0] * 3], jnp.int32),
        "labels": jnp.array([0, 1]) if task == "classification" else ids,
    }
    loss = loss_and_stats(task)
    state = peftjax.TrainState.create(model, optax.sgd(0.1))

    def loss_of(trainable):
        return loss(nnx.merge(state.graphdef, trainable, state.frozen, state.rest), batch)[0]

    return jax.jit(jax.value_and_grad(loss_of))(state.trainable)


@pytest.mark.parametrize("preset, task", [("bert-tiny", "classification"), ("llama-tiny", "causal_lm")])
def test_models_with_prefix_keys_and_padding_match_jax_differentiation(preset, task, differentiated_by_jax):
    fused = prefix_model_grads(preset, task)
    differentiated_by_jax()
    explicit = prefix_model_grads(preset, task)
    np.testing.assert_allclose(fused[0], explicit[0], **TOLERANCE)
    for a, b in zip(jax.tree.leaves(fused[1]), jax.tree.leaves(explicit[1]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
