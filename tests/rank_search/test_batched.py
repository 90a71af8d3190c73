"""K LoRA ranks in one jitted program: equal to K separate runs, base stored once."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

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


# ----------------------------------------------------------------------------
# Every optimizer the runner builds: batched members equal their separate runs.
# ----------------------------------------------------------------------------

TOY_TEMPLATE = peftjax.LoraConfig(rank=1, alpha=4.0, targets=["query", "value"], also_train=(r"head\..*",))
TOY_MEMBERS = [Member(1, 3e-2), Member(8, 1e-2)]  # rank 1 padded to 8: Adafactor's block RMS would see 1/8 of it
TOY_STEPS = 8


def toy_config(optimizer: str):
    from peftjax.config import ExperimentConfig

    return ExperimentConfig.from_dict({
        "model": {"name": "bert-tiny"}, "data": {"source": "synthetic:sentiment", "task": "classification"},
        "train": {"batch_size": 8, "steps": TOY_STEPS},
        "optim": {"name": optimizer, "weight_decay": 0.01, "momentum": 0.9, "max_grad_norm": 0.5},
        "schedule": {"warmup_steps": 2, "decay": "linear"},
    })


def toy_make_tx(optimizer: str, adafactor):
    from peftjax.train import runner

    config = toy_config(optimizer)
    return lambda lr: runner.build_optimizer(
        dataclasses.replace(config, optim=dataclasses.replace(config.optim, learning_rate=lr)), TOY_STEPS,
        adafactor=adafactor)


def toy_loss(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def toy_batches():
    x = jax.random.normal(jax.random.key(1), (TOY_STEPS, 8, 4, 16))
    return [{"x": x[i], "y": jnp.sin(3 * x[i].sum(-1, keepdims=True))} for i in range(TOY_STEPS)]


def toy_separate_run(make_tx, member: Member, data) -> dict:
    from conftest import ToyStack

    model = ToyStack(layers=1, rngs=nnx.Rngs(0))
    peftjax.apply(model, dataclasses.replace(TOY_TEMPLATE, rank=member.rank))
    state = TrainState.create(model, peftjax.make_optimizer(model, make_tx(member.learning_rate)))
    step = make_train_step(toy_loss)
    for batch in data:
        state, _ = step(state, batch)
    return member_factors(state.model())


def toy_batched_run(make_tx, data) -> list[dict]:
    from conftest import ToyStack

    state, _ = build_batched_state(ToyStack(layers=1, rngs=nnx.Rngs(0)), TOY_TEMPLATE, TOY_MEMBERS, make_tx)
    step = BatchedTrainStep(toy_loss)
    for batch in data:
        state, _ = step(state, batch)
    return [member_factors(state.member(i).model()) for i in range(len(TOY_MEMBERS))]


def largest_difference(first: dict, second: dict) -> float:
    assert set(first) == set(second)
    return max(float(np.abs(first[m][k] - second[m][k]).max()) for m in first for k in (0, 1))


# AdamW (with clipping, weight decay, a schedule and dropout) is the bert-tiny test's above.
@pytest.mark.parametrize("optimizer", ["adam", "sgd", "adafactor", "lion"])
def test_batched_members_equal_separate_runs_under_every_optimizer(optimizer):
    """The runner's optimizers as OptimConfig builds them: clipping on (global norm 0.5), warmup
    and decay, weight decay where the optimizer has it."""
    from peftjax.rank_search.batched import member_adafactor

    data = toy_batches()
    batched = toy_batched_run(toy_make_tx(optimizer, member_adafactor), data)
    for member, got in zip(TOY_MEMBERS, batched):
        own = toy_separate_run(toy_make_tx(optimizer, optax.adafactor), member, data)
        # float32 round-off, which Adam's normalisation can raise to ~1e-5 over 8 steps; Adafactor's
        # padded block RMS moves a member by more than 1e-3 (the next test).
        assert largest_difference(got, own) < 5e-5, (optimizer, member)
        assert max(float(np.abs(b).max()) for _, b, _ in own.values()) > 1e-5  # B moved (Adafactor: relative steps)


def test_adafactor_needs_each_members_own_block_rms():
    """optax.adafactor in the batched program takes the padded arrays' RMS: rank 1 moves differently."""
    data = toy_batches()
    batched = toy_batched_run(toy_make_tx("adafactor", optax.adafactor), data)
    own = toy_separate_run(toy_make_tx("adafactor", optax.adafactor), TOY_MEMBERS[0], data)
    assert largest_difference(batched[0], own) > 1e-3


def test_member_adafactor_is_optax_adafactor_when_every_entry_is_the_members():
    """Before ``build_batched_state`` sets a rank, every entry counts: the same updates as optax's."""
    from peftjax.rank_search.batched import member_adafactor

    params = {"lora_a": jnp.linspace(-1, 1, 48).reshape(16, 3), "head": jnp.linspace(0, 2, 200).reshape(200, 1),
              "big": jnp.linspace(-3, 1, 130 * 140).reshape(130, 140)}  # factored: two axes of at least 128
    grads = jax.tree.map(lambda p: jnp.cos(7 * p) + 0.1, params)

    def three_updates(tx):
        state, updates, update_fn = tx.init(params), [], jax.jit(tx.update)
        for _ in range(3):
            update, state = update_fn(grads, state, params)
            updates.append(update)
        return updates

    for ours, theirs in zip(three_updates(member_adafactor(1e-2)), three_updates(optax.adafactor(1e-2))):
        for key in params:
            np.testing.assert_allclose(ours[key], theirs[key], rtol=1e-6, atol=1e-9)
