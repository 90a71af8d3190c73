"""DANN and MMD on a ResNet with an image target stream: the domain classifier
is sized from the pooled width (``hidden_sizes[-1]``, ResNet has no
``hidden_size``) and both terms send finite gradients to the network."""

from __future__ import annotations

import types

import jax
import numpy as np
import pytest
from flax import nnx

from peftjax import models
from peftjax.config import ExperimentConfig
from peftjax.errors import PeftError
from peftjax.models.resnet import ResNetConfig
from peftjax.strategies.base import attach_modules, build_strategies, step_loss
from peftjax.strategies.target_domain import TARGET
from peftjax.train.session import MAIN, RunInfo
from peftjax.train.tasks import model_output, pooled_features, pooled_width

NETWORK = ResNetConfig(layer_type="basic", embedding_size=4, hidden_sizes=(4, 6), depths=(1, 1), num_labels=3)
IMAGES = {"task": "image_classification", "source": "images", "image_size": 16}


def test_pooled_width_is_what_pooled_features_returns():
    model = models.from_config(NETWORK, task="image_classification", rngs=nnx.Rngs(0))
    model.eval()  # running statistics: nothing to write inside the trace
    batch = {"pixel_values": np.zeros((2, 16, 16, 3), np.float32)}
    pooled = jax.eval_shape(lambda: pooled_features(model_output(model, batch), batch))
    assert pooled.shape == (2, pooled_width(model)) == (2, 6)
    assert pooled_width(types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=8))) == 8
    with pytest.raises(PeftError, match="neither config.hidden_size nor config.hidden_sizes"):
        pooled_width(types.SimpleNamespace(config=None))


def test_dann_and_mmd_train_a_resnet_against_an_image_target():
    model = models.from_config(NETWORK, task="image_classification", rngs=nnx.Rngs(0))
    specs = [{"type": "dann", "target": IMAGES, "hidden": 5}, {"type": "mmd", "target": IMAGES}]
    strategies = build_strategies(specs)
    attach_modules(model, strategies, seed=0)
    assert model.training_strategies["dann"].hidden.kernel.shape == (6, 5)
    config = ExperimentConfig.from_dict({"model": {"name": "resnet"}, "data": IMAGES, "strategies": specs,
                                         "train": {"batch_size": 4, "steps": 10}})
    loss = step_loss("image_classification", strategies,
                     RunInfo(config=config, total_steps=10, steps_per_epoch=10, batch_size=4))
    rng = np.random.default_rng(0)
    batches = {MAIN: {"pixel_values": rng.normal(size=(4, 16, 16, 3)).astype(np.float32),
                      "labels": np.array([0, 1, 2, 0], np.int32)},
               TARGET: {"pixel_values": rng.normal(1.0, 1.0, size=(4, 16, 16, 3)).astype(np.float32)}}
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    (total, stats), grads = jax.jit(jax.value_and_grad(
        # Fresh Variables inside the trace, as the train step makes them: the batch norms update their statistics.
        lambda p: loss(nnx.merge(graphdef, p, jax.tree.map(lambda x: x, rest)), batches), has_aux=True))(
        params)
    assert stats["terms"]["mmd"]["mmd2"] > 0 and np.isfinite(float(total))
    conv = np.asarray(grads["resnet"]["embedder"]["embedder"]["convolution"]["kernel"][...])
    domain = np.asarray(grads["training_strategies"]["dann"]["output"]["kernel"][...])
    assert np.all(np.isfinite(conv)) and np.any(conv != 0) and np.any(domain != 0)
