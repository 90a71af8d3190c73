"""The analytic activation model against what JAX's differentiation actually keeps.

``jax``'s saved-residual listing (``jax.ad_checkpoint.print_saved_residuals`` prints it)
names every array the backward pass needs from the forward pass. Summed over the
arrays a step allocates (not the arguments, which are the model's own weights, and in
float32 not the constants, which are references to the frozen kernels), it must match
``analytic.activation_bytes`` for the methods the benchmark compares, on both model
families and in both precisions. Four small layers, so first-layer effects weigh more
here than in a 12- or 32-layer model.
"""

import dataclasses
import math

import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import peftjax
from peftjax.bench import analytic
from peftjax.bench.methods import method_config
from peftjax.models import from_config
from peftjax.models.bert import BertConfig
from peftjax.models.llama import LlamaConfig
from peftjax.train.tasks import loss_and_stats

saved_residuals = pytest.importorskip("jax._src.ad_checkpoint").saved_residuals

B, T, LAYERS = 2, 32, 4
CONFIGS = {
    "bert": BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                       intermediate_size=128, max_position_embeddings=128, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0),
    "llama": LlamaConfig(vocab_size=500, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128),
}  # fmt: skip


def kept_and_modelled(family: str, method: str, dtype) -> tuple[int, int]:
    causal = family == "llama"
    model = from_config(CONFIGS[family], num_labels=None if causal else 2, dtype=dtype)
    config = method_config(method, family)
    if hasattr(config, "variant"):
        config = dataclasses.replace(config, bottleneck_size=8)
    peftjax.apply(model, config)
    tx = peftjax.make_optimizer(model, optax.adamw(1e-4))
    state = peftjax.TrainState.create(model, tx)
    batch = {
        "input_ids": jnp.zeros((B, T), jnp.int32),
        "attention_mask": jnp.ones((B, T), jnp.int32),
        "labels": jnp.zeros((B, T) if causal else (B,), jnp.int32),
    }
    loss = loss_and_stats("causal_lm" if causal else "classification")

    def loss_of(trainable, rest):
        return loss(nnx.merge(state.graphdef, trainable, state.frozen, rest), batch)[0]

    def allocated(description: str) -> bool:
        references = ("argument", "literal") + (("constant",) if dtype == jnp.float32 else ())
        return not any(word in description for word in references)

    kept = sum(
        math.prod(aval.shape) * aval.dtype.itemsize
        for aval, description in saved_residuals(loss_of, state.trainable, state.rest)
        if allocated(description)
    )
    modelled = analytic.activation_bytes(
        state.model(), tx.labels, batch=B, seq=T, compute_dtype=dtype, param_dtype=jnp.float32, causal_lm=causal
    )["total"]
    return kept, modelled


@pytest.mark.parametrize(
    "family, method, dtype",
    [
        ("bert", "lora-r8", jnp.float32),
        ("bert", "full", jnp.float32),
        ("bert", "pfeiffer", jnp.float32),
        ("bert", "lora-r8", jnp.bfloat16),
        ("llama", "lora-r8", jnp.bfloat16),
        ("llama", "full", jnp.bfloat16),
        ("llama", "prefix", jnp.bfloat16),
        ("llama", "linear_probe", jnp.bfloat16),
    ],
    ids=lambda v: getattr(v, "__name__", str(v)),
)
def test_activation_model_matches_jax_saved_residuals(family, method, dtype):
    kept, modelled = kept_and_modelled(family, method, dtype)
    assert abs(modelled - kept) <= 0.05 * kept, f"modelled {modelled:,} vs kept {kept:,} ({modelled / kept:.3f})"
