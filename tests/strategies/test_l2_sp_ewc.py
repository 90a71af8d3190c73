"""L2-SP and EWC penalties on a toy stack: value and gradient against float64 numpy, exactly
zero at the anchor, the anchors sharing the frozen parameters' buffers and kept out of
checkpoints; the diagonal Fisher against the closed form of softmax regression; and the
errors for bad input (a group index out of range, EWC without a Fisher file, a Fisher file
for another model)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ToyStack
from flax import nnx

import peftjax
from peftjax.config import ConfigError
from peftjax.models.common import ModelOutput
from peftjax.strategies.base import StepContext, attach_modules, build_strategies, stage_optimizer
from peftjax.strategies.ewc import diagonal_fisher, fisher_parameters, load_fisher, save_fisher

RNG = np.random.default_rng(0)


def toy(**kwargs) -> ToyStack:
    model = ToyStack(rngs=nnx.Rngs(0), **kwargs)
    peftjax.apply(model, peftjax.FullFineTuningConfig())
    return model


def prepared(model, specs):
    strategies = build_strategies(specs)
    attach_modules(model, strategies, seed=0)
    state = peftjax.TrainState.create(model, stage_optimizer(model, optax.sgd(0.1), strategies, [0] * len(specs), None))
    return strategies, state


def term_and_grads(strategy, state, trainable):
    def term(trainable):
        model = nnx.merge(state.graphdef, trainable, state.frozen, state.rest)
        return strategy.loss(StepContext(model, {}, None))

    (value, metrics), grads = jax.jit(jax.value_and_grad(term, has_aux=True))(trainable)
    return float(value), metrics, flat(grads)


def flat(tree) -> dict[str, np.ndarray]:
    return {".".join(str(getattr(k, "key", k)) for k in path[:-1]): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def perturbed(trainable, scale=0.05):
    return jax.tree.map(lambda x: x + jnp.asarray(RNG.normal(0, scale, x.shape), x.dtype), trainable)


def test_l2_sp_value_and_gradient_against_float64_and_zero_at_the_start():
    model = toy()
    (l2sp,), state = prepared(model, [{"type": "l2_sp", "alpha": 0.3, "beta": 0.05}])
    start = flat(state.trainable)
    moved = perturbed(state.trainable)
    value, metrics, grads = term_and_grads(l2sp, state, moved)
    now = {k: v.astype(np.float64) for k, v in flat(moved).items()}
    head = [k for k in now if k.startswith("head.")]
    body = [k for k in now if not k.startswith("head.")]
    drift = sum(np.sum((now[k] - start[k]) ** 2) for k in body)
    new = sum(np.sum(now[k] ** 2) for k in head)
    assert value == pytest.approx(0.3 / 2 * drift + 0.05 / 2 * new, rel=1e-5)
    assert float(metrics["drift"]) == pytest.approx(drift, rel=1e-5)
    for k in body:
        np.testing.assert_allclose(grads[k], 0.3 * (now[k] - start[k]), rtol=1e-5, atol=1e-8, err_msg=k)
    for k in head:
        np.testing.assert_allclose(grads[k], 0.05 * now[k], rtol=1e-5, atol=1e-8, err_msg=k)

    value, metrics, grads = term_and_grads(l2sp, state, state.trainable)  # at the starting point
    assert float(metrics["drift"]) == 0.0 and all(not grads[k].any() for k in body)


def test_l2_sp_anchors_share_buffers_with_frozen_parameters_and_stay_out_of_checkpoints():
    model = toy()
    _, state = prepared(model, [{"type": "partial_freeze", "groups": ["layer.1", "head"]},
                                {"type": "l2_sp", "alpha": 1.0}])
    frozen, trainable = flat(state.frozen), flat(state.trainable)
    anchors = {k.split(".anchor.", 1)[1].replace("/", "."): k for k in frozen if ".anchor." in k}
    assert sorted(anchors) == sorted(k for k in frozen | trainable if not k.startswith(("head.", "training_")))
    leaves = {".".join(str(getattr(k, "key", k)) for k in p[:-1]): leaf
              for p, leaf in jax.tree_util.tree_flatten_with_path(state.frozen)[0]}
    for param, anchor in anchors.items():
        if param in frozen:  # layer 0: the anchor is the frozen parameter's own buffer
            assert leaves[anchor].unsafe_buffer_pointer() == leaves[param].unsafe_buffer_pointer(), param
    assert not [k for k in flat(state.rest) if k.startswith("training_strategies")], "anchors are not checkpointed"


@pytest.fixture(scope="module")
def fisher_file(tmp_path_factory):
    model = toy()
    fisher = {k: np.abs(RNG.normal(0, 1, v.shape)).astype(np.float32)
              for k, v in flat(nnx.state(model, nnx.Param)).items() if not k.startswith("head.")}
    path = tmp_path_factory.mktemp("fisher") / "fisher.safetensors"
    save_fisher(path, model, fisher, examples=10, labels="model")
    return path, fisher


def test_ewc_value_and_gradient_against_float64_and_zero_at_the_anchor(fisher_file):
    path, fisher = fisher_file
    (ewc,), state = prepared(toy(), [{"type": "ewc", "fisher": str(path), "strength": 7.0}])
    anchor = flat(state.trainable)
    moved = perturbed(state.trainable)
    value, metrics, grads = term_and_grads(ewc, state, moved)
    now = {k: v.astype(np.float64) for k, v in flat(moved).items()}
    distance = sum(np.sum(fisher[k] * (now[k] - anchor[k]) ** 2) for k in fisher)
    assert value == pytest.approx(7.0 / 2 * distance, rel=1e-5)
    for k in fisher:
        np.testing.assert_allclose(grads[k], 7.0 * fisher[k] * (now[k] - anchor[k]), rtol=1e-5, atol=1e-8)
    assert not grads["head.kernel"].any(), "the head is A's alone: no Fisher"
    value, _, grads = term_and_grads(ewc, state, state.trainable)
    assert value == 0.0 and all(not g.any() for g in grads.values())


def test_bad_input_gets_clear_errors(fisher_file, tmp_path):
    path, _ = fisher_file
    with pytest.raises(ConfigError, match=r"strategies.0.fisher: missing required key"):
        build_strategies([{"type": "ewc", "strength": 1.0}])
    with pytest.raises(peftjax.PeftError, match=r"ewc.fisher: .*absent.safetensors not found; compute it with "
                                                r"`peftjax fisher CONFIG --checkpoint ADAPTER_FOLDER --out FILE`"):
        prepared(toy(), [{"type": "ewc", "fisher": str(tmp_path / "absent.safetensors")}])
    with pytest.raises(peftjax.PeftError, match=r"was computed for a ToyStack that is not this ToyStack: parameters it "
                                                r"lacks \[\], shape mismatches \['layers.0.down.bias: file \(16,\), model \(8,\)'"):
        load_fisher(path, toy(d=8))
    with pytest.raises(peftjax.PeftError, match=r"parameters it lacks \['layers.1.down.bias'"):
        load_fisher(path, toy(layers=1))
    with pytest.raises(peftjax.PeftError, match=r"partial_freeze.groups: group index 3 is out of range; ToyStack has "
                                                r"3 layer groups \['layer.0', 'layer.1', 'head'\]"):
        prepared(toy(), [{"type": "partial_freeze", "groups": [3]}])
    with pytest.raises(peftjax.PeftError, match=r"partial_freeze.top=4: ToyStack has 3 layer groups"):
        prepared(toy(), [{"type": "partial_freeze", "top": 4}])


class SoftmaxRegression(nnx.Module):
    def __init__(self, features: int, classes: int, *, rngs: nnx.Rngs):
        self.linear = nnx.Linear(features, classes, rngs=rngs)

    def __call__(self, input_ids):  # float features, passed as the batch's inputs
        return ModelOutput(last_hidden_state=None, logits=self.linear(input_ids))


@pytest.mark.parametrize("labels", ["model", "empirical"])
def test_fisher_of_softmax_regression_is_its_closed_form(labels):
    """d log p(c|x) / d W[i, k] = x_i (1[c = k] - p_k): the Fisher's diagonal is the mean of
    x_i^2 p_k (1 - p_k) over the examples (labels drawn from the model), or of
    x_i^2 (1[y = k] - p_k)^2 (the data's labels); with two classes, logistic regression."""
    model = SoftmaxRegression(5, 3, rngs=nnx.Rngs(0))
    x = RNG.normal(0, 1.5, (10, 5)).astype(np.float32)
    y = RNG.integers(0, 3, 10)
    weights = np.ones(10, np.float32)
    weights[-2:] = 0  # rows that only fill a batch
    batches = [{"input_ids": x[:6], "labels": y[:6], "weights": weights[:6]},
               {"input_ids": x[6:], "labels": y[6:], "weights": weights[6:]}]
    fisher, count = diagonal_fisher(model, batches, labels=labels, paths=["linear.kernel", "linear.bias"])
    assert count == 8
    w = np.asarray(model.linear.kernel[...], np.float64)
    b = np.asarray(model.linear.bias[...], np.float64)
    x64 = x[:8].astype(np.float64)
    logits = x64 @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    per_class = p * (1 - p) if labels == "model" else (np.eye(3)[y[:8]] - p) ** 2  # (n, k)
    np.testing.assert_allclose(fisher["linear.kernel"], np.einsum("ni,nk->ik", x64**2, per_class) / 8, rtol=2e-5)
    np.testing.assert_allclose(fisher["linear.bias"], per_class.mean(0), rtol=2e-5)


def test_ewc_on_adapters_that_a_later_task_goes_on_training(tmp_path):
    """Task A's LoRA adapters carry the Fisher; task B trains them on (the same adapters,
    loaded): the penalty reaches the adapters, and the frozen base adds nothing."""
    model = ToyStack(rngs=nnx.Rngs(0))
    peftjax.apply(model, peftjax.LoraConfig(rank=2, targets=["query", "value"], also_train=(r"head\..*",)))
    lora = {k: v for k, v in flat(nnx.state(model, nnx.Param)).items() if ".lora_" in k}
    assert sorted(lora) == sorted(k for k in fisher_parameters(model) if ".lora_" in k)
    path = tmp_path / "fisher.safetensors"
    save_fisher(path, model, {k: np.full(v.shape, 2.0, np.float32) for k, v in lora.items()}, examples=1, labels="model")
    (ewc,), state = prepared(model, [{"type": "ewc", "fisher": str(path), "strength": 0.5}])
    moved = perturbed(state.trainable)
    value, _, grads = term_and_grads(ewc, state, moved)
    anchor, now = flat(state.trainable), {k: v.astype(np.float64) for k, v in flat(moved).items()}
    assert value == pytest.approx(0.5 / 2 * sum(np.sum(2.0 * (now[k] - anchor[k]) ** 2) for k in lora), rel=1e-5)
    assert sorted(k for k, g in grads.items() if g.any()) == sorted(lora)
