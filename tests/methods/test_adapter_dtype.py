"""Adapter parameters and their optimizer state are float32 whatever the base's
parameter dtype: on a model with bf16 parameters (float32 compute, the setting
of ``peftjax bench --param-dtype bf16``), every method's adapter trains (bf16
storage would round away IA3's and DoRA's small steps: 1.0 plus a step below
0.002 is 1.0 in bf16). One model carries every method, each on modules of its
own, so the check costs one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
from peftjax.models import from_config

FFN_OUT = r".*\.layer\.\d+\.output\.dense"
# method -> (config, one of the parameters it trains, as its tree path reads)
METHODS = {
    "lora": (peftjax.LoraConfig(rank=4, targets=["query"]), "['query']['lora_b']"),
    "dora": (peftjax.DoraConfig(rank=4, targets=["value"]), "['value']['magnitude']"),
    "qlora": (peftjax.QLoraConfig(rank=4, targets=["key"]), "['key']['lora_b']"),
    "vera": (peftjax.VeraConfig(rank=16, targets=["intermediate.dense"]), "['dense']['scale_d']"),
    "ia3": (peftjax.IA3Config(targets=FFN_OUT, feedforward=FFN_OUT), "['dense']['ia3_l']"),
    "bottleneck": (peftjax.BottleneckConfig(variant="houlsby"), "['after_mlp']['up_kernel']"),
    "prompt_tuning": (peftjax.PromptTuningConfig(num_virtual_tokens=3), "['input_embeddings']['prompt']"),
    "prefix_tuning": (peftjax.PrefixTuningConfig(num_virtual_tokens=3), "['attention_kv']['prefix_keys']"),
}
STEPS = 5
DTYPE = jnp.float32  # compute dtype: peftjax bench --param-dtype bf16's default


def test_bf16_model_trains_float32_adapters_of_every_method():
    model = from_config("bert-tiny", num_labels=2, seed=0, dtype=DTYPE, param_dtype=jnp.bfloat16)
    for name, (config, _) in METHODS.items():
        peftjax.apply(model, config, adapter_name=name)
    ids = jax.random.randint(jax.random.key(1), (4, 8), 3, 1000)
    mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3, [1] * 8, [1] * 2 + [0] * 6], jnp.int32)
    labels = jnp.array([0, 1, 1, 0])

    def loss(m, batch):
        logits = m(batch[0], batch[1]).logits.astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[2]).mean()

    state = peftjax.TrainState.create(model, peftjax.make_optimizer(model, optax.adamw(1e-3)))
    assert {a.dtype for a in jax.tree.leaves(state.frozen)} == {jnp.dtype(jnp.bfloat16)}
    before = jax.tree.map(np.array, state.trainable)
    step = peftjax.make_train_step(loss)
    for _ in range(STEPS):
        state, metrics = step(state, (ids, mask, labels))
    assert jnp.isfinite(metrics["loss"])

    trained = jax.tree_util.tree_leaves_with_path(state.trainable)
    for name, (_, parameter) in METHODS.items():  # every method's adapter is in the trainable state
        assert any(parameter in jax.tree_util.keystr(path) for path, _ in trained), name
    for path, array in trained:
        assert array.dtype == jnp.float32, f"{jax.tree_util.keystr(path)} is {array.dtype}, not float32"
    moments = [a for a in jax.tree.leaves(state.opt_state) if jnp.issubdtype(a.dtype, jnp.floating)]
    assert moments and all(a.dtype == jnp.float32 for a in moments), "optimizer state must be float32"
    changed = jax.tree.map(lambda a, b: float(np.mean(np.asarray(a) != b)), state.trainable, before)
    for path, fraction in jax.tree_util.tree_leaves_with_path(changed):
        assert fraction > 0.9, f"{jax.tree_util.keystr(path)}: only {fraction:.0%} of the entries moved"


def test_hf_peft_keeps_adapters_of_a_bf16_model_in_float32():
    """What lora.py says of HF PEFT: autocast_adapter_dtype (its default) upcasts
    the adapters of a bf16 model to float32."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)  # fmt: skip
    configs = [
        peft.LoraConfig(r=2, target_modules=["query"]),
        peft.LoraConfig(r=2, target_modules=["query"], use_dora=True),
        peft.IA3Config(target_modules=["key", "output.dense"], feedforward_modules=["output.dense"]),
        peft.VeraConfig(r=4, target_modules=["query"]),
    ]
    for method in configs:
        model = peft.get_peft_model(transformers.BertModel(config).to(torch.bfloat16), method)
        trained = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
        assert trained and set(trained.values()) == {torch.float32}, (type(method).__name__, trained)
        assert model.base_model.model.embeddings.word_embeddings.weight.dtype == torch.bfloat16
