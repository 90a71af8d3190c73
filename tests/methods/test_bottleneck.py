"""Bottleneck adapters: each variant sits where its paper puts it, computes its
formula, starts at the identity, and refuses bad settings clearly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import peftjax
from peftjax import BottleneckConfig, PeftError
from peftjax.methods.bottleneck import BottleneckAdapter
from peftjax.models import from_config


def adapters(model):
    return {p: w for p, w in peftjax.iter_wrappers(model) if isinstance(w, BottleneckAdapter)}


@pytest.mark.parametrize(
    ("variant", "points"),
    [("houlsby", {"after_attention", "after_mlp"}), ("pfeiffer", {"after_mlp"}), ("parallel", {"after_mlp"})],
)
def test_each_variant_wraps_its_points_with_no_targets_given(variant, points):
    model = from_config("llama-tiny", seed=0)
    peftjax.apply(model, BottleneckConfig(variant=variant))
    wrapped = adapters(model)
    assert {p.rsplit(".", 1)[1] for p in wrapped} == points
    assert len(wrapped) == 2 * len(points)  # every layer


def test_defaults_follow_adapter_transformers():
    houlsby, pfeiffer, parallel = (BottleneckConfig(variant=v) for v in ("houlsby", "pfeiffer", "parallel"))
    assert (houlsby.activation, pfeiffer.activation, parallel.activation) == ("swish", "relu", "relu")
    assert (houlsby.scale, pfeiffer.scale, parallel.scale) == (1.0, 1.0, 4.0)
    assert houlsby.bottleneck_for(768) == 48 and BottleneckConfig(bottleneck_size=5).bottleneck_for(768) == 5
    assert BottleneckConfig(variant="parallel", scaling=2.0, non_linearity="gelu").scale == 2.0


def randomise_up(wrapper, seed=0):
    wrapper.up_kernel[...] = 0.1 * jax.random.normal(jax.random.key(seed), wrapper.up_kernel.shape)
    wrapper.up_bias[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1), wrapper.up_bias.shape)


def test_sequential_adapter_is_the_formula():
    model = from_config("bert-tiny", num_labels=2, seed=0)
    peftjax.apply(model, BottleneckConfig(variant="houlsby", bottleneck_size=4))
    wrapper = model.bert.encoder.layer[0].after_mlp
    randomise_up(wrapper)
    out, inp = jax.random.normal(jax.random.key(3), (2, 5, 32)), jax.random.normal(jax.random.key(4), (2, 5, 32))
    hidden = jax.nn.silu(out @ wrapper.down_kernel[...] + wrapper.down_bias[...])
    expected = out + hidden @ wrapper.up_kernel[...] + wrapper.up_bias[...]
    np.testing.assert_allclose(wrapper(out, inp), expected, atol=1e-6)


def test_parallel_adapter_reads_the_branch_input_and_scales():
    model = from_config("vit-tiny", num_labels=3, seed=0)
    peftjax.apply(model, BottleneckConfig(variant="parallel", reduction_factor=8))
    wrapper = model.vit.encoder.layer[1].after_mlp
    randomise_up(wrapper)
    out, inp = jax.random.normal(jax.random.key(3), (2, 5, 32)), jax.random.normal(jax.random.key(4), (2, 5, 32))
    hidden = jax.nn.relu(inp @ wrapper.down_kernel[...] + wrapper.down_bias[...])
    expected = out + 4.0 * (hidden @ wrapper.up_kernel[...] + wrapper.up_bias[...])
    np.testing.assert_allclose(wrapper(out, inp), expected, atol=1e-6)


def test_adapter_changes_the_model_once_up_moves_and_exactly_not_before():
    model = from_config("bert-tiny", num_labels=2, seed=0)
    model.eval()
    ids = jax.random.randint(jax.random.key(1), (2, 8), 3, 1000)
    base = model(ids).logits
    peftjax.apply(model, BottleneckConfig(variant="pfeiffer"))
    assert (model(ids).logits == base).all()
    randomise_up(model.bert.encoder.layer[0].after_mlp)
    assert not jnp.allclose(model(ids).logits, base, atol=1e-4)


def test_a_model_without_branch_points_is_a_clear_error(toy, unchanged):
    check = unchanged(toy)
    with pytest.raises(PeftError, match="bottleneck on a model without BranchOutput insertion points"):
        peftjax.apply(toy, BottleneckConfig())
    check()


def test_a_reduction_that_leaves_nothing_is_a_clear_error(unchanged):
    model = from_config("bert-tiny", num_labels=2, seed=0)
    check = unchanged(model)
    with pytest.raises(PeftError, match="reduction_factor=64 leaves no bottleneck for hidden_size=32"):
        peftjax.apply(model, BottleneckConfig(reduction_factor=64))
    check()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(variant="serial"), "variant='serial': must be one of"),
        (dict(reduction_factor=0), "reduction_factor=0: must be a number > 0"),
        (dict(bottleneck_size=0), "bottleneck_size=0: must be a positive integer or None"),
        (dict(non_linearity="softplus"), "non_linearity='softplus': must be one of"),
        (dict(scaling=-1.0), "scaling=-1.0: must be > 0 or None"),
    ],
)
def test_bad_configs_are_clear_errors(fields, message):
    with pytest.raises(PeftError, match=message):
        BottleneckConfig(**fields)


def test_config_round_trip():
    config = BottleneckConfig(variant="parallel", bottleneck_size=8, scaling=2.0)
    assert config.targets == ("after_mlp",)
    assert peftjax.config_from_dict(config.to_dict()) == config
