"""DoRA: magnitude initialisation, the forward formula, the stop-gradient norm
against a closed-form gradient, and merge/unmerge exactness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peftjax
from peftjax import DoraConfig, PeftError
from peftjax.methods.dora import DoraLinear, DoraMagnitude
from peftjax.methods.lora import LoraLinear

SCALE = 2.0  # alpha / r below


class One(nnx.Module):
    def __init__(self, layer):
        self.proj = layer

    def __call__(self, x):
        return self.proj(x)


def dora_layer(seed=0, d_in=12, d_out=10, rank=3):
    """A DoRA-wrapped Linear with non-zero B and a magnitude away from its init."""
    model = One(nnx.Linear(d_in, d_out, rngs=nnx.Rngs(seed)))
    model.proj.bias[...] = jax.random.normal(jax.random.key(seed + 1), (d_out,))
    peftjax.apply(model, DoraConfig(rank=rank, alpha=SCALE * rank, targets=["proj"]))
    layer = model.proj
    layer.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(seed + 2), layer.lora_b.shape)
    layer.magnitude[...] = layer.magnitude[...] * (1 + 0.2 * jax.random.normal(jax.random.key(seed + 3), (d_out,)))
    return model, layer


def test_magnitude_starts_at_the_column_norms_and_is_its_own_param_type():
    model = One(nnx.Linear(12, 10, rngs=nnx.Rngs(0)))
    kernel = np.asarray(model.proj.kernel[...])  # (in, out): one column per output unit
    peftjax.apply(model, DoraConfig(rank=3, targets=["proj"]))
    assert isinstance(model.proj, DoraLinear) and isinstance(model.proj, LoraLinear)
    assert type(model.proj.magnitude) is DoraMagnitude
    np.testing.assert_allclose(model.proj.magnitude[...], np.linalg.norm(kernel, axis=0), rtol=1e-6)


def test_forward_is_the_formula():
    _, layer = dora_layer()
    w, b = layer.base.kernel[...], layer.base.bias[...]
    a, bb, m = layer.lora_a[...], layer.lora_b[...], layer.magnitude[...]
    x = jax.random.normal(jax.random.key(9), (4, 12))
    adapted = w + SCALE * a @ bb
    expected = x @ (m * adapted / jnp.linalg.norm(adapted, axis=0)) + b
    np.testing.assert_allclose(layer(x), expected, atol=1e-5)


def test_gradient_treats_the_norm_as_a_constant():
    """With n = ||W + s A B||_c held constant, y = (x V) * m / n + b, V = W + s A B, and for
    L = sum(y * T): dL/dm = sum_batch(T * xV) / n, dL/dV = x^T (T * m / n),
    dL/dB = s A^T dL/dV, dL/dA = s dL/dV B^T."""
    model, layer = dora_layer()
    x = jax.random.normal(jax.random.key(4), (6, 12))
    target = jax.random.normal(jax.random.key(5), (6, 10))

    graphdef, params, rest = nnx.split(model, peftjax.AdapterParam, ...)

    def loss_of(params):
        return jnp.sum(nnx.merge(graphdef, params, rest)(x) * target)

    grads = jax.grad(loss_of)(params)
    w = layer.base.kernel[...]
    a, bb, m = layer.lora_a[...], layer.lora_b[...], layer.magnitude[...]
    v = w + SCALE * a @ bb
    n = jnp.linalg.norm(v, axis=0)
    d_m = jnp.sum(target * (x @ v), axis=0) / n
    d_v = x.T @ (target * m / n)
    np.testing.assert_allclose(grads["proj"]["magnitude"][...], d_m, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["proj"]["lora_b"][...], SCALE * a.T @ d_v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grads["proj"]["lora_a"][...], SCALE * d_v @ bb.T, rtol=1e-5, atol=1e-5)

    # Differentiating through the norm gives a different B gradient: the stop-gradient matters.
    def through_norm(b_matrix):
        v = w + SCALE * a @ b_matrix
        return jnp.sum((x @ v * m / jnp.linalg.norm(v, axis=0)) * target)

    assert not np.allclose(jax.grad(through_norm)(bb), grads["proj"]["lora_b"][...], atol=1e-3)


def test_merge_matches_and_unmerge_restores_the_kernel():
    model, layer = dora_layer(d_in=32, d_out=24, rank=4)
    x = jax.random.normal(jax.random.key(7), (3, 32))
    kernel = np.asarray(layer.base.kernel[...])
    unmerged = model(x)
    peftjax.merge(model)
    merged_kernel = np.asarray(layer.base.kernel[...])
    np.testing.assert_allclose(np.linalg.norm(merged_kernel, axis=0), layer.magnitude[...], rtol=1e-5)
    np.testing.assert_allclose(model(x), unmerged, atol=1e-5)
    peftjax.unmerge(model)
    np.testing.assert_allclose(layer.base.kernel[...], kernel, atol=1e-6, rtol=0)
    np.testing.assert_allclose(model(x), unmerged, atol=1e-5)


def test_einsum_layer_merge_and_formula():
    model = One(nnx.Einsum("btd,dnh->btnh", (8, 2, 3), (2, 3), rngs=nnx.Rngs(0)))
    model.proj.bias[...] = jax.random.normal(jax.random.key(1), (2, 3))
    peftjax.apply(model, DoraConfig(rank=2, targets=["proj"]))
    layer = model.proj
    assert layer.magnitude.shape == (2, 3)
    layer.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(2), layer.lora_b.shape)
    x = jax.random.normal(jax.random.key(3), (2, 5, 8))
    w = layer.base.kernel[...]
    v = w + layer.scale * jnp.einsum("dz,znh->dnh", layer.lora_a[...], layer.lora_b[...])
    expected = (
        jnp.einsum("btd,dnh->btnh", x, layer.magnitude[...] * v / jnp.linalg.norm(v, axis=0)) + layer.base.bias[...]
    )
    np.testing.assert_allclose(model(x), expected, atol=1e-5)
    peftjax.merge(model)
    np.testing.assert_allclose(model(x), expected, atol=1e-5)
    peftjax.unmerge(model)
    np.testing.assert_allclose(layer.base.kernel[...], w, atol=1e-6, rtol=0)


def test_zero_magnitude_refuses_to_merge():
    model, layer = dora_layer()
    layer.magnitude[...] = layer.magnitude[...].at[0].set(0.0)
    with pytest.raises(PeftError, match="zero magnitude"):
        peftjax.merge(model)
    assert not layer.merged


def test_dora_must_be_the_first_adapter_on_a_module(toy, unchanged):
    """Stacked on another adapter, DoRA's merge would normalise a kernel that
    already holds the other adapter's update: refused. On top of DoRA is fine."""
    peftjax.apply(toy, peftjax.LoraConfig(rank=2, targets=["query"]))
    check = unchanged(toy)
    with pytest.raises(PeftError, match="first adapter"):
        peftjax.apply(toy, DoraConfig(rank=2, targets=["query"]), adapter_name="dora", stack=True)
    check()
    peftjax.apply(toy, DoraConfig(rank=2, targets=["value"]), adapter_name="dora")
    peftjax.apply(toy, peftjax.IA3Config(targets=["value"]), adapter_name="ia3", stack=True)


def test_dora_takes_loras_fields_and_round_trips():
    config = DoraConfig(rank=4, alpha=16, targets=["query"], rslora=True, loraplus_lr_ratio=8.0)
    assert config.scale == 8.0
    assert peftjax.config_from_dict(config.to_dict()) == config
    assert config.to_dict()["type"] == "dora"
