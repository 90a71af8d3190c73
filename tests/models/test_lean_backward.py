"""``peftjax.models.lean_backward``: the same functions as JAX differentiates them, with less saved.

* values and gradients equal JAX's own differentiation of the plain forms
  (``jax.nn.gelu``, ``nnx.LayerNorm``/``nnx.RMSNorm``; attention, and whole models on
  padded batches, in ``test_attention_path.py``) within float32 rounding (the norms also
  against float64), on inputs far into the GELU's tails and rows of unequal offset and
  scale, in float32 and bfloat16 compute;
* what each saves for the backward pass (a trace, no compilation): the GELU its
  input, a norm its input and two per-row statistics, attention one float32
  probability per score;
* on a compiled bert-tiny LoRA step, XLA plans at most 85% of the temporary bytes and counts no
  more FLOPs than with JAX's differentiation of all three.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peftjax
from peftjax import LoraConfig
from peftjax.models import from_config, lean_backward
from peftjax.train.runner import loss_and_stats

saved_residuals = pytest.importorskip("jax._src.ad_checkpoint").saved_residuals

FP32 = dict(rtol=2e-6, atol=2e-6)


def inputs(shape, seed, scale=3.0):  # peaked attention rows, GELU inputs far into both tails
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


def test_gelu_values_and_gradient():
    x = jnp.concatenate([jnp.linspace(-12.0, 12.0, 1001), inputs((999,), 0)])
    reference = functools.partial(jax.nn.gelu, approximate=False)
    grad = {f: jax.jit(jax.grad(lambda x, f=f: f(x).astype(jnp.float32).sum())) for f in (lean_backward.gelu, reference)}
    np.testing.assert_array_equal(jax.jit(lean_backward.gelu)(x), jax.jit(reference)(x))
    np.testing.assert_allclose(grad[lean_backward.gelu](x), grad[reference](x), **FP32)
    # bfloat16 compute: the same dtype out, within bfloat16 rounding of JAX's own.
    ours, theirs = (grad[f](x.astype(jnp.bfloat16)) for f in (lean_backward.gelu, reference))
    assert ours.dtype == theirs.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32), rtol=1e-2, atol=1e-2)


NORMS = {"layer": (nnx.LayerNorm, lean_backward.LayerNorm), "rms": (nnx.RMSNorm, lean_backward.RMSNorm)}


def norm_value_and_grads(cls, dtype, x, cotangent):
    kwargs = dict(use_fast_variance=False) if issubclass(cls, nnx.LayerNorm) else {}
    norm = cls(x.shape[-1], dtype=dtype, param_dtype=x.dtype if dtype == jnp.float64 else jnp.float32,
               rngs=nnx.Rngs(0), **kwargs)  # fmt: skip
    graphdef, params = nnx.split(norm)
    # a scale and bias away from 1 and 0
    params = jax.tree.map(lambda p: p + np.random.default_rng(3).standard_normal(p.shape).astype(p.dtype) / 2, params)

    @jax.jit  # one compilation, rather than one per operation
    def value_and_grads(params, x, cotangent):
        out, vjp = jax.vjp(lambda params, x: nnx.merge(graphdef, params)(x), params, x)
        return out, vjp(cotangent.astype(out.dtype))

    out, grads = value_and_grads(params, x.astype(dtype), jnp.asarray(cotangent, x.dtype))
    return [np.asarray(a, np.float64) for a in (out, *jax.tree.leaves(grads))]


@pytest.mark.parametrize("kind", NORMS)
def test_norm_values_and_gradients(kind):
    # Rows of very different offsets and scales, as in a residual stream.
    rows = np.linspace(0.1, 30.0, 15).reshape(3, 5, 1)
    x = np.random.default_rng(1).standard_normal((3, 5, 48)) * rows + np.linspace(-5, 5, 15).reshape(3, 5, 1)
    x = x.astype(np.float32)  # the float64 reference sees the same inputs
    cotangent = np.random.default_rng(2).standard_normal(x.shape)
    plain, lean = (norm_value_and_grads(cls, jnp.float32, jnp.asarray(x, jnp.float32), cotangent)
                   for cls in NORMS[kind])  # fmt: skip
    np.testing.assert_array_equal(lean[0], plain[0])
    with jax.enable_x64(True):
        exact = norm_value_and_grads(NORMS[kind][0], jnp.float64, jnp.asarray(x, jnp.float64), cotangent)
    # Both are float32 roundings of the float64 gradients: off by a few ulps of the terms each sums.
    for ours, theirs, truth in zip(lean, plain, exact, strict=True):
        tolerance = dict(rtol=1e-5, atol=1e-6 * np.abs(truth).max())
        np.testing.assert_allclose(ours, truth, **tolerance)
        np.testing.assert_allclose(theirs, truth, **tolerance)
    # bfloat16 compute over float32 parameters: the same dtypes out, values within bfloat16 rounding.
    plain, lean = (norm_value_and_grads(cls, jnp.bfloat16, jnp.asarray(x, jnp.float32), cotangent)
                   for cls in NORMS[kind])  # fmt: skip
    for ours, theirs in zip(lean, plain, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=2e-2, atol=2e-2 * np.abs(theirs).max())


def saved_bytes(f, *args) -> int:
    """What JAX keeps for the backward pass of ``f`` beyond its arguments."""
    return sum(math.prod(aval.shape) * aval.dtype.itemsize for aval, why in saved_residuals(f, *args)
               if not any(stored in why for stored in ("argument", "literal", "constant")))  # fmt: skip


def test_each_keeps_only_what_its_derivative_needs():
    n, d = 64, 32
    x = inputs((n, d), 4)
    reference = functools.partial(jax.nn.gelu, approximate=False)
    # GELU: its input (an argument here, so nothing more); JAX's own keeps erf terms.
    assert saved_bytes(lambda x: lean_backward.gelu(x * 2), x) == 4 * n * d
    assert saved_bytes(lambda x: reference(x * 2), x) > 4 * n * d
    # A norm: its input and two per-row statistics (float32).
    scale, bias = jnp.ones(d), jnp.zeros(d)
    assert saved_bytes(lambda x, s, b: lean_backward.normalize(x * 2, s, b, 1e-6, True), x, scale, bias) == (
        4 * n * d + 2 * 4 * n)
    # Attention: q, k, v and the mask (arguments and a constant here) and one float32 probability per score.
    q, k, v = inputs((2, 8, 2, 2, 16), 5), inputs((2, 8, 2, 16), 6), inputs((2, 8, 2, 16), 7)
    mask = jnp.ones((2, 8, 8), bool)
    probabilities = 4 * 2 * 2 * 2 * 8 * 8
    assert saved_bytes(lambda q, k, v: lean_backward.attention(q, k, v, mask), q, k, v) == probabilities


def lora_step_counts() -> tuple[float, int]:
    model = from_config("bert-tiny", num_labels=2, seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    peftjax.apply(model, LoraConfig(rank=8, alpha=16.0, targets=("query", "value")))
    model.train()
    state = jax.eval_shape(
        lambda: peftjax.TrainState.create(model, peftjax.make_optimizer(model, optax.adamw(1e-4))))
    batch = {name: jax.ShapeDtypeStruct((8, 32), jnp.int32) for name in ("input_ids", "attention_mask")}
    batch["labels"] = jax.ShapeDtypeStruct((8,), jnp.int32)
    loss = loss_and_stats("classification")
    compiled = peftjax.make_train_step(lambda m, b: loss(m, b)).lower(state, batch).compile()
    return float(compiled.cost_analysis()["flops"]), compiled.memory_analysis().temp_size_in_bytes


def test_lora_step_plans_less_memory_and_no_more_flops(differentiated_by_jax):
    lean_flops, lean_temp = lora_step_counts()
    differentiated_by_jax()
    jax_flops, jax_temp = lora_step_counts()
    assert lean_flops <= jax_flops, f"XLA counts {lean_flops:,.0f} FLOPs, {jax_flops:,.0f} with JAX's differentiation"
    assert lean_temp <= 0.85 * jax_temp, f"XLA plans {lean_temp:,} temporary bytes, {jax_temp:,} with JAX's"
