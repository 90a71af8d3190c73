"""QLoRA and NF4: the code book, the rounding bound it implies, packing, double
quantisation and the layout against a float64 transcription of bitsandbytes,
memory per parameter, counting, and what the table cannot show."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
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


def test_dynamic_map_is_bitsandbytes():
    """bitsandbytes' create_dynamic_map(signed=True), run as it runs (torch, float32)."""
    data = [0.0, 1.0]
    for i in range(7):  # max_exponent_bits = 7, non_sign_bits = 7
        bounds = torch.linspace(0.1, 1, 2**i + 1)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist() + (-(10 ** (-6 + i)) * means).tolist()
    theirs = torch.tensor(sorted(data), dtype=torch.float32).numpy()
    ours = nf4.DYNAMIC_MAP
    assert ours.dtype == np.float32 and ours.shape == (256,) and (np.diff(ours) > 0).all()
    np.testing.assert_array_max_ulp(ours, theirs, maxulp=1)  # bitsandbytes rounds each step in float32
    assert nf4.absmax_error_factor() == pytest.approx(0.9 / 128, rel=1e-5)  # half the top decade's step


def test_double_quantised_scales_err_by_at_most_the_maps_half_gap():
    x = jax.random.normal(jax.random.key(1), (300, 128))  # 600 blocks: 3 scale blocks, the last partial
    codes, absmax = nf4.quantize_nf4(x)
    q8, scales, mean = nf4.quantize_absmax(absmax, block_size=256)
    assert q8.dtype == jnp.uint8 and q8.shape == absmax.shape and scales.shape == (3,) and mean.shape == ()
    approx = nf4.dequantize_absmax(q8, scales, mean, block_size=256)
    step = np.repeat(np.asarray(scales), 256)[: absmax.size]
    assert (np.abs(np.asarray(approx) - np.asarray(absmax)) <= nf4.absmax_error_factor() * step * (1 + 1e-5)).all()


def bitsandbytes_reference(weight_oi: np.ndarray, block: int = 64, block2: int = 256) -> dict[str, np.ndarray]:
    """bitsandbytes' quantize_4bit(quant_type="nf4", compress_statistics=True) and its
    dequantisation, in float64: blocks of ``block`` along torch's flattened (out, in)
    weight, nearest NF4 value of each weight / block absmax; the absmax minus their
    mean, in blocks of ``block2``, each divided by its absolute maximum and rounded to
    the nearest value of the signed dynamic map (functional.py: create_dynamic_map,
    quantize_blockwise; backends/default/ops.py)."""
    blocks = np.asarray(weight_oi, np.float64).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1)
    code = nf4.NF4_CODE.astype(np.float64)
    indices = np.abs(np.clip(blocks / absmax[:, None], -1, 1)[..., None] - code).argmin(axis=-1)
    dynamic = [0.0, 1.0]
    for exponent in range(-6, 1):
        bounds = np.linspace(0.1, 1.0, 2 ** (exponent + 6) + 1)
        means = 10.0**exponent * (bounds[:-1] + bounds[1:]) / 2
        dynamic += [*means, *-means]
    dynamic = np.sort(dynamic)
    mean = absmax.mean()
    q8, peaks, approx = [], [], []
    for start in range(0, absmax.size, block2):
        centred = absmax[start : start + block2] - mean
        peak = np.abs(centred).max()
        chosen = np.abs((centred / peak)[:, None] - dynamic).argmin(axis=1)
        q8.append(chosen), peaks.append(peak), approx.append(dynamic[chosen] * peak + mean)
    approx = np.concatenate(approx)
    return {
        "indices": indices.ravel(), "absmax": absmax, "q8": np.concatenate(q8), "peaks": np.array(peaks),
        "mean": mean, "weight": (code[indices] * approx[:, None]).reshape(weight_oi.shape),
    }  # fmt: skip


def outlier_kernel() -> np.ndarray:
    """(out, in) = (256, 512) Gaussian weights with a tile of small ones and, in the
    same 8-bit block of scales whichever way the blocks run, one outlier weight."""
    rng = np.random.default_rng(0)
    weight = (0.02 * rng.standard_normal((256, 512))).astype(np.float32)
    weight[:64, :64] *= 0.2
    weight[5, 10] = 12.0
    return weight


@pytest.fixture(scope="module", params=["minilm-layer0-output-dense", "synthetic-outliers"])
def torch_weight(request) -> np.ndarray:
    """A torch-layout (out, in) float32 weight whose block scales have outliers."""
    if request.param == "synthetic-outliers":
        return outlier_kernel()
    folder = request.getfixturevalue("minilm_path")
    return load_file(os.path.join(folder, "model.safetensors"))["encoder.layer.0.output.dense.weight"]


def quantised_linear(weight_oi: np.ndarray) -> NF4Linear:
    layer = nnx.Linear(weight_oi.shape[1], weight_oi.shape[0], rngs=nnx.Rngs(0))
    layer.kernel[...] = jnp.asarray(weight_oi.T)  # nnx's kernel is (in, out)
    return NF4Linear(layer, block_size=64, double_quant=True, absmax_block_size=256)


def test_every_weight_is_within_the_documented_bound_and_no_block_flips_sign(torch_weight):
    """|w - dequant(w)| <= max_error_factor() c_j + absmax_error_factor() s_k for every weight,
    and every block keeps a positive scale."""
    quantised = quantised_linear(torch_weight)
    back = np.asarray(quantised.dequantized_kernel()).T
    reference = bitsandbytes_reference(torch_weight)
    true_scales, scales = reference["absmax"], np.asarray(quantised.block_scales())
    assert (scales > 0).all(), f"{int((scales <= 0).sum())} blocks dequantise with a scale <= 0"
    per_block = nf4.max_error_factor() * true_scales + nf4.absmax_error_factor() * np.repeat(reference["peaks"], 256)
    bound = np.repeat(per_block, 64).reshape(torch_weight.shape)
    excess = np.abs(back - torch_weight) / bound
    over = int((excess > 1 + 1e-5).sum())
    assert over == 0, f"{over} weights exceed the bound, by up to {excess.max()}"


def test_quantised_layer_stores_what_bitsandbytes_stores(torch_weight):
    """Codes, 8-bit scale codes and dequantised weights against the float64
    transcription of bitsandbytes; blocks run along torch's flattened (out, in)."""
    quantised = quantised_linear(torch_weight)
    reference = bitsandbytes_reference(torch_weight)
    packed = np.asarray(quantised.codes[...])
    indices = np.stack([packed >> 4, packed & 0x0F], axis=-1).ravel()
    np.testing.assert_array_equal(indices, reference["indices"])
    np.testing.assert_array_equal(quantised.absmax_codes[...], reference["q8"])
    np.testing.assert_allclose(quantised.absmax_mean[...], reference["mean"], rtol=1e-6)
    np.testing.assert_allclose(quantised.absmax_scales[...], reference["peaks"], rtol=1e-6)
    np.testing.assert_allclose(quantised.dequantized_stored(), reference["weight"], rtol=1e-5, atol=1e-7)


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
