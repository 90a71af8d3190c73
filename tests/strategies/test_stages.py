"""A label schedule on a toy model: a new stage relabels the state, compiles the step
once, leaves what stayed frozen bitwise alone and gives a newly trainable group its
optimizer state at that moment and not before."""

import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import ToyStack
from flax import nnx

import peftjax
from peftjax import FROZEN, LoraConfig

LORA_FROZEN = [(r".*\.lora_[ab]", FROZEN)]


def by_path(tree) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(path): jnp.copy(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_relabelling_carries_moments_and_creates_state_only_for_new_groups(toy_batch):
    model = ToyStack(rngs=nnx.Rngs(0))
    peftjax.apply(model, LoraConfig(rank=2, targets=["query"], also_train=(r"head\..*",)))
    traces = []

    def loss(model, batch):
        traces.append(1)  # once per compilation of the step
        x, y = batch
        return jnp.mean((model(x) - y) ** 2)

    tx = optax.adam(1e-2)
    state = peftjax.TrainState.create(model, peftjax.make_optimizer(model, tx, overrides=LORA_FROZEN))
    step = peftjax.make_train_step(loss)
    assert set(state.tx.labels.values()) == {"trainable", FROZEN}
    moments = [a for a in jax.tree.leaves(state.opt_state) if a.ndim]
    assert sorted(a.shape for a in moments) == sorted([a.shape for a in jax.tree.leaves(state.trainable)] * 2)
    lora_before = {k: jnp.copy(v) for k, v in peftjax.core.adapter_io.adapter_state(state.model()).items()
                   if "lora" in k}
    for _ in range(3):
        state, _ = step(state, toy_batch)
    head_moments = by_path(state.opt_state.inner_states["trainable"].inner_state)

    unfrozen = state.relabel(peftjax.make_optimizer(model, tx))
    assert int(unfrozen.step) == 3 and set(unfrozen.tx.labels.values()) == {"trainable", "adapter", FROZEN}
    lora_after = {k: v for k, v in peftjax.core.adapter_io.adapter_state(unfrozen.model()).items() if "lora" in k}
    assert lora_after.keys() == lora_before.keys()
    assert all(bool((lora_after[k] == lora_before[k]).all()) for k in lora_before), "frozen LoRA moved"
    carried = by_path(unfrozen.opt_state.inner_states["trainable"].inner_state)
    assert len(head_moments) == 5 and head_moments.keys() <= carried.keys()  # count, mu and nu of kernel and bias
    assert all(bool((carried[k] == v).all()) for k, v in head_moments.items()), "the head's Adam state is carried"
    adapter_state = unfrozen.opt_state.inner_states["adapter"].inner_state
    assert int(adapter_state[0].count) == 0, "the new group's state starts now"
    assert all(bool((a == 0).all()) for a in jax.tree.leaves(adapter_state[0].mu))

    for _ in range(2):
        unfrozen, _ = step(unfrozen, toy_batch)
    assert len(traces) == 2, "one compilation per stage"
    moved = {k: v for k, v in peftjax.core.adapter_io.adapter_state(unfrozen.model()).items() if k.endswith("lora_b")}
    assert all(bool((v != 0).any()) for v in moved.values()), "LoRA trains from its stage on"


def test_overrides_win_over_method_rules_and_keep_the_catch_all(toy):
    peftjax.apply(toy, LoraConfig(rank=2, targets=["query"]))
    labels = peftjax.param_labels(toy, overrides=[(r"layers\.0\..*", FROZEN), (r"head\..*", "head")])
    assert labels["layers.0.query.lora_a"] == FROZEN and labels["layers.1.query.lora_a"] == "adapter"
    assert labels["head.kernel"] == "head" and labels["layers.1.query.base.kernel"] == FROZEN
    with pytest.raises(peftjax.PeftError, match="name labels no parameter has"):
        peftjax.make_optimizer(toy, optax.sgd(1.0), overrides=LORA_FROZEN, lr_multipliers={"adapter": 2.0})
