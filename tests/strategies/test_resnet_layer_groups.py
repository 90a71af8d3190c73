"""The layer-group strategies on a ResNet: its own groups (stem, stages, head), even
where a stage holds more layers than there are stages, which the structural finder
(the longest list of layers) would take for the blocks; partial freezing, gradual
unfreezing and discriminative rates label every parameter by its group."""

from __future__ import annotations

import collections

import pytest
from flax import nnx

import peftjax
from peftjax import models
from peftjax.core.labels import param_labels, split_by_rate_group
from peftjax.methods.base import FROZEN
from peftjax.models.resnet import ResNetConfig
from peftjax.strategies.base import build_strategies

# Stage 3 holds five layers: the longest list in the model, longer than the list of stages.
NETWORK = ResNetConfig(layer_type="basic", embedding_size=4, hidden_sizes=(4, 4, 4, 4), depths=(1, 1, 5, 1),
                       num_labels=3)
GROUPS = ["stem", "stage1", "stage2", "stage3", "stage4", "head"]


@pytest.fixture(scope="module")
def model():
    model = models.from_config(NETWORK, task="image_classification", rngs=nnx.Rngs(0))
    peftjax.apply(model, peftjax.registered_methods()["full"]())
    return model


def _by_group(model, spec, stage=0) -> dict[str, set]:
    """Each group's parameters as 'frozen' or their rate factor."""
    (strategy,) = build_strategies([spec])
    groups = peftjax.layer_groups(model)
    labels = param_labels(model, None, overrides=strategy.label_rules(model, stage))
    split, factors = split_by_rate_group(labels, strategy.rate_groups(model, stage))
    found = collections.defaultdict(set)
    for path, label in split.items():
        group = next(g.name for g in groups if any(path.startswith(p + ".") for p in g.paths))
        found[group].add("frozen" if label == FROZEN else round(factors.get(label, 1.0), 6))
    return dict(found)


def test_a_resnet_has_its_stem_stages_and_head_as_groups(model):
    groups = peftjax.layer_groups(model)
    assert [(g.name, g.paths) for g in groups] == [
        ("stem", ("resnet.embedder",)), *[(f"stage{i}", (f"resnet.encoder.stages.{i - 1}",)) for i in range(1, 5)],
        ("head", ("classifier",))]
    assert [g.kind for g in groups] == ["embeddings", "block", "block", "block", "block", "head"]


def test_partial_freeze_gradual_unfreezing_and_discriminative_rates_follow_the_groups(model):
    top_two = _by_group(model, {"type": "partial_freeze", "top": 2})
    assert top_two == {**dict.fromkeys(GROUPS[:4], {"frozen"}), "stage4": {1.0}, "head": {1.0}}
    unfreeze = {"type": "gradual_unfreeze", "every": 1, "unit": "steps"}
    assert _by_group(model, unfreeze, stage=0) == {**dict.fromkeys(GROUPS[:5], {"frozen"}), "head": {1.0}}
    assert _by_group(model, unfreeze, stage=2) == {**dict.fromkeys(GROUPS[:3], {"frozen"}),
                                                   **dict.fromkeys(GROUPS[3:], {1.0})}
    assert _by_group(model, unfreeze, stage=5) == dict.fromkeys(GROUPS, {1.0})
    rates = _by_group(model, {"type": "discriminative_lr", "factor": 2.0})
    assert rates == {"stem": {1 / 16}, "stage1": {1 / 8}, "stage2": {1 / 4}, "stage3": {1 / 2}, "stage4": {1.0},
                     "head": {1.0}}
