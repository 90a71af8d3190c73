"""The transfer diagnostics and decisions without training: the proxy A-distance,
the advice at every corner of its framework, the transfer-gain verdict, random
initialisation of a checkpoint's architecture, and the few-shot section's checks."""

from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from peftjax import models
from peftjax.config import ConfigError, ExperimentConfig
from peftjax.data import TaskData, TextExamples
from peftjax.errors import PeftError
from peftjax.train.runner import build_model
from peftjax.transfer.advise import recommend
from peftjax.transfer.divergence import proxy_a_distance
from peftjax.transfer.few_shot import FewShotConfig, cells
from peftjax.transfer.negative_transfer import transfer_gain
from peftjax.transfer.similarity import DatasetProfile, check_same_labels


def test_proxy_a_distance_is_near_zero_within_a_dataset_and_large_across():
    rng = np.random.default_rng(0)
    one = rng.normal(size=(600, 16))
    other = rng.normal(size=(300, 16)) + np.linspace(0, 1.5, 16)
    halves = proxy_a_distance(one[:300], one[300:])
    across = proxy_a_distance(one[:300], other)
    assert abs(halves["proxy_a_distance"]) < 0.25 and 0.4 < halves["domain_error"] < 0.6
    assert across["proxy_a_distance"] > 1.7 and across["examples"] == 300
    with pytest.raises(PeftError, match="one width"):
        proxy_a_distance(one, other[:, :3])


def profile(per_class: int, classes: int = 2) -> DatasetProfile:
    return DatasetProfile(rows=per_class * classes, classes=classes, per_class=(per_class,) * classes,
                          length_median=14.0, length_p95=29.0, max_length=128)


@pytest.mark.parametrize(
    ("per_class", "distance", "budget", "labelled", "method", "strategy"),
    [
        (250, 0.4, "medium", False, "lora", "pseudo_label"),  # no target labels, close source
        (250, 1.6, "medium", False, "lora", "dann"),  # no target labels, distant source
        (8, 0.4, "high", True, "linear_probe", None),  # few labels, close
        (8, 1.6, "high", True, "linear_probe", None),  # few labels, distant
        (8, None, "low", True, "linear_probe", None),
        (250, 0.4, "medium", True, "lora", None),  # small
        (250, 1.6, "high", True, "lora", None),
        (5000, 0.4, "high", True, "full", None),  # large, high budget
        (5000, 1.6, "high", True, "full", None),
        (5000, 0.4, "low", True, "lora", None),  # large, low budget: never every parameter
        (5000, 1.6, "medium", True, "lora", None),
    ],
)
def test_advice_gives_the_textbook_answer_at_each_corner(per_class, distance, budget, labelled, method, strategy):
    advice = recommend(profile(per_class), proxy_a_distance=distance, labelled=labelled,
                       has_source=distance is not None, budget=budget)
    assert advice.method["type"] == method
    assert [s["type"] for s in advice.strategies] == ([strategy] if strategy else [])
    assert advice.reasons and all(isinstance(reason, str) for reason in advice.reasons)
    if method == "lora" and per_class >= 1000:  # large: distant moves more of the network
        assert advice.method["targets"] == ("all-linear" if distance > 1.0 else ["query", "value"])


def test_advice_explains_similarity_and_warns_of_a_very_distant_source():
    close = recommend(profile(250), proxy_a_distance=0.4, has_source=True)
    assert any("0.40: 'close'" in reason for reason in close.reasons)
    far = recommend(profile(250), proxy_a_distance=1.9, has_source=True)
    assert any("negative-transfer" in reason for reason in far.reasons)
    unknown = recommend(profile(250))
    assert unknown.setting["similarity"] == "unknown" and any("no source dataset" in r for r in unknown.reasons)


def test_unlabelled_data_without_a_source_gets_a_clear_error():
    with pytest.raises(PeftError, match="needs a labelled source .* --source"):
        recommend(profile(250), labelled=False)


def _task(labels: list[int], names: tuple[str, ...] | None = None) -> TaskData:
    examples = TextExamples.from_sequences([[1, 2]] * len(labels), labels=labels, bucket_lengths=(4,))
    return TaskData(task="classification", splits={"train": examples}, num_labels=len(set(labels)), label_names=names)


def test_a_source_with_another_label_set_is_refused():
    check_same_labels(_task([0, 1, 1]), _task([1, 0]), "a.yaml", "b.yaml")
    with pytest.raises(PeftError, match=r"a.yaml has labels \[0, 1\] but b.yaml has \[0, 1, 2\]"):
        check_same_labels(_task([0, 1]), _task([0, 1, 2]), "a.yaml", "b.yaml")
    with pytest.raises(PeftError, match=r"\['neg', 'pos'\] but b.yaml has \['bad', 'good'\]"):
        check_same_labels(_task([0, 1], ("neg", "pos")), _task([0, 1], ("bad", "good")), "a.yaml", "b.yaml")


def test_transfer_gain_flags_negative_transfer_only_beyond_the_noise():
    negative = transfer_gain([0.60, 0.62, 0.61, 0.59, 0.60], [0.70, 0.71, 0.69, 0.72, 0.70])
    assert negative["negative_transfer"] and negative["verdict"] == "negative transfer"
    assert negative["interval"][1] < 0 and np.isclose(negative["mean"], -0.1)
    noisy = transfer_gain([0.60, 0.70, 0.55, 0.66, 0.58], [0.62, 0.61, 0.64, 0.60, 0.63])
    assert noisy["mean"] < 0 and not noisy["negative_transfer"] and noisy["verdict"] == "no clear difference"
    positive = transfer_gain([0.9, 0.88, 0.91], [0.6, 0.62, 0.58])
    assert positive["verdict"] == "positive transfer" and np.allclose(positive["gains"], [0.3, 0.26, 0.33])
    # The interval is the t-interval of the mean of the paired gains.
    gains = np.array(positive["gains"])
    half = 4.302652729911275 * gains.std(ddof=1) / np.sqrt(3)  # t(0.975, 2)
    np.testing.assert_allclose(positive["interval"], [gains.mean() - half, gains.mean() + half])


def test_random_init_builds_the_checkpoints_architecture_without_its_weights(tmp_path):
    saved = models.from_config("bert-tiny", task="sequence-classification", num_labels=2, seed=3)
    models.save_pretrained(saved, tmp_path)
    spec = {"model": {"name": "tiny", "path": str(tmp_path)}, "data": {"source": "synthetic:sentiment"},
            "train": {"steps": 1}}
    pretrained = build_model(ExperimentConfig.from_dict(spec), 2)
    random = build_model(ExperimentConfig.from_dict({**spec, "model": {**spec["model"], "init": "random"}}), 2)
    flat = lambda m: dict(nnx.to_flat_state(nnx.state(m, nnx.Param)))  # noqa: E731
    loaded, fresh, original = flat(pretrained), flat(random), flat(saved)
    assert loaded.keys() == fresh.keys() == original.keys()
    assert all(np.array_equal(loaded[k].get_value(), original[k].get_value()) for k in loaded)
    assert all(loaded[k].get_value().shape == fresh[k].get_value().shape for k in loaded)
    kernels = [k for k in loaded if k[-1] == "kernel"]
    assert kernels and not any(np.array_equal(loaded[k].get_value(), fresh[k].get_value()) for k in kernels)
    with pytest.raises(ConfigError, match="model.init"):
        ExperimentConfig.from_dict({**spec, "model": {**spec["model"], "init": "scratch"}})


def test_few_shot_section_checks_and_cells():
    section = FewShotConfig.from_dict({"shots": [2, 4], "seeds": [0, 1],
                                       "arms": {"probe": {"methods": [{"type": "linear_probe"}]}}})
    grid = cells(section)
    assert [dict(c.key) for c in grid] == [{"arm": "probe", "shots": k, "seed": s} for s in (0, 1) for k in (2, 4)]
    assert grid[1].overrides["data.shots_per_class"] == 4 and grid[1].overrides["data.row_seed"] == 0
    with pytest.raises(ConfigError, match="shots: must increase"):
        FewShotConfig.from_dict({"shots": [8, 4], "arms": {"probe": {}}})
    with pytest.raises(ConfigError, match="arms: needs at least one arm"):
        FewShotConfig.from_dict({"shots": [4]})
