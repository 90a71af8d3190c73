"""Run under XLA_FLAGS=--xla_force_host_platform_device_count=8 by test_sharding.py.

Trains bert-tiny + LoRA for 10 steps on one device, data-parallel over 8, and
FSDP (2 x 4), and prints the losses and final adapters as JSON; also one step
with 4 accumulated micro-batches against one step on the whole batch.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

import peftjax
from peftjax.models import from_config
from peftjax.train.sharding import global_batch, make_mesh, parameter_specs
from peftjax.train.tasks import loss_and_stats

loss_fn = loss_and_stats("classification")


def fresh_state():
    model = from_config("bert-tiny", num_labels=2, seed=0)
    peftjax.apply(model, peftjax.LoraConfig(rank=4, alpha=8, targets=["query", "value"]))
    model.eval()  # no dropout: the three layouts must see the same computation
    return peftjax.TrainState.create(model, peftjax.make_optimizer(model, optax.adamw(1e-2)))


def batches(count, size=32):
    """One fixed batch, repeated: the loss must fall as the adapter fits it."""
    for _ in range(count):
        rng = np.random.default_rng(0)
        yield {
            "input_ids": rng.integers(3, 1000, (size, 16)).astype(np.int32),
            "attention_mask": (rng.random((size, 16)) > 0.2).astype(np.int32),
            "labels": rng.integers(0, 2, size).astype(np.int32),
        }


def adapter_of(state):
    return {k: np.asarray(v).tolist() for k, v in peftjax.core.adapter_io.adapter_state(state.model()).items()}


def train(mesh, *, grad_accum=1, steps=10):
    """The losses, the adapter after the first step and after the last, and the final state."""
    state = fresh_state().on_mesh(mesh)
    step = peftjax.make_train_step(loss_fn, grad_accum=grad_accum)
    losses = []
    for batch in batches(steps):
        state, metrics = step(state, global_batch(batch, mesh))
        losses.append(float(metrics["loss"]))
        if len(losses) == 1:
            first_adapter = adapter_of(state)
    return losses, first_adapter, adapter_of(state), state


def main():
    assert jax.device_count() == 8, jax.devices()
    single_mesh = make_mesh(devices=jax.devices()[:1])
    fsdp_mesh = make_mesh(fsdp=4)
    # The single-device run's first step is also the reference for accumulation: one step on the whole batch.
    single, whole_adapter, single_adapter, _ = train(single_mesh)
    whole = single[:1]
    data_parallel, _, dp_adapter, _ = train(make_mesh())
    fsdp, _, fsdp_adapter, fsdp_state = train(fsdp_mesh)
    specs = parameter_specs(fsdp_state.model(), fsdp_mesh)
    accumulated, _, accumulated_adapter, _ = train(make_mesh(), grad_accum=4, steps=1)
    kernel = "bert.encoder.layer.0.attention.self.query.base.kernel"
    lora_a = "bert.encoder.layer.0.attention.self.query.lora_a"
    json.dump({
        "single": single, "data_parallel": data_parallel, "fsdp": fsdp,
        "adapter_gap_dp": max(np.abs(np.array(single_adapter[k]) - np.array(dp_adapter[k])).max() for k in single_adapter),
        "adapter_gap_fsdp": max(np.abs(np.array(single_adapter[k]) - np.array(fsdp_adapter[k])).max() for k in single_adapter),
        "accumulation_gap": max(np.abs(np.array(whole_adapter[k]) - np.array(accumulated_adapter[k])).max()
                                for k in whole_adapter),
        "whole_loss": whole[0], "accumulated_loss": accumulated[0],
        "kernel_spec": str(specs[kernel]), "lora_a_spec": str(specs[lora_a]),
        "kernel_sharding": str(fsdp_state.frozen["bert"]["encoder"]["layer"][0]["attention"]["self"]["query"]["base"]["kernel"].get_value().sharding.spec),
        "replicated": str(PartitionSpec()),
    }, sys.stdout)


if __name__ == "__main__":
    main()
