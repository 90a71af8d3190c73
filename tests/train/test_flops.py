"""Frozen weights cost no weight-gradient FLOPs: XLA's own count says so.

Counted on abstract shapes (nothing allocated): a 12-layer d=768 transformer
stack, LoRA(query, value, r=8) against full fine-tuning. With the base frozen
a step is about forward (2N) + activation gradients (2N) = 4N FLOPs per token
against full fine-tuning's 6N, so the ratio sits near 2/3.
"""

import jax
import jax.numpy as jnp
import optax
from conftest import ToyStack
from flax import nnx

import peftjax


def step_flops(method_config):
    def build():
        model = ToyStack(layers=12, d=768, d_ff=3072, rngs=nnx.Rngs(0))
        if method_config is not None:
            peftjax.apply(model, method_config)
            tx = peftjax.make_optimizer(model, optax.adamw(1e-4))
        else:
            tx = peftjax.make_optimizer(model, optax.adamw(1e-4), rules=[(nnx.Param, "full")])
        return peftjax.TrainState.create(model, tx)

    state = jax.eval_shape(build)
    batch = (jax.ShapeDtypeStruct((4, 64, 768), jnp.float32), jax.ShapeDtypeStruct((4, 64, 1), jnp.float32))
    step = peftjax.make_train_step(lambda model, b: jnp.mean((model(b[0]) - b[1]) ** 2))
    return step.lower(state, batch).compile().cost_analysis()["flops"]


def test_lora_step_flops_at_most_70_percent_of_full_fine_tuning():
    full = step_flops(None)
    lora = step_flops(peftjax.LoraConfig(rank=8, targets=["query", "value"]))
    ratio = lora / full
    # Full fine-tuning: forward (2N), input gradients (2N) and weight gradients (2N) per token.
    tokens, weights = 4 * 64, 12 * (4 * 768 * 768 + 2 * 768 * 3072) + 768
    assert full >= 6 * tokens * weights, "full fine-tuning counts forward, input and weight gradients"
    assert ratio <= 0.70, f"LoRA/full step FLOPs = {ratio:.3f}"
    assert ratio >= 0.60, f"LoRA/full = {ratio:.3f}: below 2/3 means work went missing"
