"""QLoRA and NF4: the code book, the rounding bound it implies, packing, double
quantisation, memory per parameter, counting, and what the table cannot show."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import peftjax
from peftjax import PeftError, QLoraConfig
from peftjax.methods import nf4
from peftjax.methods.qlora import NF4Linear, QLoraLinear
from peftjax.models import from_config


def test_code_book_is_the_papers_normal_quantiles():
    code = nf4.NF4_CODE
    assert code.shape == (16,) and (np.diff(code) > 0).all()
    assert code[0] == -1.0 and code[-1] == 1.0 and code[7] == 0.0  # exact zero, 7 negative, 8 positive
    np.testing.assert_allclose(nf4.nf4_code_from_quantiles(), code, atol=1e-6)


def block_absmax(x, block):
    flat = np.asarray(x).ravel()
    flat = np.pad(flat, (0, -flat.size % block))
    return np.abs(flat.reshape(-1, block)).max(axis=1)


@pytest.mark.parametrize("block", [64, 32])
def test_round_trip_error_is_within_half_the_largest_code_gap_times_block_absmax(block):
    x = jax.random.normal(jax.random.key(0), (96, 75))  # 7200 weights: the last block is partial
    codes, absmax = nf4.quantize_nf4(x, block_size=block)
    back = nf4.dequantize_nf4(codes, absmax, size=x.size, block_size=block).reshape(x.shape)
    np.testing.assert_array_equal(absmax, block_absmax(x, block))
    bound = nf4.max_error_factor() * np.repeat(np.asarray(absmax), block)[: x.size].reshape(x.shape)
    error = np.abs(np.asarray(x) - np.asarray(back))
    assert (error <= bound * (1 + 1e-6)).all()
    assert nf4.max_error_factor() == pytest.approx((1.0 - 0.6961928) / 2)
    # Rounding is to the nearest code value: no other code is closer.
    normalised = np.asarray(x).ravel() / np.repeat(np.asarray(absmax), block)[: x.size]
    chosen = np.asarray(back).ravel() / np.repeat(np.asarray(absmax), block)[: x.size]
    nearest = nf4.NF4_CODE[np.abs(normalised[:, None] - nf4.NF4_CODE[None, :]).argmin(axis=1)]
    np.testing.assert_allclose(chosen, nearest, atol=1e-6)


def test_two_codes_per_byte_first_in_the_high_nibble():
    values = np.tile(nf4.NF4_CODE, 4)  # one block of 64 with absmax 1: every code is hit exactly
    codes, absmax = nf4.quantize_nf4(jnp.asarray(values), block_size=64)
    assert codes.dtype == jnp.uint8 and codes.shape == (32,) and float(absmax[0]) == 1.0
    indices = np.tile(np.arange(16), 4)
    np.testing.assert_array_equal(np.asarray(codes), (indices[0::2] << 4) | indices[1::2])
    np.testing.assert_array_equal(nf4.dequantize_nf4(codes, absmax, size=64), values)


def test_double_quantisation_error_adds_at_most_half_an_int8_step():
    x = jax.random.normal(jax.random.key(1), (300, 128))  # 600 blocks: 3 scale blocks, the last partial
    codes, absmax = nf4.quantize_nf4(x)
    q8, scales, mean = nf4.quantize_absmax(absmax, block_size=256)
    assert q8.dtype == jnp.int8 and q8.shape == absmax.shape and scales.shape == (3,) and mean.shape == ()
    approx = nf4.dequantize_absmax(q8, scales, mean, block_size=256)
    step = np.repeat(np.asarray(scales), 256)[: absmax.size]
    assert (np.abs(np.asarray(approx) - np.asarray(absmax)) <= step / 2 * (1 + 1e-5)).all()
    # Per weight: |x - code * c~| <= half_gap * c + |c - c~| (|code| <= 1).
    back = nf4.dequantize_nf4(codes, approx, size=x.size).reshape(x.shape)

    def per_weight(per_block):
        return np.repeat(np.asarray(per_block), 64)[: x.size].reshape(x.shape)

    bound = nf4.max_error_factor() * per_weight(absmax) + per_weight(np.abs(approx - absmax))
    assert (np.abs(np.asarray(x) - np.asarray(back)) <= bound + 1e-6).all()


def stored_bytes_per_param(model) -> float:
    layers = [m for _, m in nnx.iter_modules(model) if isinstance(m, NF4Linear)]
    stored = sum(v.get_value().size * v.get_value().dtype.itemsize for m in layers for v in m.storage())
    return stored / sum(m.logical_params["kernel"] for m in layers)


@pytest.mark.parametrize(("double_quant", "limit"), [(True, 0.52), (False, 0.57)])
def test_quantised_kernels_bytes_per_parameter(double_quant, limit):
    model = from_config("llama-tiny", seed=0)
    peftjax.apply(model, QLoraConfig(rank=2, targets="all-linear", double_quant=double_quant))
    assert stored_bytes_per_param(model) <= limit
    # No float kernel is left under a QLoRA wrapper.
    for path, wrapper in peftjax.iter_wrappers(model):
        assert isinstance(wrapper.base, NF4Linear) and not hasattr(wrapper.base, "kernel"), path


def test_bert_base_takes_the_papers_4_127_bits_per_weight():
    model = from_config("bert-base", abstract=True)
    model = nnx.eval_shape(lambda m: peftjax.apply(m, QLoraConfig(rank=8, targets="all-linear")), model)
    bits = 8 * stored_bytes_per_param(model)
    assert 4.125 < bits < 4.13  # 4 + 8/64 + 32/(64*256) = 4.127, plus one fp32 mean per kernel


def test_count_is_base_plus_adapter_with_kernels_counted_logically():
    model = from_config("llama-tiny", seed=0)
    base_total = peftjax.count_params(model).total
    peftjax.apply(model, QLoraConfig(rank=4, targets=["q_proj", "v_proj", "down_proj"]))
    count = peftjax.count_params(model)
    c = model.config
    kv = c.num_key_value_heads * c.head_dim
    lora = (
        c.num_hidden_layers
        * 4
        * ((c.hidden_size + c.hidden_size) + (c.hidden_size + kv) + (c.intermediate_size + c.hidden_size))
    )
    assert count == (lora, base_total + lora)
    assert "trainable params: " in peftjax.summary(model)


def test_quantised_layer_computes_the_float_layer_with_the_dequantised_kernel():
    layer = nnx.Linear(40, 24, rngs=nnx.Rngs(0))  # 960 weights: 15 blocks
    layer.bias[...] = jax.random.normal(jax.random.key(2), (24,))
    x = jax.random.normal(jax.random.key(3), (5, 40))
    quantised = NF4Linear(layer, block_size=64, double_quant=True, absmax_block_size=256)
    reference = nnx.Linear(40, 24, rngs=nnx.Rngs(0))
    reference.kernel[...] = quantised.dequantized_kernel()
    reference.bias[...] = layer.bias[...]
    np.testing.assert_allclose(quantised(x), reference(x), atol=1e-6)
    assert quantised.bias is layer.bias  # the bias stays the layer's own (frozen) parameter


def test_quantised_einsum_layer_with_bias():
    layer = nnx.Einsum("btd,dnh->btnh", (16, 2, 8), (2, 8), rngs=nnx.Rngs(0))
    layer.bias[...] = jax.random.normal(jax.random.key(4), (2, 8))
    x = jax.random.normal(jax.random.key(5), (2, 3, 16))
    quantised = NF4Linear(layer, block_size=64, double_quant=False, absmax_block_size=256)
    expected = jnp.einsum("btd,dnh->btnh", x, quantised.dequantized_kernel()) + layer.bias[...]
    np.testing.assert_allclose(quantised(x), expected, atol=1e-6)


def test_merge_is_refused_and_the_model_is_unchanged(toy, toy_batch):
    peftjax.apply(toy, QLoraConfig(rank=2, targets=["query"]))
    x, _ = toy_batch
    before = toy(x)
    with pytest.raises(PeftError, match=r"cannot merge.*QLoraLinear"):
        peftjax.merge(toy)
    assert not any(w.merged for _, w in peftjax.iter_wrappers(toy))
    np.testing.assert_array_equal(toy(x), before)


def test_adapter_file_holds_lora_only_and_loading_requantises(toy, toy_batch, tmp_path):
    from conftest import ToyStack

    peftjax.apply(toy, QLoraConfig(rank=2, targets=["query", "value"]))
    for _, wrapper in peftjax.iter_wrappers(toy):
        wrapper.lora_b[...] = 0.1 * jnp.ones_like(wrapper.lora_b[...])
    peftjax.save_adapter(toy, tmp_path / "qlora")
    saved = load_file(str(tmp_path / "qlora" / "adapter_model.safetensors"))
    assert sorted({key.rsplit(".", 1)[-1] for key in saved}) == ["lora_a", "lora_b"]
    fresh = peftjax.load_adapter(ToyStack(rngs=nnx.Rngs(0)), tmp_path / "qlora")
    x, _ = toy_batch
    np.testing.assert_array_equal(fresh(x), toy(x))


def test_qlora_must_be_the_first_adapter_on_a_module(toy):
    peftjax.apply(toy, peftjax.LoraConfig(rank=2, targets=["query"]))
    with pytest.raises(PeftError, match="first adapter"):
        peftjax.apply(toy, QLoraConfig(rank=2, targets=["query"]), adapter_name="q", stack=True)
    assert all(not isinstance(w, QLoraLinear) for _, w in peftjax.iter_wrappers(toy))


def test_config_checks_block_sizes():
    with pytest.raises(PeftError, match="block_size"):
        QLoraConfig(targets=["query"], block_size=63)
    with pytest.raises(PeftError, match="absmax_block_size"):
        QLoraConfig(targets=["query"], absmax_block_size=0)
    config = QLoraConfig(rank=4, targets=["query"], double_quant=False)
    assert peftjax.config_from_dict(config.to_dict()) == config
