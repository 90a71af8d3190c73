"""Bottleneck adapters: each variant computes what adapter-transformers computes
(its formulas transcribed from adapters' modeling.py, which is not installed),
starts as it starts there, and refuses bad settings clearly."""

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
    assert (houlsby.initialisation, pfeiffer.initialisation, parallel.initialisation) == ("bert", "bert", "mam_adapter")
    assert houlsby.bottleneck_for(768) == 48 and BottleneckConfig(bottleneck_size=5).bottleneck_for(768) == 5
    assert BottleneckConfig(variant="parallel", scaling=2.0, non_linearity="gelu").scale == 2.0


@pytest.mark.parametrize("init_weights", ["bert", "mam_adapter"])
def test_initialisations_are_adapter_transformers(init_weights):
    """"bert": N(0, 0.02) kernels (init_bert_weights); "mam_adapter": W_down uniform
    on +-1/sqrt(d) (kaiming_uniform_(a=sqrt(5))) and W_up zero; biases zero."""
    model = from_config("llama-tiny", seed=0)  # d = 64
    peftjax.apply(model, BottleneckConfig(variant="houlsby", bottleneck_size=16, init_weights=init_weights))
    down = np.concatenate([np.ravel(w.down_kernel[...]) for w in adapters(model).values()])  # 4 x 64 x 16 draws
    up = np.concatenate([np.ravel(w.up_kernel[...]) for w in adapters(model).values()])
    for wrapper in adapters(model).values():
        assert not wrapper.down_bias[...].any() and not wrapper.up_bias[...].any()
    if init_weights == "bert":
        for values in (down, up):
            assert abs(values.std() / 0.02 - 1) < 0.05 and abs(values.mean()) < 0.002
    else:
        assert not up.any() and 0.99 / 8 < np.abs(down).max() <= 1 / 8 and abs(down.std() * 8 * np.sqrt(3) - 1) < 0.05


def randomise_up(wrapper, seed=0):
    wrapper.up_kernel[...] = 0.1 * jax.random.normal(jax.random.key(seed), wrapper.up_kernel.shape)
    wrapper.up_bias[...] = 0.1 * jax.random.normal(jax.random.key(seed + 1), wrapper.up_bias.shape)


def adapter_output(wrapper, h, activation):
    hidden = activation(h @ wrapper.down_kernel[...] + wrapper.down_bias[...])
    return hidden @ wrapper.up_kernel[...] + wrapper.up_bias[...]


def test_houlsby_adapter_reads_the_branch_output():
    model = from_config("bert-tiny", num_labels=2, seed=0)
    peftjax.apply(model, BottleneckConfig(variant="houlsby", bottleneck_size=4))
    wrapper = model.bert.encoder.layer[0].after_mlp
    randomise_up(wrapper)
    out, residual = jax.random.normal(jax.random.key(3), (2, 5, 32)), jax.random.normal(jax.random.key(4), (2, 5, 32))
    norm = model.bert.encoder.layer[0].output.LayerNorm
    expected = out + adapter_output(wrapper, out, jax.nn.silu)
    np.testing.assert_allclose(wrapper(out, residual, norm), expected, atol=1e-6)


def test_parallel_adapter_reads_the_residual_stream_and_scales():
    """ParallelAdapter.pre_forward hands the adapter the residual input (in
    pre-LN ViT and Llama the un-normalised stream, not the FFN's input)."""
    model = from_config("vit-tiny", num_labels=3, seed=0)
    peftjax.apply(model, BottleneckConfig(variant="parallel", reduction_factor=8))
    wrapper = model.vit.encoder.layer[1].after_mlp
    randomise_up(wrapper)
    out, residual = jax.random.normal(jax.random.key(3), (2, 5, 32)), jax.random.normal(jax.random.key(4), (2, 5, 32))
    expected = out + 4.0 * adapter_output(wrapper, residual, jax.nn.relu)
    np.testing.assert_allclose(wrapper(out, residual, None), expected, atol=1e-6)


def test_pfeiffer_on_bert_reads_the_normalised_sum_as_adapter_transformers():
    """SeqBnConfig: pre_forward keeps o as the residual and feeds LN(o + x) to
    the adapter; post_forward normalises again with the same LN:
    LN(o + x + adapter(LN(o + x)))."""
    model = from_config("bert-tiny", num_labels=2, seed=0)
    peftjax.apply(model, BottleneckConfig(variant="pfeiffer", bottleneck_size=4))
    model.eval()
    layer = model.bert.encoder.layer[0]
    randomise_up(layer.after_mlp)
    h = jax.random.normal(jax.random.key(3), (2, 5, 64))  # the FFN's hidden units
    x = jax.random.normal(jax.random.key(4), (2, 5, 32))  # the block's input, the residual
    norm = layer.output.LayerNorm
    o = layer.output.dense(h)
    expected = norm(o + x + adapter_output(layer.after_mlp, norm(o + x), jax.nn.relu))
    np.testing.assert_allclose(layer.output(h, x, layer.after_mlp), expected, atol=1e-5)


def test_pfeiffer_on_llama_reads_the_sum_with_the_residual_stream():
    """Pre-LN: adapter-transformers passes no LayerNorm and the un-normalised
    residual x, so the layer outputs x + o + adapter(o + x)."""
    from peftjax.models.llama import rope_cos_sin

    model = from_config("llama-tiny", seed=0)
    peftjax.apply(model, BottleneckConfig(variant="pfeiffer", bottleneck_size=4))
    layer = model.model.layers[0]
    randomise_up(layer.after_mlp)
    x = jax.random.normal(jax.random.key(3), (2, 5, 64))
    mask = jnp.ones((2, 5), bool)
    inv_freq = model.config.rope_parameters.inverse_frequencies(model.config.head_dim)
    cos, sin = rope_cos_sin(jnp.broadcast_to(jnp.arange(5), (2, 5)), inv_freq, jnp.float32)
    x1 = x + layer.self_attn(layer.input_layernorm(x), cos, sin, mask)
    o = layer.mlp(layer.post_attention_layernorm(x1))
    expected = x1 + o + adapter_output(layer.after_mlp, o + x1, jax.nn.relu)
    np.testing.assert_allclose(layer(x, cos, sin, mask), expected, atol=1e-5)


def test_mam_adapter_init_changes_the_model_once_up_moves_and_exactly_not_before():
    model = from_config("bert-tiny", num_labels=2, seed=0)
    model.eval()
    ids = jax.random.randint(jax.random.key(1), (2, 8), 3, 1000)
    base = model(ids).logits
    peftjax.apply(model, BottleneckConfig(variant="pfeiffer", init_weights="mam_adapter"))
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
        (dict(init_weights="houlsby"), "init_weights='houlsby': must be 'bert', 'mam_adapter' or None"),
    ],
)
def test_bad_configs_are_clear_errors(fields, message):
    with pytest.raises(PeftError, match=message):
        BottleneckConfig(**fields)


def test_config_round_trip():
    config = BottleneckConfig(variant="parallel", bottleneck_size=8, scaling=2.0)
    assert config.targets == ("after_mlp",)
    assert peftjax.config_from_dict(config.to_dict()) == config
