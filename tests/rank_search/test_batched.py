"""K LoRA ranks in one jitted program: equal to K separate runs, base stored once."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import peftjax
from peftjax.models import from_config
from peftjax.rank_search import BatchedTrainStep, MaskedLoraLinear, Member, build_batched_state, member_factors
from peftjax.train.state import TrainState, make_train_step

STEPS = 20
TEMPLATE = peftjax.LoraConfig(rank=1, alpha=8.0, dropout=0.1, targets=["query", "value"],
                              also_train=(r"classifier\..*",))
# Different ranks, scales (alpha / r) and learning rates: all four are data in one program.
MEMBERS = [Member(1, 1e-2), Member(2, 5e-3), Member(4, 1e-2), Member(8, 2e-3)]


def tiny_bert():
    """bert-tiny cut to one layer (compiles fast); training mode, so dropout draws from each member's RNG."""
    model = from_config("bert-tiny", num_labels=2, num_hidden_layers=1, seed=0)
    model.train()
    return model


def make_tx(learning_rate: float) -> optax.GradientTransformation:
    """Clipping, a warmup-then-decay schedule and AdamW with weight decay: every part must act per member."""
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, 3), optax.linear_schedule(learning_rate, 0.1 * learning_rate, 17)],
        [3],
    )
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01))


def loss_fn(model, batch):
    logits = model(batch["input_ids"], batch["attention_mask"]).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def batches(count: int) -> list[dict[str, jax.Array]]:
    """Random token batches of 4 x 8 with padded tails (lengths 3 to 8)."""
    rng = np.random.default_rng(0)
    found = []
    for _ in range(count):
        lengths = rng.integers(3, 9, 4)
        found.append({
            "input_ids": jnp.asarray(rng.integers(0, 1000, (4, 8)), jnp.int32),
            "attention_mask": jnp.asarray(np.arange(8)[None, :] < lengths[:, None], jnp.int32),
            "labels": jnp.asarray(rng.integers(0, 2, 4), jnp.int32),
        })
    return found


def separate_run(member: Member, data) -> tuple[np.ndarray, dict, dict]:
    """The normal path: apply a rank-r LoRA, make_optimizer, TrainState, make_train_step."""
    model = tiny_bert()
    peftjax.apply(model, dataclasses.replace(TEMPLATE, rank=member.rank))
    state = TrainState.create(model, peftjax.make_optimizer(model, make_tx(member.learning_rate)))
    step = make_train_step(loss_fn)
    losses = []
    for batch in data:
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    trained = state.model()
    head = {"kernel": np.asarray(trained.classifier.kernel[...]), "bias": np.asarray(trained.classifier.bias[...])}
    return np.array(losses), member_factors(trained), head


@pytest.fixture(scope="module")
def four_ranks():
    """K=4 members before training, and XLA's memory analysis of their step. Compiling ahead of
    time fills the jit cache, so the training test below does not compile again."""
    data = batches(STEPS)
    state, counts = build_batched_state(tiny_bert(), TEMPLATE, MEMBERS, make_tx)
    step = BatchedTrainStep(loss_fn)
    memory = step.lower(state, data[0]).compile().memory_analysis()
    return {"data": data, "state": state, "counts": counts, "step": step, "memory": memory,
            "member_bytes": state.per_member_bytes(), "frozen_bytes": state.frozen_bytes()}


def test_batched_training_of_four_ranks_equals_four_separate_runs(four_ranks):
    data, state, counts, step = (four_ranks[k] for k in ("data", "state", "counts", "step"))
    losses = []
    for batch in data:
        state, metrics = step(state, batch)  # donates the fixture's state: nothing else uses it afterwards
        losses.append(np.asarray(metrics["loss"]))
    losses = np.stack(losses)  # (steps, K)
    assert losses.shape == (STEPS, len(MEMBERS))

    for index, member in enumerate(MEMBERS):
        own_losses, own_factors, own_head = separate_run(member, data)
        np.testing.assert_allclose(losses[:, index], own_losses, atol=1e-5, rtol=0)
        trained = state.member(index).model()
        batched_factors = member_factors(trained)
        assert set(batched_factors) == set(own_factors) and len(own_factors) == 2  # query, value of one layer
        for path, (a, b, scale) in own_factors.items():
            got_a, got_b, got_scale = batched_factors[path]
            assert got_a.shape == a.shape and got_b.shape == b.shape  # the member's own rank, unpadded
            assert got_scale == scale == TEMPLATE.alpha / member.rank
            np.testing.assert_allclose(got_a, a, atol=1e-5, rtol=0)
            np.testing.assert_allclose(got_b, b, atol=1e-5, rtol=0)
            assert np.abs(b).max() > 1e-3  # B really trained
        np.testing.assert_allclose(np.asarray(trained.classifier.kernel[...]), own_head["kernel"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(trained.classifier.bias[...]), own_head["bias"], atol=1e-5, rtol=0)
        # The padding beyond rank r never moved: masked out of the forward pass, so zero gradients.
        for path, wrapper in peftjax.iter_wrappers(trained):
            assert isinstance(wrapper, MaskedLoraLinear)
            assert not np.any(np.asarray(wrapper.lora_a[...])[..., member.rank :])
            assert not np.any(np.asarray(wrapper.lora_b[...])[member.rank :])
        assert counts[index].trainable == sum(a.size + b.size for a, b, _ in own_factors.values()) + 2 * 32 + 2


def test_memory_grows_with_members_by_their_own_state_never_by_the_base(four_ranks):
    """XLA's compiled memory analysis of the step: K=1 vs K=4 members at the same padded rank."""
    batch = four_ranks["data"][0]
    batch_bytes = sum(x.nbytes for x in batch.values())
    state, _ = build_batched_state(tiny_bert(), TEMPLATE, [Member(8, 1e-3)], make_tx)  # pads to 8 as K=4 does
    one = BatchedTrainStep(loss_fn).lower(state, batch).compile().memory_analysis()
    member_bytes, frozen_bytes = state.per_member_bytes(), state.frozen_bytes()
    four = four_ranks["memory"]
    assert member_bytes == four_ranks["member_bytes"] and frozen_bytes == four_ranks["frozen_bytes"]
    # One member: the base once, the member's state (adapters, head, Adam moments, RNG counters, scale,
    # mask, step) and the batch; nothing else is an argument.
    assert one.argument_size_in_bytes == frozen_bytes + member_bytes + batch_bytes
    # Three more members add exactly three members' state: the base is broadcast, not copied.
    assert four.argument_size_in_bytes - one.argument_size_in_bytes == 3 * member_bytes
    assert member_bytes < frozen_bytes / 4  # the test means something: the base dominates one member
    print(f"\nargument bytes K=1 {one.argument_size_in_bytes:,}, K=4 {four.argument_size_in_bytes:,} "
          f"(base {frozen_bytes:,}, per member {member_bytes:,}); temp K=1 {one.temp_size_in_bytes:,}, "
          f"K=4 {four.temp_size_in_bytes:,}")
