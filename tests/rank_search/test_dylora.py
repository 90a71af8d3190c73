"""DyLoRA: the truncated adapter is a rank-b LoRA, only its b slots get gradients, one program for every b."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peftjax
from conftest import ToyStack
from peftjax.errors import PeftError
from peftjax.rank_search import DyLoraTrainStep, Member, build_batched_state, set_rank
from peftjax.rank_search.config import SweepConfig, SweepError
from peftjax.rank_search.cost import CompileClock
from peftjax.rank_search.dylora import truncated

MAX_RANK = 6
TEMPLATE = peftjax.LoraConfig(rank=1, alpha=3.0, rslora=True, targets=["query", "value"], also_train=(r"head\..*",))


def toy():
    return ToyStack(layers=1, rngs=nnx.Rngs(0))


def loss_fn(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def batch(seed: int = 1):
    x = jax.random.normal(jax.random.key(seed), (8, 4, 16))
    return {"x": x, "y": jnp.sin(3 * x.sum(-1, keepdims=True))}


@pytest.fixture(scope="module")
def trained():
    """A DyLoRA state after 12 steps (B non-zero), and the step that trained it."""
    state, _ = build_batched_state(toy(), TEMPLATE, [Member(MAX_RANK, 1e-2)], lambda lr: optax.adam(lr))
    step = DyLoraTrainStep(loss_fn, TEMPLATE, max_rank=MAX_RANK, seed=3)
    ranks = []
    with CompileClock() as clock:
        for i in range(12):
            state, metrics = step(state, batch(i))
            ranks.append(int(metrics["rank"][0]))
    return state, step, ranks, clock.seconds


def test_truncated_forward_equals_a_rank_b_lora_with_those_factors(trained):
    state = trained[0]
    model = state.member(0).model()
    x = batch(99)["x"]
    for rank in (1, 3, MAX_RANK):
        set_rank(model, rank, TEMPLATE)
        plain = toy()
        peftjax.apply(plain, dataclasses.replace(TEMPLATE, rank=rank))
        for name in ("query", "value"):
            ours, theirs = getattr(model.layers[0], name), getattr(plain.layers[0], name)
            theirs.lora_a[...] = ours.lora_a[...][..., :rank]
            theirs.lora_b[...] = ours.lora_b[...][:rank]
            assert float(ours.scale[...]) == pytest.approx(theirs.scale)  # alpha / sqrt(b): rsLoRA
        plain.head.kernel[...] = model.head.kernel[...]
        plain.head.bias[...] = model.head.bias[...]
        np.testing.assert_allclose(np.asarray(model(x)), np.asarray(plain(x)), atol=1e-6)
        assert np.abs(np.asarray(getattr(model.layers[0], "query").lora_b[...])[:rank]).max() > 1e-3


def test_only_the_first_b_slots_get_gradients(trained):
    state = trained[0]
    member = state.member(0)

    @jax.jit
    def gradients(trainable, rank):  # one program for both ranks, as in the step
        rest = truncated(member.rest, rank, TEMPLATE)
        return jax.grad(lambda t: loss_fn(nnx.merge(member.graphdef, t, member.frozen, rest), batch(7)))(trainable)

    for rank in (2, 5):
        grads = nnx.to_pure_dict(gradients(member.trainable, jnp.asarray(rank)))
        for name in ("query", "value"):
            g_a = np.asarray(grads["layers"][0][name]["lora_a"])
            g_b = np.asarray(grads["layers"][0][name]["lora_b"])
            assert not np.any(g_a[..., rank:]) and not np.any(g_b[rank:])
            assert np.all(np.abs(g_a[..., :rank]).max(axis=0) > 0) and np.all(np.abs(g_b[:rank]).max(axis=1) > 0)


def test_one_compiled_program_serves_every_sampled_rank(trained):
    _, step, ranks, compile_seconds = trained
    assert len(set(ranks)) >= 4 and all(1 <= r <= MAX_RANK for r in ranks)
    assert step._jitted._cache_size() == 1
    assert compile_seconds > 0  # the first step compiled, and nothing after it made a second program


def test_first_step_moves_only_the_sampled_slots(trained):
    """With Adam (no moments yet), step 1 changes exactly the first b slots of B (A's gradient
    is zero while B is). The fixture's step (its program) takes a fresh state."""
    step = trained[1]
    state, _ = build_batched_state(toy(), TEMPLATE, [Member(MAX_RANK, 1e-2)], lambda lr: optax.adam(lr))
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(state.member(0).trainable))
    state, metrics = step(state, batch())
    rank = int(metrics["rank"][0])
    assert rank == int(step.sampled_rank(jnp.asarray(0))) and rank < MAX_RANK  # some slots must stay still
    after = nnx.to_pure_dict(state.member(0).trainable)
    for name in ("query", "value"):
        moved_b = np.abs(np.asarray(after["layers"][0][name]["lora_b"]) - before["layers"][0][name]["lora_b"]).max(1)
        assert np.all(moved_b[:rank] > 0) and not np.any(moved_b[rank:])


def test_bad_dylora_input_is_refused():
    with pytest.raises(PeftError, match="max_rank must be a positive integer, got 0"):
        DyLoraTrainStep(loss_fn, TEMPLATE, max_rank=0)
    with pytest.raises(SweepError, match=r"sweep\.dylora\.max_rank: must be a positive integer"):
        SweepConfig.from_dict({"ranks": [1, 2], "searches": ["grid", "dylora"], "dylora": {"max_rank": 0}})
    with pytest.raises(SweepError, match=r"sweep\.dylora\.max_rank: 2 is below every swept rank"):
        SweepConfig.from_dict({"ranks": [4, 8], "searches": ["dylora"], "dylora": {"max_rank": 2}})
    with pytest.raises(PeftError, match=r"rank 7 is outside 1\.\.6"):
        state, _ = build_batched_state(toy(), TEMPLATE, [Member(MAX_RANK, 1e-2)], lambda lr: optax.sgd(lr))
        set_rank(state.member(0).model(), 7, TEMPLATE)
