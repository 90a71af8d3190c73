"""VeRA: one pair of shared random matrices sized to the largest adapted layer
(HF PEFT's; tests/methods/test_hf_peft_minilm.py compares them with HF
PEFT's on MiniLM), sliced per layer, regenerated from the seed and never
saved; initial values; the forward formula."""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file

import peftjax
from peftjax import VeraConfig
from peftjax.methods.vera import VeraProjection


def test_one_shared_pair_sized_to_the_largest_layer(toy):
    peftjax.apply(toy, VeraConfig(rank=8, targets="all-linear"))
    wrappers = [w for _, w in peftjax.iter_wrappers(toy)]
    a, b = wrappers[0].projection_a, wrappers[0].projection_b
    assert all(w.projection_a is a and w.projection_b is b for w in wrappers)
    assert a.shape == (32, 8) and b.shape == (8, 32)  # largest fan-in (down: 32) and fan-out (up: 32)
    # Shared variables appear once in the model's state, as float32 buffers, not parameters.
    buffers = [v for _, v in nnx.iter_graph(toy) if isinstance(v, VeraProjection)]
    assert len(buffers) == 2 and not any(isinstance(v, nnx.Param) for v in buffers)
    assert all(v[...].dtype == jnp.float32 for v in buffers)


def test_initial_values_and_bounds(toy):
    peftjax.apply(toy, VeraConfig(rank=8, d_initial=0.1, targets=["query", "down"]))
    for wrapper in dict(peftjax.iter_wrappers(toy)).values():
        a, b = np.asarray(wrapper.projection_a[...]), np.asarray(wrapper.projection_b[...])
        assert np.abs(a).max() <= math.sqrt(6 / 32) < np.abs(a).max() * 1.2  # Kaiming-uniform, gain sqrt(2)
        assert np.abs(b).max() <= math.sqrt(6 / 8) < np.abs(b).max() * 1.2
        np.testing.assert_array_equal(wrapper.scale_d[...], np.full((8,), 0.1, np.float32))
        np.testing.assert_array_equal(wrapper.scale_b[...], np.zeros(wrapper.layout.out_shape, np.float32))


def test_matrices_depend_only_on_seed_rank_and_largest_layer():
    from conftest import ToyStack

    def matrices(config):
        model = ToyStack(rngs=nnx.Rngs(5))
        peftjax.apply(model, config)
        wrapper = next(w for _, w in peftjax.iter_wrappers(model))
        return np.asarray(wrapper.projection_a[...]), np.asarray(wrapper.projection_b[...])

    everything = matrices(VeraConfig(rank=4, targets="all-linear", seed=3))
    assert everything[0].shape == (32, 4) and everything[1].shape == (4, 32)
    np.testing.assert_array_equal(matrices(VeraConfig(rank=4, targets=["up", "down"], seed=3))[0], everything[0])
    assert matrices(VeraConfig(rank=4, targets=["query"], seed=3))[0].shape == (16, 4)
    assert not np.allclose(matrices(VeraConfig(rank=4, targets="all-linear", seed=4))[0], everything[0])


def test_forward_is_the_formula_with_each_layers_slices(toy):
    peftjax.apply(toy, VeraConfig(rank=6, targets=["query", "down"]))
    layer = toy.layers[0].query  # fan-in 16 of the shared 32, fan-out 16 of 16
    layer.scale_b[...] = jax.random.normal(jax.random.key(1), (16,))
    layer.scale_d[...] = jax.random.normal(jax.random.key(2), (6,))
    x = jax.random.normal(jax.random.key(3), (5, 16))
    a, b = layer.projection_a[...][:16], layer.projection_b[...][:, :16]
    expected = layer.base(x) + layer.scale_b[...] * (((x @ a) * layer.scale_d[...]) @ b)
    np.testing.assert_allclose(layer(x), expected, atol=1e-6)


def test_einsum_layer_slices_the_flattened_axes():
    class Heads(nnx.Module):
        def __init__(self):
            self.proj = nnx.Einsum("btd,dnh->btnh", (12, 2, 5), rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.proj(x)

    model = Heads()
    peftjax.apply(model, VeraConfig(rank=3, targets=["proj"]))
    layer = model.proj
    assert layer.projection_a.shape == (12, 3) and layer.projection_b.shape == (3, 10)
    layer.scale_b[...] = jax.random.normal(jax.random.key(1), (2, 5))
    x = jax.random.normal(jax.random.key(3), (2, 4, 12))
    b = layer.projection_b[...].reshape(3, 2, 5)
    low_rank = jnp.einsum("btr,rnh->btnh", (x @ layer.projection_a[...]) * layer.scale_d[...], b)
    np.testing.assert_allclose(layer(x), layer.base(x) + low_rank * layer.scale_b[...], atol=1e-6)


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
