"""Gradual unfreezing, discriminative rates and the slanted triangular schedule on a toy
stack (embeddings, two dense blocks, a final norm, a head: five layer groups), driven as
the runner drives a label schedule: one compilation per stage, frozen groups bitwise
unchanged and without optimizer state until their stage, a group's state (Adam's step
count included) created when it starts training, one schedule count for the whole run."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peftjax
from peftjax import FROZEN
from peftjax.config import ConfigError, ScheduleConfig
from peftjax.core.labels import scheduled
from peftjax.core.paths import dotted
from peftjax.strategies.base import build_strategies, stage_optimizer, stage_starts, stages_at
from peftjax.train.schedules import slanted_triangular
from peftjax.train.session import RunInfo


class ToyTransformer(nnx.Module):
    """A transformer's layer groups with one dense layer per block: each stage's step
    compiles in a fraction of the time an attention block's would take."""

    output_head_names = ("head",)

    def __init__(self, *, rngs: nnx.Rngs):
        self.embeddings = nnx.Linear(16, 16, rngs=rngs)
        self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(2)])
        self.norm = nnx.LayerNorm(16, rngs=rngs)
        self.head = nnx.Linear(16, 2, rngs=rngs)

    def __call__(self, x_btd):
        x_btd = self.embeddings(x_btd)
        for layer in self.layers:
            x_btd = x_btd + jax.nn.gelu(layer(x_btd))
        return self.head(self.norm(x_btd).mean(axis=1))


GROUPS = ["embeddings", "layer.0", "layer.1", "final", "head"]
TRAIN_STEPS = 10


def toy_model() -> ToyTransformer:
    model = ToyTransformer(rngs=nnx.Rngs(0))
    peftjax.apply(model, peftjax.FullFineTuningConfig())
    return model


def loss_fn(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


@pytest.fixture(scope="module")
def batch():
    return jax.random.normal(jax.random.key(1), (8, 4, 16)), jnp.arange(8) % 2


def group_of(path: str, model) -> str:
    return next(g.name for g in peftjax.layer_groups(model) if any(path.startswith(p + ".") for p in g.paths))


def by_path(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.array(leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def dotted_leaves(tree) -> dict[str, np.ndarray]:
    return {dotted(p[:-1]): np.asarray(leaf) for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def params(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(state.model(), nnx.Param))}


def test_the_toy_has_five_groups():
    assert [g.name for g in peftjax.layer_groups(toy_model())] == GROUPS


@pytest.fixture(scope="module")
def unfreezing_run(batch):
    """Ten Adam steps with gradual unfreezing every two steps, from the head down,
    recorded after every step: the run's stage machinery, step by step."""
    model = toy_model()
    strategies = build_strategies([{"type": "gradual_unfreeze", "every": 2, "unit": "steps"}])
    info = RunInfo(config=None, total_steps=TRAIN_STEPS, steps_per_epoch=TRAIN_STEPS, batch_size=8, model=model)
    (starts,) = stage_starts(strategies, info)
    schedule = optax.linear_schedule(1e-2, 1e-3, TRAIN_STEPS)
    tx = scheduled(optax.adam(1.0), schedule, max_grad_norm=1.0)
    traces = []

    def counted_loss(model, batch):
        traces.append(1)
        return loss_fn(model, batch)

    step = peftjax.make_train_step(counted_loss)
    stages = stages_at([starts], 0)
    state = peftjax.TrainState.create(model, stage_optimizer(model, tx, strategies, stages, info))
    records = [{"params": params(state), "labels": dict(state.tx.labels), "opt": by_path(state.opt_state)}]
    for number in range(1, TRAIN_STEPS + 1):
        if stages_at([starts], number - 1) != stages:
            stages = stages_at([starts], number - 1)
            state = state.relabel(stage_optimizer(model, tx, strategies, stages, info))
            records[-1]["relabelled_opt"] = by_path(state.opt_state)
        state, _ = step(state, batch)
        records.append({"params": params(state), "labels": dict(state.tx.labels), "opt": by_path(state.opt_state)})
    return starts, len(traces), records


def test_one_compilation_per_stage_and_frozen_groups_bitwise_unchanged(unfreezing_run):
    starts, traces, records = unfreezing_run
    assert starts == (2, 4, 6, 8), "four more groups below the head, one every two steps"
    assert traces == 5, "the step compiled once per stage"
    model = toy_model()
    initial = records[0]["params"]
    for done, record in enumerate(records[1:], start=1):
        trained = set(GROUPS[len(GROUPS) - min(1 + (done - 1) // 2, 5):])  # the stage step `done` trained in
        for path, value in record["params"].items():
            group = group_of(path, model)
            label = record["labels"][path]
            assert (label != FROZEN) == (group in trained), (done, path)
            if group not in trained:
                assert np.array_equal(value, initial[path]), f"{path} moved at step {done} before its stage"
                assert not [k for k in record["opt"] if f"'trainable@{group}'" in k], "a frozen group has state"
    final = records[-1]["params"]
    assert all(not np.array_equal(final[p], initial[p]) for p in final if p.endswith("kernel"))


def test_a_group_gets_its_optimizer_state_when_it_starts_training(unfreezing_run):
    starts, _, records = unfreezing_run
    for start, group in zip(starts, reversed(GROUPS[:-1])):
        relabelled = records[start]["relabelled_opt"]  # the state made at the start of the group's stage
        own = {k: v for k, v in relabelled.items() if f"'trainable@{group}'" in k}
        counts = [v for k, v in own.items() if k.endswith(".count")]
        assert counts and all(int(c) == 0 for c in counts), "Adam's step count starts with the group"
        assert all(not np.any(np.asarray(v)) for k, v in own.items() if ".mu" in k or ".nu" in k)
        head_counts = [v for k, v in relabelled.items() if "'trainable@head'" in k and k.endswith(".count")]
        assert int(head_counts[0]) == start, "the head's state is carried"
        schedule_count = [v for k, v in relabelled.items() if "'trainable" not in k and k.endswith(".count")]
        assert [int(c) for c in schedule_count] == [start], "one schedule count for the whole run"


def test_discriminative_rates_scale_sgd_updates_by_factor_per_group_below_the_top(batch):
    model = toy_model()
    eta = 0.1
    plain = peftjax.make_optimizer(model, optax.sgd(eta))
    state = peftjax.TrainState.create(model, plain)
    grads = jax.jit(jax.grad(lambda t: loss_fn(nnx.merge(state.graphdef, t, state.frozen, state.rest), batch)))(
        state.trainable)
    reference, _ = jax.jit(plain.update)(grads, plain.init(state.trainable), state.trainable)
    strategies = build_strategies([{"type": "discriminative_lr", "head": 5.0}])
    optimizer = stage_optimizer(model, optax.sgd(eta), strategies, [0], info=None)
    assert set(optimizer.labels.values()) == {f"trainable@{g}" for g in GROUPS}
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(state.trainable), state.trainable)
    top = 3  # final is l = L = 3, the embeddings l = 0
    expected_factor = {g: 1 / 2.6 ** (top - level) for level, g in enumerate(GROUPS[:-1])} | {"head": 5.0}
    ours, theirs = dotted_leaves(updates), dotted_leaves(reference)
    assert ours.keys() == theirs.keys() and len(ours) == 10
    for path, value in ours.items():
        # Exact up to float32 rounding: XLA may fold eta and the factor into one scale first.
        factor = expected_factor[group_of(path, model)]
        np.testing.assert_allclose(value, theirs[path].astype(np.float64) * factor, rtol=3e-7, atol=0, err_msg=path)


def test_unfreezing_and_discriminative_rates_share_labels_and_multiply():
    model = toy_model()
    strategies = build_strategies([{"type": "gradual_unfreeze", "every": 1, "unit": "epochs", "start": 2},
                                   {"type": "discriminative_lr", "factor": 2.0, "head": 3.0}])
    optimizer = stage_optimizer(model, optax.sgd(1.0), strategies, [0, 0], info=None)
    assert sorted(set(optimizer.labels.values())) == ["frozen", "trainable@final", "trainable@head"]
    grads = {"head": {"bias": nnx.Param(jnp.ones(2)), "kernel": nnx.Param(jnp.ones((16, 2)))},
             "norm": {"bias": nnx.Param(jnp.ones(16)), "scale": nnx.Param(jnp.ones(16))}}
    updates, _ = optimizer.update(nnx.State(grads), optimizer.init(nnx.State(grads)))
    assert float(updates["head"]["bias"][0]) == -3.0 and float(updates["norm"]["scale"][0]) == -1.0


def test_global_clipping_uses_the_norm_of_every_label_together():
    model = toy_model()
    tx = scheduled(optax.sgd(1.0), 0.5, max_grad_norm=1.0)
    optimizer = stage_optimizer(model, tx, build_strategies([{"type": "discriminative_lr", "factor": 1.0}]), [0],
                                info=None)
    state = peftjax.TrainState.create(model, optimizer)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), state.trainable)
    norm = float(optax.tree.norm(grads))
    updates, _ = jax.jit(optimizer.update)(grads, optimizer.init(state.trainable), state.trainable)
    assert norm > 1.0
    assert all(np.allclose(np.asarray(u), -0.5 * 0.1 / norm, rtol=1e-6) for u in jax.tree.leaves(updates))


def test_slanted_triangular_matches_ulmfits_formula_and_is_a_schedule_choice():
    total, cut_frac, ratio, peak = 100, 0.1, 32.0, 0.01
    cut = int(total * cut_frac)
    schedule = slanted_triangular(peak, total, cut_frac=cut_frac, ratio=ratio)
    for t in [0, 1, 5, 9, 10, 11, 50, 99, 100]:
        p = t / cut if t < cut else 1 - (t - cut) / (cut * (1 / cut_frac - 1))
        assert float(schedule(t)) == pytest.approx(peak * (1 + p * (ratio - 1)) / ratio, rel=1e-6)
    assert float(schedule(cut)) == pytest.approx(peak) and float(schedule(total)) == pytest.approx(peak / ratio)
    assert ScheduleConfig(decay="slanted_triangular", cut_frac=0.2, ratio=8).to_dict()["decay"] == "slanted_triangular"
    with pytest.raises(ConfigError, match="warmup_steps: slanted_triangular rises over cut_frac"):
        ScheduleConfig(decay="slanted_triangular", warmup_steps=5)
    with pytest.raises(ConfigError, match=r"cut_frac: must be in \(0, 1\)"):
        ScheduleConfig(decay="slanted_triangular", cut_frac=1.5)


def test_counts_and_summary_follow_the_stage_labels():
    model = toy_model()
    strategies = build_strategies([{"type": "partial_freeze", "top": 2}, {"type": "discriminative_lr"}])
    labels = stage_optimizer(model, optax.sgd(1.0), strategies, [0, 0], info=None).labels
    sizes = {k: v.size for k, v in dotted_leaves(nnx.state(model, nnx.Param)).items()}
    top_two = sum(n for path, n in sizes.items() if path.startswith(("norm.", "head.")))
    assert peftjax.count_params(model, labels) == (top_two, sum(sizes.values()))
    table = peftjax.summary(model, labels)
    assert f"trainable params: {top_two:,} || all params: {sum(sizes.values()):,}" in table
    assert "layers.*" in table and "norm" in table


def test_stages_in_epochs_end_when_every_group_trains():
    model = toy_model()
    info = RunInfo(config=None, total_steps=1000, steps_per_epoch=30, batch_size=8, model=model)
    (strategy,) = build_strategies([{"type": "gradual_unfreeze", "every": 1, "unit": "epochs", "per_stage": 2}])
    assert strategy.stage_starts(info) == (30, 60), "five groups: the head, then two more per epoch"
    short = RunInfo(config=None, total_steps=50, steps_per_epoch=30, batch_size=8, model=model)
    assert strategy.stage_starts(short) == (30,), "a stage past the run's end is left out"
    with pytest.raises(peftjax.PeftError, match="gradual_unfreeze.start=6: ToyTransformer has 5 layer groups"):
        build_strategies([{"type": "gradual_unfreeze", "every": 1, "start": 6}])[0].stage_starts(info)
