"""Prefix tuning: prefixes are keys/values every query sees (checked against a
KV cache, HF PEFT's own forward on a tiny Llama, and a hand-written
attention), the tokens' positions follow the prefix, the reparameterisation
counts and starts as HF PEFT's and folds away exactly, and models without
attention points refuse. tests/methods/test_hf_peft_minilm.py checks MiniLM."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import peftjax
from peftjax import PeftError, PrefixTuningConfig
from peftjax.methods.prefix_tuning import PrefixEncoderParam, PrefixTuning, fold
from peftjax.models import from_config
from peftjax.points import AttentionKeyValue

N = 3


def batch():
    ids = jax.random.randint(jax.random.key(1), (2, 8), 3, 1000)
    mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3], jnp.int32)
    return ids, mask


def prefix_wrappers(model):
    return [w for _, w in peftjax.iter_wrappers(model) if isinstance(w, PrefixTuning)]


class KeyValueRecorder(AttentionKeyValue):
    """An identity point that keeps what it saw (eager use only)."""

    def __init__(self, seen: list):
        self.seen = seen

    def __call__(self, k_bsnh, v_bsnh, mask_bs):
        self.seen.append((k_bsnh, v_bsnh))
        return k_bsnh, v_bsnh, mask_bs


def test_llama_prefix_is_a_kv_cache_of_post_rope_keys():
    """Prefixes set to the keys (after RoPE) and values the base model computes
    for tokens P make the model continue [P; ids]: what HF's past_key_values
    holds. The callers' tokens take positions N.. by themselves."""
    base, model = from_config("llama-tiny", seed=0), from_config("llama-tiny", seed=0)
    base.eval(), model.eval()
    ids, mask = batch()
    prompt = jnp.broadcast_to(jnp.array([21, 22, 23]), (2, N))
    seen = []
    for layer in base.model.layers:
        layer.self_attn.attention_kv = KeyValueRecorder(seen)
    expected = base(jnp.concatenate([prompt, ids], 1), jnp.concatenate([jnp.ones_like(prompt), mask], 1)).logits

    peftjax.apply(model, PrefixTuningConfig(num_virtual_tokens=N))
    for wrapper, (k, v) in zip(prefix_wrappers(model), seen, strict=True):
        assert wrapper.prefix_keys.shape == (N, 2, 16)  # grouped-query attention: 2 key/value heads
        wrapper.prefix_keys[...], wrapper.prefix_values[...] = k[0, :N], v[0, :N]
    np.testing.assert_allclose(model(ids, mask).logits, expected[:, N:], atol=1e-5)


def tiny_llama_pair(path, **prefix):
    """The tiny Llama checkpoint in transformers with HF PEFT's prefix tuning,
    and in peftjax with ours."""
    import transformers
    from peft import PrefixTuningConfig as HFPrefixTuningConfig
    from peft import get_peft_model

    from peftjax.models import from_pretrained

    reference = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    theirs = get_peft_model(reference, HFPrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, **prefix))
    ours = from_pretrained(path)
    peftjax.apply(ours, PrefixTuningConfig(num_virtual_tokens=N, **prefix))
    return theirs.eval(), ours


@pytest.mark.parametrize("given_positions", [False, True], ids=["default-positions", "caller-positions"])
def test_llama_logits_match_hf_peft(tiny_llama_path, given_positions):
    """HF PEFT's own forward (its KV cache of prefixes, its masks and positions)
    on a padded batch, against ours with the same prefix values."""
    theirs, ours = tiny_llama_pair(tiny_llama_path)
    table = theirs.prompt_encoder["default"].embedding.weight.detach().numpy().reshape(N, 2, 2, 2, 16)
    for layer, wrapper in enumerate(prefix_wrappers(ours)):  # (N, layer, key/value, kv heads, head_dim)
        wrapper.prefix_keys[...], wrapper.prefix_values[...] = table[:, layer, 0], table[:, layer, 1]
    ours.eval()
    ids, mask = (np.asarray(a) for a in batch())
    positions = np.tile(np.arange(8), (2, 1))
    extra = {"position_ids": torch.from_numpy(positions)} if given_positions else {}
    with torch.no_grad():
        expected = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **extra).logits
    args = (jnp.asarray(ids), jnp.asarray(mask), *([jnp.asarray(positions)] if given_positions else []))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours(*args).logits)[real], expected.numpy()[real], atol=1e-4, rtol=0)


def test_reparameterisation_counts_and_starts_as_hf_peft(tiny_llama_path):
    """With prefix_projection, HF PEFT sizes its encoder from the model's config
    (kv_dim for grouped-query attention, e = kv_dim by default); both draw P'
    from N(0, 1) and the MLP uniform on +-1/sqrt(fan_in)."""
    theirs, ours = tiny_llama_pair(tiny_llama_path, prefix_projection=True)
    encoder = theirs.prompt_encoder["default"]
    assert peftjax.count_params(ours).trainable == sum(p.numel() for p in encoder.parameters())
    wrappers = prefix_wrappers(ours)
    shared = wrappers[0].encoder
    assert shared.embedding.shape == tuple(encoder.embedding.weight.shape) == (N, 32)
    assert abs(float(np.std(encoder.embedding.weight.detach().numpy())) - 1) < 0.35  # 96 samples of N(0, 1)
    assert abs(float(jnp.std(shared.embedding[...])) - 1) < 0.35
    first, last = encoder.transform[0], encoder.transform[2]
    for ours_values, theirs_values, fan_in in [
        (shared.kernel[...], first.weight, 32),
        (shared.bias[...], first.bias, 32),
        (jnp.concatenate([w.out_kernel[...].reshape(32, -1) for w in wrappers], 1), last.weight, 32),
    ]:
        bound = 1 / np.sqrt(fan_in)
        their_max = float(theirs_values.detach().abs().max())
        assert 0.9 * bound < their_max <= bound and 0.9 * bound < float(jnp.abs(ours_values).max()) <= bound


def test_transformers_vit_takes_no_kv_cache():
    """Why ViT's positions do not move: HF PEFT feeds prefixes as a KV cache, which ViT has no input for."""
    import inspect

    import transformers

    assert not {"past_key_values", "cache"} & set(inspect.signature(transformers.ViTModel.forward).parameters)


def test_layers_that_prepend_different_lengths_are_a_clear_error():
    model = from_config("bert-tiny", num_labels=2, seed=0)
    peftjax.apply(model, PrefixTuningConfig(num_virtual_tokens=3, targets=r".*layer\.0\..*attention_kv"))
    peftjax.apply(
        model, PrefixTuningConfig(num_virtual_tokens=2, targets=r".*layer\.1\..*attention_kv"), adapter_name="b"
    )
    with pytest.raises(PeftError, match=r"prepend different numbers of key positions \[2, 3\]"):
        model(*batch())


def test_bert_attention_with_prefix_is_the_formula():
    model = from_config("bert-tiny", num_labels=2, seed=0)
    peftjax.apply(model, PrefixTuningConfig(num_virtual_tokens=N))
    model.eval()
    attention = model.bert.encoder.layer[1].attention.self
    x = jax.random.normal(jax.random.key(2), (2, 6, 32))
    mask = jnp.array([[True] * 6, [True] * 4 + [False] * 2])
    heads = lambda t: t.reshape(2, -1, 4, 8)  # noqa: E731
    q, k, v = heads(attention.query(x)), heads(attention.key(x)), heads(attention.value(x))
    wrapper = attention.attention_kv
    k = jnp.concatenate([jnp.broadcast_to(wrapper.prefix_keys[...], (2, N, 4, 8)), k], 1)
    v = jnp.concatenate([jnp.broadcast_to(wrapper.prefix_values[...], (2, N, 4, 8)), v], 1)
    visible = jnp.concatenate([jnp.ones((2, N), bool), mask], 1)
    scores = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(8.0)
    scores = jnp.where(visible[:, None, None, :], scores, -jnp.inf)
    expected = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(scores, -1), v).reshape(2, 6, 32)
    np.testing.assert_allclose(attention(x, mask), expected, atol=1e-5)


def test_reparameterisation_is_shared_and_counts_by_the_formula():
    from peft import PrefixEncoder
    from peft import PrefixTuningConfig as HFPrefixTuningConfig

    model = from_config("llama-tiny", seed=0)
    peftjax.apply(model, PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=16))
    wrappers = prefix_wrappers(model)
    assert len(wrappers) == 2 and wrappers[0].encoder is wrappers[1].encoder
    hf = PrefixEncoder(
        HFPrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N, token_dim=32, num_layers=2, num_attention_heads=2,
            encoder_hidden_size=16, prefix_projection=True, num_transformer_submodules=1,
        )
    )  # token_dim = kv_dim: HF PEFT's size for grouped-query attention
    formula = N * 32 + 32 * 16 + 16 + 2 * (16 * 64 + 64)  # N kv + kv e + e + L (2 e kv + 2 kv)
    assert peftjax.count_params(model).trainable == sum(p.numel() for p in hf.parameters()) == formula


def test_fold_keeps_the_output_and_leaves_only_the_prefixes(tmp_path):
    model = from_config("bert-tiny", num_labels=2, seed=0)
    peftjax.apply(model, PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=True))
    model.eval()
    for i, variable in enumerate(v for _, v in nnx.iter_graph(model) if isinstance(v, PrefixEncoderParam)):
        variable[...] += 0.1 * jax.random.normal(jax.random.key(i), variable.shape)  # "trained"
    ids, mask = batch()
    trained = model(ids, mask).logits
    before = peftjax.count_params(model)

    assert fold(model) is model
    np.testing.assert_allclose(model(ids, mask).logits, trained, atol=1e-6, rtol=0)
    after = peftjax.count_params(model)
    assert after.trainable == 2 * 2 * N * 32 < before.trainable
    assert after.total == before.total - before.trainable + after.trainable
    assert not any(isinstance(v, PrefixEncoderParam) for _, v in nnx.iter_graph(model))
    (name, config), = peftjax.applied_methods(model)
    assert not config.prefix_projection and config.num_virtual_tokens == N

    peftjax.save_adapter(model, tmp_path / "folded")
    fresh = from_config("bert-tiny", num_labels=2, seed=0)
    peftjax.load_adapter(fresh, tmp_path / "folded")
    fresh.eval()
    np.testing.assert_allclose(fresh(ids, mask).logits, trained, atol=1e-6, rtol=0)
    assert fold(model) is model  # nothing left to fold: a no-op


def test_fold_needs_a_prefix_adapter():
    model = from_config("bert-tiny", num_labels=2, seed=0)
    with pytest.raises(PeftError, match="no prefix-tuning adapter"):
        fold(model)


def test_a_model_without_attention_points_is_a_clear_error(toy, unchanged):
    check = unchanged(toy)
    with pytest.raises(PeftError, match="prefix_tuning on a model without AttentionKeyValue insertion points"):
        peftjax.apply(toy, PrefixTuningConfig())
    check()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(num_virtual_tokens=0), "num_virtual_tokens=0: must be a positive integer"),
        (dict(encoder_hidden_size=0), "encoder_hidden_size=0: must be a positive integer or None"),
    ],
)
def test_bad_configs_are_clear_errors(fields, message):
    with pytest.raises(PeftError, match=message):
        PrefixTuningConfig(**fields)
