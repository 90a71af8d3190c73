"""ResNet: peftjax equals transformers PyTorch in eval and train mode, gradients and
running statistics included, on tiny checkpoints built (and perturbed) by transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

import tiny_checkpoints  # tests/models helper (see its docstring)
from peftjax import models
from peftjax.core.paths import dotted
from peftjax.models.batch_norm import BatchNorm
from peftjax.models.layouts import checkpoint_names

ATOL = 1e-4  # max abs difference to transformers in float32

# Two tiny shapes covering every branch: basic and bottleneck layers, identity and
# projection shortcuts, the stride in the first or the middle bottleneck convolution.
CONFIGS = {
    "basic": dict(layer_type="basic", embedding_size=8, hidden_sizes=[8, 16, 24], depths=[1, 2, 1], num_labels=5),
    "bottleneck": dict(
        layer_type="bottleneck", embedding_size=8, hidden_sizes=[16, 32], depths=[2, 1], num_labels=5,
        downsample_in_first_stage=True, downsample_in_bottleneck=True,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    """name -> checkpoint folder; each test loads its own torch copy from it."""
    built = {}
    for index, (name, kwargs) in enumerate(CONFIGS.items()):
        torch.manual_seed(index)
        reference = transformers.ResNetForImageClassification(transformers.ResNetConfig(**kwargs))
        tiny_checkpoints.perturb_batch_norms(reference, index)
        folder = tmp_path_factory.mktemp(f"resnet-{name}")
        reference.save_pretrained(folder)
        built[name] = str(folder)
    return built


def reference_model(checkpoints, name: str, model_cls=transformers.ResNetForImageClassification):
    return model_cls.from_pretrained(checkpoints[name])


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(4, 3, 32, 32)).astype(np.float32)


def max_diff(ours, theirs: torch.Tensor) -> float:
    return float(np.abs(np.asarray(ours) - theirs.detach().numpy().reshape(np.shape(ours))).max())


@nnx.jit
def forward(model, pixel_values):
    return model(pixel_values)


def statistics_by_key(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every running statistic under its checkpoint key."""
    variables = dict(nnx.to_flat_state(nnx.state(model, nnx.BatchStat)))
    names, _ = checkpoint_names(model)
    return {key: np.asarray(variables[path].get_value()) for path, (key, _) in names.items() if path in variables}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eval_mode_matches_transformers(checkpoints, pixels, name):
    model, report = models.from_pretrained(checkpoints[name], output_loading_info=True)
    assert isinstance(model, models.ResNetForImageClassification)
    assert report.missing_keys == () and report.unexpected_keys == ()
    reference = reference_model(checkpoints, name).eval()
    ours = forward(model, jnp.asarray(pixels))
    with torch.no_grad():
        theirs = reference(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
    assert ours.logits.shape == (4, 5)
    assert max_diff(ours.logits, theirs.logits) < ATOL
    assert max_diff(ours.last_hidden_state, theirs.hidden_states[-1]) < ATOL


def test_base_model_matches_transformers(checkpoints, pixels):
    model = models.from_pretrained(checkpoints["bottleneck"], task="base")
    assert isinstance(model, models.ResNetModel) and model.get_input_embeddings() is None
    reference = reference_model(checkpoints, "bottleneck", transformers.ResNetModel).eval()
    ours = forward(model, jnp.asarray(pixels))
    with torch.no_grad():
        theirs = reference(pixel_values=torch.from_numpy(pixels))
    assert ours.logits is None and ours.pooler_output.shape == (4, 32)
    assert max_diff(ours.last_hidden_state, theirs.last_hidden_state) < ATOL
    assert max_diff(ours.pooler_output, theirs.pooler_output) < ATOL


def cross_entropy(model, pixels, labels):
    logits = model(pixels).logits
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@nnx.jit
def train_forward_and_grads(model, pixels, labels):
    return nnx.value_and_grad(cross_entropy)(model, pixels, labels)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_train_mode_outputs_gradients_and_statistics_match_transformers(checkpoints, pixels, name):
    """Two training-mode passes: the loss and every parameter's gradient on the second
    (batch statistics in use), and the running statistics after both (torch's
    unbiased-variance update and its counter)."""
    model = models.from_pretrained(checkpoints[name])
    model.train()
    reference = reference_model(checkpoints, name).train()
    labels = np.array([0, 3, 1, 4])
    x = torch.from_numpy(pixels)
    for scale in (1.0, 2.0):
        inputs = jnp.asarray(pixels * scale)
        loss, grads = train_forward_and_grads(model, inputs, jnp.asarray(labels))
        reference.zero_grad()
        their_loss = torch.nn.functional.cross_entropy(reference(pixel_values=x * scale).logits, torch.from_numpy(labels))
        their_loss.backward()
    assert abs(float(loss) - their_loss.item()) < ATOL

    their_params = dict(reference.named_parameters())
    names, _ = checkpoint_names(model)
    grad_leaves = dict(nnx.to_flat_state(grads))
    compared = 0
    for path, (key, layout) in names.items():
        if path not in grad_leaves:
            continue
        ours = np.asarray(grad_leaves[path].get_value())
        theirs = their_params[key].grad.numpy()
        theirs = {"linear": lambda a: a.T, "conv": lambda a: a.transpose(2, 3, 1, 0)}.get(layout, lambda a: a)(theirs)
        assert np.abs(ours - theirs).max() < ATOL, key
        compared += 1
    assert compared == len(their_params)

    their_buffers = dict(reference.named_buffers())
    stats = statistics_by_key(model)
    assert set(stats) == set(their_buffers)
    for key, ours in stats.items():
        assert np.abs(ours - their_buffers[key].numpy()).max() < ATOL, key
    assert all(int(stats[k]) == 9 for k in stats if k.endswith("num_batches_tracked"))  # 7 saved + 2 passes


def test_round_trip_through_transformers_keeps_statistics(checkpoints, pixels, tmp_path):
    model = models.from_pretrained(checkpoints["basic"])
    model.train()
    forward(model, jnp.asarray(pixels))  # moves every running statistic away from the checkpoint's
    model.eval()
    models.save_pretrained(model, tmp_path)
    reloaded, info = transformers.ResNetForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    buffers = dict(reloaded.named_buffers())
    for key, ours in statistics_by_key(model).items():
        assert np.array_equal(ours, buffers[key].numpy()), key
    with torch.no_grad():
        theirs = reloaded.eval()(pixel_values=torch.from_numpy(pixels))
    assert max_diff(forward(model, jnp.asarray(pixels)).logits, theirs.logits) < ATOL


def test_module_paths_and_layer_groups(checkpoints):
    model = models.from_pretrained(checkpoints["basic"])
    stage = model.resnet.encoder.stages[1].layers[0]
    assert stage.layer[0].convolution.kernel.shape == (3, 3, 8, 16)
    assert stage.shortcut.convolution.kernel.shape == (1, 1, 8, 16)
    assert model.resnet.encoder.stages[1].layers[1].shortcut is None  # identity shortcut
    assert model.classifier[1].kernel.shape == (24, 5)
    groups = model.layer_groups()
    assert [name for name, _ in groups] == ["stem", "stage1", "stage2", "stage3", "head"]
    # Every parameter and statistic lies in exactly one group, and the groups follow the input-to-output order.
    for path, _ in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        owners = [name for name, prefix in groups if dotted(path).startswith(prefix + ".")]
        assert len(owners) == 1, dotted(path)
    assert models.from_pretrained(checkpoints["basic"], task="base").layer_groups() == tuple(
        (name, prefix.removeprefix("resnet.")) for name, prefix in groups[:-1]
    )


def test_bad_input_and_config_are_clear_errors(checkpoints):
    model = models.from_pretrained(checkpoints["basic"])
    with pytest.raises(ValueError, match=r"expects \(batch, 3, height, width\)"):
        model(jnp.zeros((1, 32, 32, 3)))
    norm = BatchNorm(4, rngs=nnx.Rngs(0))  # as torch: a batch of one 1x1 map has no variance to estimate
    with pytest.raises(ValueError, match="more than one value per channel"):
        norm(jnp.zeros((1, 1, 1, 4)))
    with pytest.raises(ValueError, match="depths has 2"):
        models.ResNetConfig(hidden_sizes=(8, 16, 32), depths=(1, 1))
    with pytest.raises(ValueError, match="layer_type='wide'"):
        models.ResNetConfig(layer_type="wide")


def test_remat_changes_nothing(checkpoints, pixels):
    """Rematerialised residual layers: same loss, gradients and statistic updates."""
    results = []
    for remat in (False, True):
        model = models.from_pretrained(checkpoints["basic"], config_overrides={"remat": remat})
        model.train()
        loss, grads = train_forward_and_grads(model, jnp.asarray(pixels), jnp.asarray([0, 1, 2, 3]))
        results.append((loss, grads, nnx.state(model, nnx.BatchStat)))
    (loss_a, grads_a, stats_a), (loss_b, grads_b, stats_b) = results
    assert float(loss_a) == pytest.approx(float(loss_b), abs=1e-6)
    for a, b in zip(jax.tree.leaves((grads_a, stats_a)), jax.tree.leaves((grads_b, stats_b))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
