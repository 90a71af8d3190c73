"""The jitted step: trains the adapter, leaves frozen weights bitwise alone,
keeps no optimizer state for them, and proves it in XLA's own FLOP count."""

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

import peftjax
from peftjax import LoraConfig


def mse(model, batch):
    x, y = batch
    return jnp.mean((model(x) - y) ** 2)


def frozen_arrays(state):
    return jax.tree.map(lambda a: jnp.array(a, copy=True), state.frozen)


def test_twenty_adamw_steps_train_only_the_adapter(toy, toy_batch):
    peftjax.apply(toy, LoraConfig(rank=4, alpha=8, targets=["query", "value"]))
    tx = peftjax.make_optimizer(toy, optax.adamw(1e-2))
    state = peftjax.TrainState.create(toy, tx)
    frozen_before, adapter_before = frozen_arrays(state), jax.tree.map(jnp.copy, state.trainable)
    step = peftjax.make_train_step(mse)
    losses = []
    for _ in range(20):
        state, metrics = step(state, toy_batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.5 * losses[0]
    assert int(state.step) == 20
    changed = jax.tree.map(lambda a, b: bool((a != b).any()), state.trainable, adapter_before)
    assert all(jax.tree.leaves(changed)), "every adapter array moved"
    same = jax.tree.map(lambda a, b: bool((a == b).all()), state.frozen, frozen_before)
    assert all(jax.tree.leaves(same)), "every frozen array is bitwise unchanged"
    # Adam keeps mu and nu per trainable array and nothing for frozen ones.
    trainable_shapes = sorted(a.shape for a in jax.tree.leaves(state.trainable))
    moment_shapes = sorted(a.shape for a in jax.tree.leaves(state.opt_state) if a.ndim > 0)
    assert moment_shapes == sorted(trainable_shapes * 2)
    assert len(jax.tree.leaves(state.trainable)) == 2 * 2 * 2  # 2 layers x (query, value) x (A, B)
    # The model rebuilt from the state computes with the trained adapter.
    assert jnp.allclose(mse(state.model(), toy_batch), step.loss_fn(state.model(), toy_batch))
    # The original model object is still usable: the step donated copies, not its arrays.
    assert jnp.isfinite(toy(toy_batch[0])).all()


def test_label_rules_cover_every_parameter(toy):
    peftjax.apply(toy, LoraConfig(rank=2, targets=["query"], also_train=(r"head\..*",)))
    labels = peftjax.param_labels(toy)
    assert labels["head.kernel"] == "trainable"
    assert labels["layers.0.query.lora_a"] == "adapter" and labels["layers.0.query.base.kernel"] == "frozen"
    custom = [(r"layers\.0\..*", "layer0"), (peftjax.AdapterParam, "adapter")]
    with pytest.raises(peftjax.PeftError, match=r"parameter layers\.1\.\S+ \(Param\) is covered by no label rule"):
        peftjax.param_labels(toy, custom)
    labels = peftjax.param_labels(toy, [*custom, (nnx.Param, "frozen")])
    assert set(labels.values()) == {"layer0", "adapter", "frozen"}
    assert labels["head.kernel"] == "frozen", "the caller's rules come first, its catch-all included"


def test_per_label_multipliers_and_transforms(toy, toy_batch):
    """A label with a learning-rate multiplier moves exactly that much faster (SGD)."""
    peftjax.apply(toy, LoraConfig(rank=2, targets=["query"]))
    rules = [(r".*lora_b", "lora_b"), (nnx.Param, "frozen")]
    plain = peftjax.TrainState.create(toy, peftjax.make_optimizer(toy, optax.sgd(0.1), rules=rules))
    fast = peftjax.TrainState.create(
        toy, peftjax.make_optimizer(toy, optax.sgd(0.1), rules=rules, lr_multipliers={"lora_b": 4.0})
    )
    step = peftjax.make_train_step(mse)
    moved = []
    for state in (plain, fast):
        start = jax.tree.map(jnp.copy, state.trainable)
        state, _ = step(state, toy_batch)
        state, _ = step(state, toy_batch)  # B is zero at step 0; the second step moves A too
        moved.append(jax.tree.map(lambda a, b: jnp.abs(a - b).sum(), state.trainable, start))
    b_ratio = moved[1]["layers"][0]["query"]["lora_b"][...] / moved[0]["layers"][0]["query"]["lora_b"][...]
    assert b_ratio > 3.0  # first step: exactly 4x; second depends on the first
    with pytest.raises(peftjax.PeftError, match="name labels no parameter has: \\['lora_c'\\]"):
        peftjax.make_optimizer(toy, optax.sgd(0.1), lr_multipliers={"lora_c": 2.0})


def test_optimizer_over_the_whole_model_keeps_no_state_for_frozen(toy):
    """The partition works on the full parameter tree too (nnx.Optimizer style):
    frozen labels go to set_to_zero, which has no state."""
    peftjax.apply(toy, LoraConfig(rank=2, targets=["value"]))
    tx = peftjax.make_optimizer(toy, optax.adam(1e-3))
    params = nnx.state(toy, nnx.Param)
    opt_state = tx.init(params)
    arrays = [a for a in jax.tree.leaves(opt_state) if a.ndim > 0]
    assert sum(a.size for a in arrays) == 2 * peftjax.count_params(toy).trainable
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, opt_state, params)
    labels = peftjax.param_labels(toy)
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        name = peftjax.core.paths.dotted(path[:-1])
        assert bool((update == 0).all()) == (labels[name] == "frozen"), name


def test_dropout_rng_advances_through_the_step(toy, toy_batch):
    peftjax.apply(toy, LoraConfig(rank=2, targets=["query"], dropout=0.5))
    state = peftjax.TrainState.create(toy, peftjax.make_optimizer(toy, optax.sgd(0.1)))
    step = peftjax.make_train_step(mse)
    counts = []
    for _ in range(2):
        state, _ = step(state, toy_batch)
        counts.append([int(a) for a in jax.tree.leaves(state.rest) if a.dtype == jnp.uint32])
    assert counts[0] and counts[1] != counts[0], "the dropout stream's counter moved"


def test_a_state_on_one_device_fed_mesh_batches_compiles_the_step_once(toy, toy_batch):
    """The step's outputs live on the batch's mesh; the state is placed there up
    front so that the second step does not see new shardings and compile again."""
    from jax.sharding import NamedSharding, PartitionSpec

    from peftjax.train.sharding import BATCH_AXES, make_mesh

    peftjax.apply(toy, LoraConfig(rank=4, alpha=8, targets=["query", "value"]))
    state = peftjax.TrainState.create(toy, peftjax.make_optimizer(toy, optax.adamw(1e-2)))
    mesh = make_mesh()
    batch = jax.device_put(toy_batch, NamedSharding(mesh, PartitionSpec(BATCH_AXES)))
    step = peftjax.make_train_step(mse)
    for _ in range(3):
        state, _ = step(state, batch)
    assert int(state.step) == 3
    assert step._jitted._cache_size() == 1, "the step compiled more than once"
    assert state.step.sharding.mesh == mesh


def test_compiler_options_reach_xla(toy, toy_batch):
    peftjax.apply(toy, LoraConfig(rank=4, alpha=8, targets=["query", "value"]))
    state = peftjax.TrainState.create(toy, peftjax.make_optimizer(toy, optax.adamw(1e-2)))
    with pytest.raises(Exception, match="no_such_xla_option"):
        peftjax.make_train_step(mse, compiler_options={"no_such_xla_option": 1})(state, toy_batch)
    state, metrics = peftjax.make_train_step(mse, compiler_options={"xla_backend_optimization_level": 1})(state, toy_batch)
    assert int(state.step) == 1 and jnp.isfinite(metrics["loss"])
