"""The domain-adaptation strategies: gradient reversal and its schedule exactly, MMD
against a float64 reference (values and gradients), the pseudo-label selection,
density ratios on a shift with known densities, target labels that never reach a
loss, and the four strategies together in runs of a tiny BERT that an
interruption does not change (their memory and counters are checkpointed)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import yaml
from flax import nnx
from safetensors.numpy import load_file

import peftjax
from peftjax.cli import _load
from peftjax.config import ConfigError, ExperimentConfig
from peftjax.errors import PeftError
from peftjax.models.common import ModelOutput
from peftjax.strategies.base import attach_modules, build_strategies, step_loss
from peftjax.strategies.dann import reversal_schedule, reverse_gradient
from peftjax.strategies.pseudo_label import balanced_selection
from peftjax.strategies.target_domain import check_label_sets
from peftjax.train.runner import run
from peftjax.train.session import RunInfo
from peftjax.transfer.divergence import MMD_SCALES, density_ratios, gaussian_mmd2

# --------------------------------------------------------------------------
# Gradient reversal.
# --------------------------------------------------------------------------


def test_gradient_reversal_is_the_identity_forward_and_minus_lambda_g_backward():
    x = jax.random.normal(jax.random.key(0), (5, 7))
    g = jax.random.normal(jax.random.key(1), (5, 7))
    scale = jnp.float32(0.37)
    y, pullback = jax.vjp(reverse_gradient, x, scale)
    assert np.array_equal(np.asarray(y), np.asarray(x))
    dx, dscale = pullback(g)
    assert np.array_equal(np.asarray(dx), np.asarray(-scale * g)) and float(dscale) == 0.0
    # Through a loss: d/dx f(R(x)) = -lambda * f'(x), bit for bit.
    f = lambda v: jnp.sum(jnp.sin(v) * v)  # noqa: E731
    reversed_grad = jax.grad(lambda v: f(reverse_gradient(v, scale)))(x)
    assert np.array_equal(np.asarray(reversed_grad), np.asarray(-scale * jax.grad(f)(x)))


def test_reversal_schedule_is_ganins():
    p = np.linspace(0, 1, 11)
    expected = 2.0 / (1.0 + np.exp(-10.0 * p)) - 1.0
    np.testing.assert_allclose(np.asarray(reversal_schedule(jnp.asarray(p, jnp.float32))), expected, rtol=1e-6, atol=1e-7)
    assert float(reversal_schedule(jnp.float32(0.0))) == 0.0


# --------------------------------------------------------------------------
# MMD.
# --------------------------------------------------------------------------


def torch_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The multi-kernel MMD^2 written out pair by pair in float64, bandwidth detached."""
    z = torch.cat([x, y])
    n, total = len(x), len(z)
    distances = ((z[:, None, :] - z[None, :, :]) ** 2).sum(-1)
    off_diagonal = distances[~torch.eye(total, dtype=torch.bool)]
    bandwidth = off_diagonal.mean().detach()
    kernel = sum(torch.exp(-distances / (2 * s * bandwidth)) for s in MMD_SCALES) / len(MMD_SCALES)
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2 * kernel[:n, n:].mean()


def test_mmd_matches_a_float64_reference_in_value_and_gradient():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 6)) * np.array([1, 2, 0.5, 1, 3, 1])
    y = rng.normal(size=(9, 6)) + 0.7
    x[0] *= 8.0  # an outlier stretches the bandwidth
    value, (gx, gy) = jax.value_and_grad(gaussian_mmd2, argnums=(0, 1))(jnp.float32(x), jnp.float32(y))
    tx, ty = torch.tensor(x, requires_grad=True), torch.tensor(y, requires_grad=True)
    reference = torch_mmd2(tx, ty)
    reference.backward()
    np.testing.assert_allclose(float(value), reference.item(), rtol=2e-5)
    np.testing.assert_allclose(np.asarray(gx), tx.grad.numpy(), rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gy), ty.grad.numpy(), rtol=2e-4, atol=1e-6)


def test_mmd_is_zero_for_identical_samples_and_positive_for_shifted_ones():
    x = jax.random.normal(jax.random.key(2), (64, 8))
    same_distribution = jax.random.normal(jax.random.key(3), (64, 8))
    assert abs(float(gaussian_mmd2(x, x))) < 1e-7
    within = float(gaussian_mmd2(x, same_distribution))
    shifted = float(gaussian_mmd2(x, same_distribution + 1.0))
    assert shifted > 10 * within > 0


# --------------------------------------------------------------------------
# Pseudo-labels and density ratios.
# --------------------------------------------------------------------------


def test_pseudo_labels_respect_the_threshold_and_the_class_balance():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(300, 3)) * 2 + np.array([1.0, 0.0, -0.5])  # class 0 favoured
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    rows = balanced_selection(probabilities, 0.8)
    predicted, confidence = probabilities.argmax(1), probabilities.max(1)
    counts = np.bincount(predicted[rows], minlength=3)
    eligible = [np.flatnonzero((predicted == c) & (confidence >= 0.8)) for c in range(3)]
    assert counts.tolist() == [min(len(e) for e in eligible)] * 3 and counts[0] > 0
    assert confidence[rows].min() >= 0.8
    for c in range(3):  # the most confident of each class
        chosen = rows[predicted[rows] == c]
        assert confidence[chosen].min() >= np.sort(confidence[eligible[c]])[::-1][len(chosen) - 1]
    capped = balanced_selection(probabilities, 0.8, max_per_class=2)
    assert np.bincount(predicted[capped], minlength=3).tolist() == [2, 2, 2]
    one_sided = np.tile([[0.95, 0.05]], (10, 1))
    assert len(balanced_selection(one_sided, 0.9)) == 0, "a class without confident rows stops the round"


def test_density_ratios_recover_a_known_gaussian_shift():
    rng = np.random.default_rng(5)
    shift = np.array([0.6, -0.3])
    source = rng.normal(size=(4000, 2))
    target = rng.normal(size=(3000, 2)) + shift
    true = np.exp(source @ shift - shift @ shift / 2)
    estimated = density_ratios(source, target)
    inside = (true > 0.2) & (true < 5)
    relative = np.abs(estimated[inside] / true[inside] - 1)
    assert np.median(relative) < 0.05 and np.percentile(relative, 95) < 0.15
    assert density_ratios(source, target, clip=2.0).max() == 2.0


# --------------------------------------------------------------------------
# Target labels stay hidden.
# --------------------------------------------------------------------------


TARGET = {"source": "synthetic:sentiment", "max_length": 16, "bucket_lengths": [16], "max_train_rows": 64,
          "row_selection": "sample", "row_seed": 1}


class BagOfWords(nnx.Module):
    """A classifier small enough to compile in a moment: mean embedding -> tanh pooler -> head."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.config = types.SimpleNamespace(hidden_size=8)
        self.embed = nnx.Embed(100, 8, rngs=rngs)
        self.pooler = nnx.Linear(8, 8, rngs=rngs)
        self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, input_ids, attention_mask):
        mask = attention_mask[..., None].astype(jnp.float32)
        hidden = self.embed(input_ids) * mask
        pooled = jnp.tanh(self.pooler(hidden.sum(1) / mask.sum(1)))
        return ModelOutput(last_hidden_state=hidden, logits=self.head(pooled), pooler_output=pooled)


def test_the_alignment_terms_never_read_target_labels():
    model = BagOfWords(rngs=nnx.Rngs(0))
    strategies = build_strategies([{"type": "dann", "target": TARGET}, {"type": "mmd", "target": TARGET}])
    attach_modules(model, strategies, seed=0)
    loss = step_loss("classification", strategies, RunInfo(config=_experiment(tmp_out=None), total_steps=10,
                                                            steps_per_epoch=4, batch_size=8))
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(5, 100, (8, 16)).astype(np.int32),
             "attention_mask": np.ones((8, 16), np.int32), "labels": rng.integers(0, 2, 8).astype(np.int32),
             "weights": np.ones(8, np.float32)}
    target = {**batch, "input_ids": rng.integers(5, 100, (8, 16)).astype(np.int32)}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def value_and_grads(labels):
        batches = {"train": batch, "target": {**target, "labels": labels}}
        # Fresh Variables inside the trace, as the train step makes them: DANN advances its step counter.
        return jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest)), batches)[0])(params)

    first = value_and_grads(np.zeros(8, np.int32))
    second = value_and_grads(np.array([1, 0, 1, 1, 0, 1, 0, 0], np.int32))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), first, second)))
    grads = jax.tree.leaves(first[1]["training_strategies"])
    assert any(bool(np.any(np.asarray(g) != 0)) for g in grads), "the domain classifier gets gradients"


def test_a_target_with_another_label_set_is_refused():
    with pytest.raises(PeftError, match=r"labels \[2\] that the source data lacks"):
        check_label_sets(np.array([0, 1, 1, 0]), np.array([0, 2, 1]), "dann")
    check_label_sets(np.array([0, 1, 1, 0]), np.array([1, 1]), "dann")  # a subset is the same task


def test_a_missing_target_stream_is_a_config_error(tmp_path):
    path = tmp_path / "config.yaml"
    tree = _experiment(tmp_out=tmp_path).to_dict()
    for strategy in ("dann", "mmd", "pseudo_label", "importance_weighting"):
        path.write_text(yaml.safe_dump({**tree, "strategies": [{"type": strategy, "weight": 1.0}
                                                                  if strategy in ("dann", "mmd") else {"type": strategy}]}))
        with pytest.raises(ConfigError, match=r"strategies\.0\.target: .*unlabelled target stream"):
            _load(str(path), [])


# --------------------------------------------------------------------------
# The four strategies in a run, interrupted and resumed.
# --------------------------------------------------------------------------

CRASH_AT: list[int] = []


class Crash(RuntimeError):
    pass


@peftjax.register_strategy("crash_test")
@dataclasses.dataclass(frozen=True, kw_only=True)
class CrashStrategy(peftjax.Strategy):
    def on_step(self, run, metrics):
        if CRASH_AT and run.step == CRASH_AT[0]:
            raise Crash(run.step)


def _experiment(tmp_out: pathlib.Path | None):
    strategies = [
        {"type": "dann", "target": TARGET, "hidden": 8},
        {"type": "mmd", "target": TARGET, "weight": 0.5},
        {"type": "pseudo_label", "target": TARGET, "threshold": 0.5, "rounds": 2, "start": 0.25},
        {"type": "importance_weighting", "target": TARGET, "clip": 3.0},
        {"type": "crash_test"},
    ]
    return ExperimentConfig.from_dict({
        "output_dir": str(tmp_out / "out") if tmp_out else "unused",
        "model": {"name": "bert-tiny"},
        "methods": [{"type": "lora", "targets": ["query", "value"], "rank": 2, "also_train": [r"classifier\..*"]}],
        "strategies": strategies,
        "data": {"source": "synthetic:sentiment", "max_length": 16, "bucket_lengths": [16], "max_train_rows": 64},
        "optim": {"learning_rate": 1e-2},
        "train": {"batch_size": 16, "steps": 8, "checkpoint_every": 4, "keep": 2, "log_every": 1},
    })


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole")
    run(_experiment(folder), progress=False)
    return folder / "out"


def _records(out: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_dann_follows_its_schedule_and_its_classifier_trains(whole):
    steps = [r for r in _records(whole) if "dann_lambda" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))
    expected = 2.0 / (1.0 + np.exp(-10.0 * np.arange(8) / 8)) - 1.0  # p = steps done / 8
    np.testing.assert_allclose([r["dann_lambda"] for r in steps], expected, rtol=1e-5, atol=1e-7)
    assert all(r["mmd_mmd2"] >= 0 for r in steps)


def test_pseudo_label_rounds_are_logged_balanced_and_kept_in_memory(whole):
    rounds = [r for r in _records(whole) if "pseudo_label_round" in r]
    assert [r["step"] for r in rounds] == [2, 5] and [r["pseudo_label_round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert record["pseudo_label_class_0"] == record["pseudo_label_class_1"]
        assert record["pseudo_label_selected"] == 2 * record["pseudo_label_class_0"]
        assert 0 <= record["pseudo_label_target_accuracy"] <= 1
    before = [r for r in _records(whole) if "pseudo_label_labelled" in r and r["step"] <= 2]
    assert all(r["pseudo_label_labelled"] == 0 and r["pseudo_label_loss"] == 0 for r in before), \
        "nothing is labelled before the first round"


def test_importance_weights_are_logged_once_with_mean_one(whole):
    logged = [r for r in _records(whole) if "importance_weighting_effective_share" in r]
    assert len(logged) == 1 and logged[0]["step"] == 0
    assert 0 < logged[0]["importance_weighting_effective_share"] <= 1
    assert logged[0]["importance_weighting_min"] <= 1 <= logged[0]["importance_weighting_max"]


def test_an_interrupted_adaptation_run_resumes_bitwise(whole, tmp_path):
    CRASH_AT[:] = [6]
    try:
        with pytest.raises(Crash):
            run(_experiment(tmp_path), progress=False)
    finally:
        CRASH_AT.clear()
    run(_experiment(tmp_path), resume=True, progress=False)
    expected = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "out" / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys() and all(np.array_equal(expected[k], got[k]) for k in expected)
    # The resumed run drops the log after its checkpoint (step 4) and labels round 2 (step 5) again, alike.
    rounds = [r for r in _records(tmp_path / "out") if "pseudo_label_round" in r]
    assert rounds == [r for r in _records(whole) if "pseudo_label_round" in r] and len(rounds) == 2
