"""Few-shot samples, held-out splits and per-example weights: the data that the
transfer-learning strategies and commands stand on. K-shot samples are exact per
class, deterministic and nested; a held-out test split never trains; example
weights reach the batches; bad requests name the key to change."""

from __future__ import annotations

import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import pytest

from peftjax import data as data_lib
from peftjax.config import ConfigError, DataConfig
from peftjax.data import BatchLoader, DataError, TextExamples
from peftjax.data.subsets import holdout_rows, k_shot_rows

# 3 classes, 40 / 25 / 12 examples, interleaved.
LABELS = np.array([0] * 40 + [1] * 25 + [2] * 12)[np.random.default_rng(7).permutation(77)]


@pytest.mark.parametrize("k", [1, 4, 12])
def test_k_shot_is_exact_per_class_and_deterministic(k):
    rows = k_shot_rows(LABELS, k, seed=3)
    assert np.array_equal(rows, np.sort(rows)) and len(set(rows.tolist())) == len(rows)
    assert np.bincount(LABELS[rows]).tolist() == [k, k, k]
    assert np.array_equal(rows, k_shot_rows(LABELS, k, seed=3))
    assert not np.array_equal(k_shot_rows(LABELS, 12, seed=3), k_shot_rows(LABELS, 12, seed=4))


def test_k_shot_samples_are_nested_in_k():
    for seed in range(3):
        small, large = set(k_shot_rows(LABELS, 4, seed).tolist()), set(k_shot_rows(LABELS, 8, seed).tolist())
        assert small < large


def test_k_larger_than_a_class_names_the_class_and_the_key():
    with pytest.raises(DataError, match=r"shots_per_class=13 .*class 2 has 12.*at most 12"):
        k_shot_rows(LABELS, 13, seed=0)
    with pytest.raises(DataError, match=r"class 'pos' has 12"):
        k_shot_rows(LABELS, 13, seed=0, names=("neg", "mid", "pos"))


def test_holdout_splits_rows_once_and_for_all():
    kept, held = holdout_rows(100, 30, seed=2)
    assert len(held) == 30 and len(kept) == 70
    assert set(kept.tolist()).isdisjoint(held.tolist()) and set(kept.tolist()) | set(held.tolist()) == set(range(100))
    assert np.array_equal(held, holdout_rows(100, 30, seed=2)[1])
    with pytest.raises(DataError, match="holdout_rows=100: the file has 100 rows"):
        holdout_rows(100, 100, seed=0)


def test_a_config_holds_out_its_test_split_and_samples_k_shots_from_the_rest():
    base = dict(source="synthetic:sentiment", max_length=32, holdout_rows=100, holdout_seed=1)
    whole = data_lib.load_data(DataConfig(**base))
    sample = data_lib.load_data(DataConfig(**base, shots_per_class=5, row_seed=9))
    assert len(whole["test"]) == 100 and len(whole["train"]) + 100 == len(data_lib.load_data(
        DataConfig(source="synthetic:sentiment", max_length=32))["train"])
    assert np.bincount(sample["train"].labels).tolist() == [5, 5]
    test_rows = {tuple(whole["test"].sequence(i)) for i in range(len(whole["test"]))}
    pool = {tuple(whole["train"].sequence(i)) for i in range(len(whole["train"]))}
    shots = {tuple(sample["train"].sequence(i)) for i in range(len(sample["train"]))}
    assert shots <= pool  # drawn from the pool; the test split is the same held-out rows
    assert [tuple(sample["test"].sequence(i)) for i in range(100)] == [tuple(whole["test"].sequence(i)) for i in range(100)]
    assert len(test_rows) > 90  # (a handful of synthetic sentences repeat)


def test_subset_keys_are_checked_on_construction():
    with pytest.raises(ConfigError, match="^holdout_rows: makes the test split"):
        DataConfig.from_dict({"source": "x", "holdout_rows": 10, "test_split": "test.tsv"})
    with pytest.raises(ConfigError, match="max_train_rows: shots_per_class fixes the training rows"):
        DataConfig(source="x", shots_per_class=4, max_train_rows=100)
    with pytest.raises(ConfigError, match="shots_per_class: needs classes"):
        DataConfig(source="x", task="causal_lm", shots_per_class=4, label_column=None)


def test_example_weights_reach_training_batches_and_are_checked():
    examples = TextExamples.from_sequences([[1, 2]] * 6, labels=[0, 1, 0, 1, 0, 1], bucket_lengths=(4,))
    weighted = dataclasses.replace(examples, weights=np.array([0, 1, 2, 3, 4, 5], np.float64))
    assert weighted.weights.dtype == np.float32
    loader = BatchLoader.for_training(weighted, 3, seed=0)
    for indices in loader.epoch_plan(0):
        assert np.array_equal(loader.batch(indices)["weights"], indices.astype(np.float32))
    with pytest.raises(DataError, match="one per example"):
        dataclasses.replace(examples, weights=np.ones(5))
    with pytest.raises(DataError, match="finite and not negative"):
        dataclasses.replace(examples, weights=np.array([1, 1, 1, 1, 1, -1.0]))
