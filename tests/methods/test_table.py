"""The shared method table: every method and main variant through the same checks.

Adding a method adds rows to ``ROWS``, not tests. Each row names a model
(``MODELS``), the method config(s) to apply, the trainable count its formula
predicts, and whether the method starts at the identity and can merge.
The checks: identity at init, merged equals unmerged with non-zero adapter
weights, save/load round trip, gradients and updates on trainable state only,
the count formula, jit and eager agreement.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peftjax
from peftjax import LoraConfig
from peftjax.models import from_config

TOLERANCE = 1e-5  # fp32 throughout


def _toy():
    from conftest import ToyStack

    model = ToyStack(rngs=nnx.Rngs(0))
    return model, (jax.random.normal(jax.random.key(1), (2, 4, 16)),)


def _text(preset: str, **kwargs):
    model = from_config(preset, seed=0, **kwargs)
    model.train()  # dropout on: the dropout rows train through it
    ids = jax.random.randint(jax.random.key(1), (2, 8), 3, 1000)
    mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3], jnp.int32)
    return model, (ids, mask)


def _vit():
    model = from_config("vit-tiny", num_labels=3, seed=0)
    model.train()
    return model, (jax.random.normal(jax.random.key(1), (2, 3, 32, 32)),)


# name -> () -> (model, forward inputs)
MODELS: dict[str, Callable] = {
    "toy": _toy,
    "bert-tiny": lambda: _text("bert-tiny", num_labels=2),
    "roberta-tiny": lambda: _text("roberta-tiny", num_labels=2),
    "llama-tiny": lambda: _text("llama-tiny"),
    "llama-tiny-cls": lambda: _text("llama-tiny", num_labels=2),
    "vit-tiny": _vit,
}


def forward(model, inputs):
    out = model(*inputs)
    return out if isinstance(out, jax.Array) else out.logits


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    model: str
    configs: tuple[tuple[str, peftjax.MethodConfig], ...]  # (adapter name, config), applied in order
    trainable: Callable[[nnx.Module], int]  # the count formula, given the base model
    identity_at_init: bool = True
    mergeable: bool = False
    # Identity against the model with its adapters disabled rather than the
    # model before apply: QLoRA starts at its quantised base, not the float one.
    identity_to_disabled: bool = False

    @classmethod
    def of(cls, id, model, config, trainable, **kw):
        configs = config if isinstance(config, tuple) else (("default", config),)
        return cls(id, model, configs, trainable, **kw)


def lora_count(rank, *pairs):
    """LoRA adds r * (fan_in + fan_out) per adapted kernel."""
    return rank * sum(n * (d_in + d_out) for n, d_in, d_out in pairs)


def bert(model):
    return model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size


ROWS = [
    Row.of("lora-toy", "toy", LoraConfig(rank=4, targets=["query", "value"]),
           lambda m: lora_count(4, (4, 16, 16)), mergeable=True),
    Row.of("lora-toy-all-linear-rslora", "toy", LoraConfig(rank=2, alpha=4, targets="all-linear", rslora=True),
           lambda m: lora_count(2, (8, 16, 16), (2, 16, 32), (2, 32, 16)), mergeable=True),
    # An embedding table is (vocab, hidden) to LoRA: r * (vocab + hidden).
    Row.of("lora-bert-qv-embeddings", "bert-tiny", LoraConfig(rank=4, targets=["query", "value", "word_embeddings"]),
           lambda m: lora_count(4, (2 * bert(m)[0], bert(m)[1], bert(m)[1]), (1, m.config.vocab_size, bert(m)[1])),
           mergeable=True),
    Row.of("lora-bert-head", "bert-tiny",
           LoraConfig(rank=2, targets=["query"], also_train=(r"classifier\..*",)),
           lambda m: lora_count(2, (bert(m)[0], bert(m)[1], bert(m)[1])) + bert(m)[1] * 2 + 2, mergeable=True),
    Row.of("lora-llama-all-linear", "llama-tiny", LoraConfig(rank=2, targets="all-linear", dropout=0.1),
           lambda m: sum(
               2 * (k.shape[0] + k.shape[1])
               for p, k in nnx.iter_graph(m) if isinstance(k, nnx.Param) and p[-1] == "kernel" and "lm_head" not in p
           ), mergeable=True),
    # The patch convolution's fan-in is its window times its channels: 8 * 8 * 3.
    Row.of("lora-vit-conv", "vit-tiny", LoraConfig(rank=2, targets=["query", "value", "projection"]),
           lambda m: lora_count(2, (4, 32, 32), (1, 8 * 8 * 3, 32)), mergeable=True),
]


# Kernel methods beyond LoRA (IA3, DoRA, VeRA, QLoRA, LoRA+) and methods that
# only relabel parameters (BitFit, LN tuning, linear probe, full fine-tuning).
def llama(model):
    c = model.config
    return c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_key_value_heads * c.head_dim


BERT_IA3_TARGETS = r".*\.(key|value|layer\.\d+\.output\.dense)"  # not attention.output.dense
BERT_FFN_OUT = r".*\.layer\.\d+\.output\.dense"
TOY_ALL_LINEAR = ((8, 16, 16), (2, 16, 32), (2, 32, 16))  # (count, in, out) per kernel shape

ROWS += [
    # IA3: out_features per output-scaled layer, in_features per feed-forward (input-scaled) layer.
    Row.of("ia3-toy", "toy", peftjax.IA3Config(targets=["key", "value", "down"], feedforward=["down"]),
           lambda m: 2 * (16 + 16 + 32), mergeable=True),
    Row.of("ia3-bert", "bert-tiny", peftjax.IA3Config(targets=BERT_IA3_TARGETS, feedforward=BERT_FFN_OUT),
           lambda m: bert(m)[0] * (2 * bert(m)[1] + bert(m)[2]), mergeable=True),
    Row.of("ia3-llama", "llama-tiny",
           peftjax.IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
           lambda m: llama(m)[0] * (2 * llama(m)[3] + llama(m)[2]), mergeable=True),
    # DoRA: LoRA plus one magnitude per output unit.
    Row.of("dora-toy", "toy", peftjax.DoraConfig(rank=4, targets=["query", "value"]),
           lambda m: lora_count(4, (4, 16, 16)) + 4 * 16, mergeable=True),
    Row.of("dora-bert-dropout", "bert-tiny", peftjax.DoraConfig(rank=2, targets=["query", "value"], dropout=0.1),
           lambda m: lora_count(2, (2 * bert(m)[0], bert(m)[1], bert(m)[1])) + 2 * bert(m)[0] * bert(m)[1],
           mergeable=True),
    # VeRA: r + out per layer (the shared random matrices are buffers).
    Row.of("vera-toy-all-linear", "toy", peftjax.VeraConfig(rank=8, targets="all-linear"),
           lambda m: sum(n * (8 + d_out) for n, _, d_out in TOY_ALL_LINEAR), mergeable=True),
    # QLoRA: LoRA's count; the base is its 4-bit copy, so identity is against the quantised base.
    Row.of("qlora-toy-double-quant", "toy", peftjax.QLoraConfig(rank=4, targets="all-linear"),
           lambda m: lora_count(4, *TOY_ALL_LINEAR), identity_to_disabled=True),
    Row.of("qlora-bert-no-double-quant", "bert-tiny",
           peftjax.QLoraConfig(rank=2, targets=["query", "value"], double_quant=False),
           lambda m: lora_count(2, (2 * bert(m)[0], bert(m)[1], bert(m)[1])), identity_to_disabled=True),
    Row.of("loraplus-toy", "toy", LoraConfig(rank=4, targets=["query", "value"], loraplus_lr_ratio=16.0),
           lambda m: lora_count(4, (4, 16, 16)), mergeable=True),
    # AdaLoRA: A, B and r singular values per layer (E starts at zero: the identity).
    Row.of("adalora-toy", "toy", peftjax.AdaLoraConfig(init_rank=4, target_rank=2, total_steps=10,
                                                       targets=["query", "value"]),
           lambda m: lora_count(4, (4, 16, 16)) + 4 * 4, mergeable=True),
    # Relabelling only: nothing to merge, so merged == unmerged trivially.
    Row.of("bitfit-bert", "bert-tiny", peftjax.BitFitConfig(),
           # q k v o, FFN in and out, two LayerNorms per layer; embeddings LayerNorm, pooler, classifier
           lambda m: bert(m)[0] * (7 * bert(m)[1] + bert(m)[2]) + 2 * bert(m)[1] + 2, mergeable=True),
    Row.of("ln-tuning-bert", "bert-tiny", peftjax.LNTuningConfig(),
           lambda m: bert(m)[0] * 2 * 2 * bert(m)[1] + 2 * bert(m)[1], mergeable=True),
    Row.of("ln-tuning-llama", "llama-tiny", peftjax.LNTuningConfig(),
           lambda m: llama(m)[0] * 2 * llama(m)[1] + llama(m)[1], mergeable=True),  # RMSNorm: scale only
    Row.of("linear-probe-bert", "bert-tiny", peftjax.LinearProbeConfig(),
           lambda m: bert(m)[1] * 2 + 2, mergeable=True),
    Row.of("full-toy", "toy", peftjax.FullFineTuningConfig(),
           lambda m: 2 * (4 * (16 * 16 + 16) + (16 * 32 + 32) + (32 * 16 + 16) + 2 * 16) + 16 + 1, mergeable=True),
]


# Methods on insertion points: bottleneck adapters, prompt tuning, prefix tuning.
def bottleneck_count(per_layer, bottleneck=None, reduction=16):
    """per_layer adapters in each layer, each 2 d b + b + d (down and up, with biases)."""

    def count(m):
        d = m.config.hidden_size
        b = bottleneck or d // reduction
        return per_layer * m.config.num_hidden_layers * (2 * d * b + b + d)

    return count


def kv_dim(m):
    heads = getattr(m.config, "num_key_value_heads", None) or m.config.num_attention_heads
    return heads * m.config.head_dim


def prefix_count(n, projection_width=None):
    """Direct: L 2 N kv_dim. Reparameterised (width e): N kv + kv e + e + L (2 e kv + 2 kv)."""

    def count(m):
        layers, kv = m.config.num_hidden_layers, kv_dim(m)
        if projection_width is None:
            return layers * 2 * n * kv
        e = projection_width or kv
        return n * kv + kv * e + e + layers * (2 * e * kv + 2 * kv)

    return count


for _model in ("bert-tiny", "llama-tiny", "vit-tiny"):
    ROWS += [
        # Houlsby starts from adapter-transformers' "bert" init (W_up random), so not at the identity.
        Row.of(f"houlsby-{_model}", _model, peftjax.BottleneckConfig(variant="houlsby"), bottleneck_count(2),
               identity_at_init=False),
        Row.of(f"pfeiffer-{_model}", _model,
               peftjax.BottleneckConfig(variant="pfeiffer", bottleneck_size=4, non_linearity="gelu",
                                        init_weights="mam_adapter"),
               bottleneck_count(1, bottleneck=4)),
        Row.of(f"parallel-{_model}", _model, peftjax.BottleneckConfig(variant="parallel", reduction_factor=8),
               bottleneck_count(1, reduction=8)),
    ]
for _model in ("bert-tiny", "llama-tiny-cls"):
    ROWS += [
        Row.of(f"prompt-random-{_model}", _model, peftjax.PromptTuningConfig(num_virtual_tokens=4),
               lambda m: 4 * m.config.hidden_size, identity_at_init=False),
        Row.of(f"prompt-text-{_model}", _model,
               peftjax.PromptTuningConfig(num_virtual_tokens=5, init="text", init_text_ids=(11, 12, 13)),
               lambda m: 5 * m.config.hidden_size, identity_at_init=False),
    ]
for _model in ("bert-tiny", "llama-tiny"):
    ROWS += [
        Row.of(f"prefix-{_model}", _model, peftjax.PrefixTuningConfig(num_virtual_tokens=3),
               prefix_count(3), identity_at_init=False),
        Row.of(f"prefix-projection-{_model}", _model,
               peftjax.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16),
               prefix_count(3, projection_width=16), identity_at_init=False),
    ]


@pytest.fixture(params=ROWS, ids=lambda r: r.id)
def row(request):
    return request.param


# Prompt and prefix tuning (and Houlsby with its "bert" init) change the output from the start; exempt.
@pytest.fixture(params=[r for r in ROWS if r.identity_at_init], ids=lambda r: r.id)
def identity_row(request):
    return request.param


def build(row: Row):
    """The base model, its output, and the model with the row's methods applied (eval mode)."""
    model, inputs = MODELS[row.model]()
    model.eval()
    base_out = forward(model, inputs)
    base_count = row.trainable(model)
    for name, config in row.configs:
        peftjax.apply(model, config, adapter_name=name)
    model.eval()
    return model, inputs, base_out, base_count


def perturb_adapters(model, seed=0):
    """Non-zero adapter weights, so merge and save/load cannot pass trivially."""
    variables = [v for p, v in nnx.iter_graph(model) if isinstance(v, peftjax.AdapterParam)]
    for i, variable in enumerate(variables):
        noise = 0.05 * jax.random.normal(jax.random.key(seed + i), variable.shape, jnp.float32)
        variable[...] = variable[...] + noise.astype(variable.dtype)


def test_count_formula(row):
    model, _, _, expected = build(row)
    assert peftjax.count_params(model).trainable == expected


def test_identity_at_init(identity_row):
    row = identity_row
    model, inputs, base_out, _ = build(row)
    if row.identity_to_disabled:
        peftjax.disable_adapters(model)
        base_out = forward(model, inputs)
        peftjax.set_active_adapters(model, [name for name, _ in row.configs])
    np.testing.assert_allclose(forward(model, inputs), base_out, atol=TOLERANCE, rtol=0)


def test_merged_equals_unmerged(row):
    model, inputs, _, _ = build(row)
    perturb_adapters(model)
    unmerged = forward(model, inputs)
    if not row.mergeable:
        with pytest.raises(peftjax.PeftError, match="no merged form"):
            peftjax.merge(model)
        return
    peftjax.merge(model)
    np.testing.assert_allclose(forward(model, inputs), unmerged, atol=TOLERANCE, rtol=0)
    peftjax.unmerge(model)
    np.testing.assert_allclose(forward(model, inputs), unmerged, atol=TOLERANCE, rtol=0)


def test_save_load_round_trip(row, tmp_path):
    model, inputs, _, _ = build(row)
    perturb_adapters(model)
    expected = forward(model, inputs)
    peftjax.save_adapter(model, tmp_path / "adapter")
    fresh, _ = MODELS[row.model]()
    peftjax.load_adapter(fresh, tmp_path / "adapter")
    fresh.eval()
    np.testing.assert_allclose(forward(fresh, inputs), expected, atol=TOLERANCE, rtol=0)


def test_updates_only_trainable_state(row):
    model, inputs, base_out, _ = build(row)
    target = jax.random.normal(jax.random.key(9), base_out.shape)
    state = peftjax.TrainState.create(model, peftjax.make_optimizer(model, optax.adam(1e-2)))
    frozen_before = jax.tree.map(jnp.copy, state.frozen)
    trainable_before = jax.tree.map(jnp.copy, state.trainable)
    step = peftjax.make_train_step(lambda m, b: jnp.mean((forward(m, b[0]) - b[1]) ** 2))
    for _ in range(2):
        state, metrics = step(state, (inputs, target))
    assert jnp.isfinite(metrics["loss"])
    unchanged = jax.tree.map(lambda a, b: bool((a == b).all()), state.frozen, frozen_before)
    assert all(jax.tree.leaves(unchanged)), "frozen parameters are bitwise unchanged"
    moved = jax.tree.map(lambda a, b: bool((a != b).any()), state.trainable, trainable_before)
    assert all(jax.tree.leaves(moved)), "every trainable array moved within two steps"
    trainable_sizes = sum(a.size for a in jax.tree.leaves(state.trainable))
    assert trainable_sizes == peftjax.count_params(model).trainable


def test_jit_matches_eager(row):
    model, inputs, _, _ = build(row)
    perturb_adapters(model)
    eager = forward(model, inputs)
    jitted = nnx.jit(forward)(model, inputs)
    np.testing.assert_allclose(jitted, eager, atol=TOLERANCE, rtol=0)
