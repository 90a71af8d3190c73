"""VeRA: shared random matrices (one per shape, regenerated from the seed, never
saved), initial values, and the forward formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

import peftjax
from peftjax import VeraConfig
from peftjax.methods.vera import VeraProjection


def test_one_shared_buffer_per_shape(toy):
    peftjax.apply(toy, VeraConfig(rank=8, targets="all-linear"))
    wrappers = dict(peftjax.iter_wrappers(toy))
    a_buffers = {id(w.projection_a): w.projection_a.shape for w in wrappers.values()}
    b_buffers = {id(w.projection_b): w.projection_b.shape for w in wrappers.values()}
    assert sorted(a_buffers.values()) == [(16, 8), (32, 8)]  # inputs of width 16 (q k v o up) and 32 (down)
    assert sorted(b_buffers.values()) == [(8, 16), (8, 32)]
    block0, block1 = toy.layers[0], toy.layers[1]
    assert block0.query.projection_a is block1.value.projection_a is block0.up.projection_a
    # Shared variables appear once in the model's state, as buffers, not parameters.
    buffers = [v for _, v in nnx.iter_graph(toy) if isinstance(v, VeraProjection)]
    assert len(buffers) == 4 and not any(isinstance(v, nnx.Param) for v in buffers)


def test_initial_values_and_bounds(toy):
    peftjax.apply(toy, VeraConfig(rank=8, d_initial=0.1, targets=["query", "down"]))
    for wrapper in dict(peftjax.iter_wrappers(toy)).values():
        fan_in = wrapper.layout.fan_in
        assert np.abs(wrapper.projection_a[...]).max() <= 1 / math.sqrt(fan_in)
        assert np.abs(wrapper.projection_b[...]).max() <= 1 / math.sqrt(8)
        np.testing.assert_array_equal(wrapper.scale_d[...], np.full((8,), 0.1, np.float32))
        np.testing.assert_array_equal(wrapper.scale_b[...], np.zeros(wrapper.layout.out_shape, np.float32))


def test_matrices_depend_only_on_seed_and_shape():
    from conftest import ToyStack

    def matrices(config):
        model = ToyStack(rngs=nnx.Rngs(5))
        peftjax.apply(model, config)
        return {w.projection_a.shape: np.asarray(w.projection_a[...]) for _, w in peftjax.iter_wrappers(model)}

    everything = matrices(VeraConfig(rank=4, targets="all-linear", seed=3))
    only_query = matrices(VeraConfig(rank=4, targets=["query"], seed=3))
    np.testing.assert_array_equal(only_query[(16, 4)], everything[(16, 4)])
    other_seed = matrices(VeraConfig(rank=4, targets=["query"], seed=4))
    assert not np.allclose(other_seed[(16, 4)], everything[(16, 4)])


def test_forward_is_the_formula(toy):
    peftjax.apply(toy, VeraConfig(rank=6, targets=["query"]))
    layer = toy.layers[0].query
    layer.scale_b[...] = jax.random.normal(jax.random.key(1), (16,))
    layer.scale_d[...] = jax.random.normal(jax.random.key(2), (6,))
    x = jax.random.normal(jax.random.key(3), (5, 16))
    a, b = layer.projection_a[...], layer.projection_b[...]
    expected = layer.base(x) + layer.scale_b[...] * (((x @ a) * layer.scale_d[...]) @ b)
    np.testing.assert_allclose(layer(x), expected, atol=1e-6)


def test_saved_file_holds_only_the_vectors_and_loading_regenerates_the_matrices(toy, toy_batch, tmp_path):
    from conftest import ToyStack

    peftjax.apply(toy, VeraConfig(rank=8, targets="all-linear", seed=11))
    for i, (_, wrapper) in enumerate(peftjax.iter_wrappers(toy)):
        wrapper.scale_b[...] = 0.1 * jax.random.normal(jax.random.key(i), wrapper.scale_b.shape)
    peftjax.save_adapter(toy, tmp_path / "vera")
    saved = load_file(str(tmp_path / "vera" / "adapter_model.safetensors"))
    assert {key.rsplit(".", 1)[-1] for key in saved} == {"scale_d", "scale_b"}
    assert sum(v.size for v in saved.values()) == peftjax.count_params(toy).trainable
    fresh = peftjax.load_adapter(ToyStack(rngs=nnx.Rngs(0)), tmp_path / "vera")
    for (path, original), (_, loaded) in zip(peftjax.iter_wrappers(toy), peftjax.iter_wrappers(fresh), strict=True):
        np.testing.assert_array_equal(loaded.projection_a[...], original.projection_a[...], err_msg=path)
        np.testing.assert_array_equal(loaded.projection_b[...], original.projection_b[...], err_msg=path)
    x, _ = toy_batch
    np.testing.assert_array_equal(fresh(x), toy(x))
    assert jnp.abs(fresh(x) - ToyStack(rngs=nnx.Rngs(0))(x)).max() > 0  # the adapter does something
