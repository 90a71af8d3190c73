"""IA3: output vs input (feed-forward) scaling, merge exactness on Linear and
Einsum kernels (bias included), and config checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peftjax
from peftjax import IA3Config, PeftError
from peftjax.methods.ia3 import IA3Linear


def randomise(model, seed=0):
    for i, (_, wrapper) in enumerate(peftjax.iter_wrappers(model)):
        noise = jax.random.uniform(jax.random.key(seed + i), wrapper.ia3_l.shape, minval=0.5, maxval=1.5)
        wrapper.ia3_l[...] = noise


def test_output_and_feedforward_input_scaling(toy):
    peftjax.apply(toy, IA3Config(targets=["key", "value", "down"], feedforward=["down"]))
    randomise(toy)
    block = toy.layers[0]
    assert not block.key.scales_input and block.key.ia3_l.shape == (16,)
    assert block.down.scales_input and block.down.ia3_l.shape == (32,)  # in_features of the FFN's second layer
    x = jax.random.normal(jax.random.key(3), (5, 16))
    key = block.key.base
    np.testing.assert_allclose(block.key(x), block.key.ia3_l[...] * (x @ key.kernel[...] + key.bias[...]), atol=1e-6)
    h = jax.random.normal(jax.random.key(4), (5, 32))
    down = block.down.base
    expected = (block.down.ia3_l[...] * h) @ down.kernel[...] + down.bias[...]
    np.testing.assert_allclose(block.down(h), expected, atol=1e-6)


def test_merge_folds_into_columns_bias_and_rows_and_unmerge_restores(toy, toy_batch):
    originals = {p: np.asarray(v[...]) for p, v in nnx.iter_graph(toy) if isinstance(v, nnx.Param)}
    peftjax.apply(toy, IA3Config(targets=["key", "value", "down"], feedforward=["down"]))
    randomise(toy)
    x, _ = toy_batch
    unmerged = toy(x)
    peftjax.merge(toy)
    block = toy.layers[0]
    l_k, l_ff = np.asarray(block.key.ia3_l[...]), np.asarray(block.down.ia3_l[...])
    np.testing.assert_allclose(block.key.base.kernel[...], originals[("layers", 0, "key", "kernel")] * l_k, rtol=1e-6)
    np.testing.assert_allclose(block.key.base.bias[...], originals[("layers", 0, "key", "bias")] * l_k, rtol=1e-6)
    np.testing.assert_allclose(
        block.down.base.kernel[...], originals[("layers", 0, "down", "kernel")] * l_ff[:, None], rtol=1e-6
    )
    np.testing.assert_array_equal(block.down.base.bias[...], originals[("layers", 0, "down", "bias")])
    np.testing.assert_allclose(toy(x), unmerged, atol=1e-5)
    peftjax.unmerge(toy)
    for path, variable in nnx.iter_graph(toy):
        if isinstance(variable, nnx.Param) and path[-1] in ("kernel", "bias"):
            original = originals[tuple(p for p in path if p != "base")]
            np.testing.assert_allclose(variable[...], original, rtol=2e-7, atol=0)  # within float32 rounding
    np.testing.assert_allclose(toy(x), unmerged, atol=1e-5)


@pytest.mark.parametrize("feedforward", [False, True])
def test_einsum_layer_with_bias(feedforward):
    class One(nnx.Module):
        def __init__(self):
            # Output axes in a different order from the kernel's: the bias follows the output.
            self.proj = nnx.Einsum("btd,dnh->bthn", (8, 2, 3), (3, 2), rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.proj(x)

    model = One()
    model.proj.bias[...] = jax.random.normal(jax.random.key(1), (3, 2))
    x = jax.random.normal(jax.random.key(2), (2, 4, 8))
    peftjax.apply(model, IA3Config(targets=["proj"], feedforward=["proj"] if feedforward else ()))
    layer = model.proj
    assert layer.ia3_l.shape == ((8,) if feedforward else (2, 3))
    layer.ia3_l[...] = jax.random.uniform(jax.random.key(3), layer.ia3_l.shape, minval=0.5, maxval=1.5)
    base = layer.base
    if feedforward:
        expected = jnp.einsum("btd,dnh->bthn", x * layer.ia3_l[...], base.kernel[...]) + base.bias[...]
    else:
        expected = (jnp.einsum("btd,dnh->bthn", x, base.kernel[...]) + base.bias[...]) * layer.ia3_l[...].T
    np.testing.assert_allclose(model(x), expected, atol=1e-5)
    peftjax.merge(model)
    np.testing.assert_allclose(model(x), expected, atol=1e-5)
    peftjax.unmerge(model)
    np.testing.assert_allclose(model(x), expected, atol=1e-5)


def test_zero_entry_refuses_to_merge(toy):
    peftjax.apply(toy, IA3Config(targets=["key"]))
    toy.layers[0].key.ia3_l[...] = toy.layers[0].key.ia3_l[...].at[3].set(0.0)
    with pytest.raises(PeftError, match="zero entry"):
        peftjax.merge(toy)
    assert not toy.layers[0].key.merged


def test_bert_targets_and_feedforward_by_regex():
    from peftjax.models import from_config

    model = from_config("bert-tiny", seed=0)
    peftjax.apply(
        model,
        IA3Config(targets=r".*\.(key|value|layer\.\d+\.output\.dense)", feedforward=r".*\.layer\.\d+\.output\.dense"),
    )
    wrapped = {p: w.scales_input for p, w in peftjax.iter_wrappers(model) if isinstance(w, IA3Linear)}
    assert wrapped == {
        f"encoder.layer.{i}.{name}": name == "output.dense"
        for i in range(2)
        for name in ("attention.self.key", "attention.self.value", "output.dense")
    }


def test_config_checks():
    with pytest.raises(PeftError, match=r"feedforward.*must be among targets"):
        IA3Config(targets=["key", "value"], feedforward=["down"])
    with pytest.raises(PeftError, match="feedforward"):
        IA3Config(targets="all-linear", feedforward="all-linear")
    config = IA3Config(targets=["key", "down"], feedforward=["down"])
    assert peftjax.config_from_dict(config.to_dict()) == config
