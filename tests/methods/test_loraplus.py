"""LoRA+: B's parameters get their own label and ratio times A's learning rate."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peftjax
from peftjax import LoraConfig, PeftError
from peftjax.methods.lora import LORAPLUS_B_LABEL

RATIO = 16.0


def first_updates(config, batch):
    """The optimizer's first updates (before they are added to the parameters),
    from the same model, batch and gradients whatever the config's ratio."""
    from conftest import ToyStack

    model = ToyStack(rngs=nnx.Rngs(0))
    peftjax.apply(model, config)
    for i, (_, wrapper) in enumerate(peftjax.iter_wrappers(model)):
        # Non-zero B, so that A's gradient is not zero either.
        wrapper.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(i), wrapper.lora_b.shape)
    optimizer = peftjax.make_optimizer(model, optax.sgd(0.1))
    state = peftjax.TrainState.create(model, optimizer)
    x, y = batch

    def loss(trainable):
        model = nnx.merge(state.graphdef, trainable, state.frozen, state.rest)
        return jnp.mean((model(x) - y) ** 2)

    grads = jax.grad(loss)(state.trainable)
    updates, _ = optimizer.update(grads, state.opt_state, state.trainable)
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(updates)}, optimizer.labels


def test_first_update_of_b_is_ratio_times_plain_and_a_is_unchanged(toy_batch):
    plain, _ = first_updates(LoraConfig(rank=4, targets=["query", "value"]), toy_batch)
    plus, labels = first_updates(LoraConfig(rank=4, targets=["query", "value"], loraplus_lr_ratio=RATIO), toy_batch)
    assert plain.keys() == plus.keys() and len(plain) == 8  # 2 layers x (query, value) x (A, B)
    for path, update in plain.items():
        assert np.abs(update).max() > 0
        if path[-1] == "lora_b":
            np.testing.assert_array_equal(plus[path], update * RATIO)
        else:
            np.testing.assert_array_equal(plus[path], update)
    assert sorted(set(labels.values())) == ["adapter", "frozen", LORAPLUS_B_LABEL]
    assert {p.rsplit(".", 1)[-1] for p, label in labels.items() if label == LORAPLUS_B_LABEL} == {"lora_b"}


def test_config():
    config = LoraConfig(targets=["query"], loraplus_lr_ratio=RATIO)
    assert config.lr_multipliers() == {LORAPLUS_B_LABEL: RATIO}
    assert LoraConfig(targets=["query"]).lr_multipliers() == {}
    assert peftjax.config_from_dict(config.to_dict()) == config
    with pytest.raises(PeftError, match="loraplus_lr_ratio"):
        LoraConfig(targets=["query"], loraplus_lr_ratio=0.0)


def test_an_inactive_loraplus_adapter_does_not_break_the_optimizer(toy):
    """With its adapter inactive, no parameter carries LoRA+'s label: the
    method's multiplier goes unused instead of being an error."""
    peftjax.apply(toy, LoraConfig(rank=2, targets=["query"], loraplus_lr_ratio=RATIO), adapter_name="plus")
    peftjax.apply(toy, peftjax.IA3Config(targets=["key"]), adapter_name="ia3")
    peftjax.set_active_adapters(toy, ["ia3"])
    optimizer = peftjax.make_optimizer(toy, optax.sgd(0.1))
    assert LORAPLUS_B_LABEL not in optimizer.labels.values()
    with pytest.raises(PeftError, match="no parameter has"):
        peftjax.make_optimizer(toy, optax.sgd(0.1), lr_multipliers={LORAPLUS_B_LABEL: 2.0})
