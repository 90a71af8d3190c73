"""Batch norms under freezing, on a tiny ResNet built by transformers.

The setting: a linear probe that also trains the last stage (the textbooks'
"fine-tune the top block"). Frozen batch norms (stem, stages 1-3) must use and
keep their running statistics; the last stage's must update theirs; the step
must equal PyTorch with the frozen batch norms switched to ``eval()`` (the
PyTorch recipe); adapters must carry exactly the statistics that changed.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

import tiny_checkpoints  # tests/models helper (see its docstring)
from peftjax import LinearProbeConfig, apply, load_adapter, make_optimizer, save_adapter
from peftjax.core.adapter_io import adapter_state
from peftjax.core.batch_stats import batch_norms
from peftjax.core.paths import dotted
from peftjax.models import from_pretrained
from peftjax.models.layouts import checkpoint_names
from peftjax.train.state import TrainState, make_train_step

ATOL = 1e-4
LEARNING_RATE = 0.1
STEPS = 3
LAST_STAGE = "resnet.encoder.stages.3."
RECIPE = LinearProbeConfig(also_train=(r"resnet\.encoder\.stages\.3\..*",))
HF_CONFIG = dict(layer_type="basic", embedding_size=8, hidden_sizes=[8, 16, 16, 24], depths=[1, 1, 1, 1], num_labels=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    reference = transformers.ResNetForImageClassification(transformers.ResNetConfig(**HF_CONFIG))
    tiny_checkpoints.perturb_batch_norms(reference, 0)
    folder = tmp_path_factory.mktemp("resnet-freezing")
    reference.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def batch() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"pixels": rng.normal(size=(6, 3, 32, 32)).astype(np.float32), "labels": rng.integers(0, 4, 6)}


def loss_fn(model, batch):
    logits = model(batch["pixels"]).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()


def snapshot(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every parameter and statistic, copied to the host (the step donates its buffers)."""
    return {dotted(p): np.array(v.get_value()) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Variable)}


def probe_model(checkpoint: str) -> nnx.Module:
    model = from_pretrained(checkpoint)
    model.train()
    return apply(model, RECIPE)


def train(checkpoint: str, batch, **optimizer_options):
    model = probe_model(checkpoint)
    before = snapshot(model)
    optimizer = make_optimizer(model, optax.sgd(LEARNING_RATE), **optimizer_options)
    state = TrainState.create(model, optimizer)
    step = make_train_step(loss_fn)
    inputs = {"pixels": jnp.asarray(batch["pixels"]), "labels": jnp.asarray(batch["labels"])}
    state, metrics = step(state, inputs)
    first = {"loss": float(metrics["loss"]), "after": snapshot(state.model())}
    for _ in range(STEPS - 1):
        state, _ = step(state, inputs)
    return {"model": model, "optimizer": optimizer, "state": state, "before": before, "first": first}


@pytest.fixture(scope="module")
def default_run(checkpoint, batch):
    return train(checkpoint, batch)


@pytest.fixture(scope="module")
def updating_run(checkpoint, batch):
    return train(checkpoint, batch, update_frozen_batch_stats=True)


def statistic_paths(snap: dict, *, last_stage: bool) -> list[str]:
    keys = [k for k in snap if k.endswith((".mean", ".var", ".num_batches_tracked"))]
    return [k for k in keys if k.startswith(LAST_STAGE) == last_stage]


def test_frozen_batch_norms_keep_their_statistics_bitwise(default_run):
    run = default_run
    norms = batch_norms(run["model"])
    assert run["optimizer"].fixed_batch_norms == {p for p in norms if not p.startswith(LAST_STAGE)}
    after = snapshot(run["state"].model())
    frozen_stats, trained_stats = statistic_paths(after, last_stage=False), statistic_paths(after, last_stage=True)
    assert len(frozen_stats) == 3 * 9 and len(trained_stats) == 3 * 3  # stem + 8 norms below, 3 in the last stage
    for path in frozen_stats:
        assert np.array_equal(after[path], run["before"][path]), path
    for path in trained_stats:
        if path.endswith("num_batches_tracked"):
            assert after[path] == run["before"][path] + STEPS
        else:
            assert not np.allclose(after[path], run["before"][path]), path
    # Frozen statistics sit with the frozen parameters: the step neither returns nor donates them.
    rest_paths = {dotted(p) for p, _ in nnx.to_flat_state(run["state"].rest)}
    frozen_paths = {dotted(p) for p, _ in nnx.to_flat_state(run["state"].frozen)}
    assert set(frozen_stats) <= frozen_paths and set(trained_stats) <= rest_paths
    # The model passed in is left as it was: its batch norms still follow its own mode.
    assert all(norm.use_running_average is False for norm in norms.values())


def test_the_option_keeps_updating_frozen_batch_norms(updating_run):
    run = updating_run
    assert run["optimizer"].fixed_batch_norms == frozenset()
    after = snapshot(run["state"].model())
    for path in statistic_paths(after, last_stage=False):
        if path.endswith("num_batches_tracked"):
            assert after[path] == run["before"][path] + STEPS
        else:
            assert not np.allclose(after[path], run["before"][path]), path
    # Only the statistics differ: the frozen parameters stay put either way.
    frozen_params = [p for p in after if p.endswith((".kernel", ".scale", ".bias")) and not p.startswith(
        (LAST_STAGE, "classifier."))]  # fmt: skip
    assert frozen_params and all(np.array_equal(after[p], run["before"][p]) for p in frozen_params)


def test_step_matches_pytorch_with_frozen_batch_norms_in_eval_mode(checkpoint, batch, default_run):
    """The first step: loss, every trained parameter's gradient (from the SGD update) and
    the updated running statistics equal PyTorch's, where the frozen batch norms are
    put in eval mode by hand."""
    reference = transformers.ResNetForImageClassification.from_pretrained(checkpoint).train()
    for name, module in reference.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d) and not name.startswith(LAST_STAGE):
            module.eval()
    logits = reference(pixel_values=torch.from_numpy(batch["pixels"])).logits
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(batch["labels"]))
    loss.backward()
    assert abs(default_run["first"]["loss"] - loss.item()) < ATOL

    before, after = default_run["before"], default_run["first"]["after"]
    names, _ = checkpoint_names(default_run["model"])
    params, buffers = dict(reference.named_parameters()), dict(reference.named_buffers())
    flip = {"linear": lambda a: a.T, "conv": lambda a: a.transpose(2, 3, 1, 0)}
    checked = 0
    for path, (key, layout) in names.items():
        name = dotted(path)
        if key in params and (name.startswith(LAST_STAGE) or name.startswith("classifier.")):
            ours = (before[name] - after[name]) / LEARNING_RATE
            theirs = flip.get(layout, lambda a: a)(params[key].grad.numpy())
            assert np.abs(ours - theirs).max() < ATOL, key
            checked += 1
        elif key in buffers:
            assert np.abs(after[name] - buffers[key].numpy()).max() < ATOL, key
    assert checked == len([k for k in params if k.startswith(LAST_STAGE) or k.startswith("classifier.")])


def test_adapter_holds_the_statistics_that_changed_and_reloads_the_model(checkpoint, batch, default_run, tmp_path):
    trained = default_run["state"].model()
    saved = adapter_state(trained)
    statistics = {k for k in saved if k.endswith((".mean", ".var", ".num_batches_tracked"))}
    assert statistics == set(statistic_paths(snapshot(trained), last_stage=True))
    save_adapter(trained, tmp_path / "adapter")
    reloaded = load_adapter(from_pretrained(checkpoint), tmp_path / "adapter")
    trained.eval()
    pixels = jnp.asarray(batch["pixels"])
    np.testing.assert_array_equal(np.asarray(reloaded(pixels).logits), np.asarray(trained(pixels).logits))


def test_updated_frozen_statistics_are_saved_and_survive_a_second_save(checkpoint, batch, updating_run, tmp_path):
    trained = updating_run["state"].model()
    save_adapter(trained, tmp_path / "first")
    reloaded = load_adapter(from_pretrained(checkpoint), tmp_path / "first")
    save_adapter(reloaded, tmp_path / "second")  # the reloaded model records which statistics it carries
    again = load_adapter(from_pretrained(checkpoint), tmp_path / "second")
    assert set(adapter_state(again)) == set(adapter_state(trained))
    assert len([k for k in adapter_state(trained) if k.endswith(".mean")]) == len(batch_norms(trained))
    trained.eval()
    pixels = jnp.asarray(batch["pixels"])
    np.testing.assert_array_equal(np.asarray(again(pixels).logits), np.asarray(trained(pixels).logits))

