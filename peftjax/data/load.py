"""Loading a task: every configured split read, labelled and tokenised once, cached in memory."""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from typing import Any

import numpy as np

from peftjax.config import DataConfig
from peftjax.data.errors import DataError
from peftjax.data.examples import TaskData, TextExamples
from peftjax.data.images import load_image_task
from peftjax.data.sources import SPLITS, local_split_path, read_table, select_rows, source_kind
from peftjax.data.subsets import holdout_rows, k_shot_rows
from peftjax.data.synthetic import synthetic_tokenizer
from peftjax.data.tokenization import Tokenizer, document_separator, encode, padding_id, tokenizer_name


def _label_ids(values: list[Any], where: str, names: tuple[str, ...] | None) -> np.ndarray:
    """Integer class ids from a label column (ints, bools, integral floats or class names)."""
    for row, value in enumerate(values):
        if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
            raise DataError(f"row {row} of {where} has no label; drop or fill it")
    if names is not None and all(isinstance(v, str) for v in values):
        index = {name: i for i, name in enumerate(names)}
        unknown = sorted({v for v in values if v not in index})
        if unknown:
            raise DataError(f"{where} has labels {unknown[:5]} that the training split lacks; classes: {list(names)}")
        return np.array([index[v] for v in values], np.int32)
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return np.array(values, np.int32)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        ids = np.array(values, np.int64)
    elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        as_float = np.array(values, np.float64)
        if not np.all(as_float == np.round(as_float)):
            raise DataError(
                f"{where} has non-integer labels (e.g. {as_float[as_float != np.round(as_float)][0]}); "
                "classification needs class ids or class names"
            )
        ids = as_float.astype(np.int64)
    else:
        kinds = sorted({type(v).__name__ for v in values})
        raise DataError(f"{where} mixes label types {kinds}; use class ids or class names throughout")
    if ids.size and ids.min() < 0:
        raise DataError(
            f"{where} has label {ids.min()}: negative labels mean 'no label' (GLUE hides its test labels "
            "this way); evaluate on a labelled split"
        )
    return ids.astype(np.int32)


def _class_names_from_strings(values: list[Any]) -> tuple[str, ...] | None:
    if values and all(isinstance(v, str) for v in values):
        return tuple(sorted(set(values)))
    return None


_CACHE: collections.OrderedDict[tuple, TaskData] = collections.OrderedDict()
_CACHE_SIZE = 4


def clear_cache() -> None:
    """Forgets every tokenised task kept in memory by :func:`load_data`."""
    _CACHE.clear()


def _cache_key(config: DataConfig, tokenizer: Tokenizer | None) -> tuple:
    files = []
    if source_kind(config.source)[0] == "local" and config.task != "image_classification":
        for split in SPLITS:
            path = local_split_path(config, split)
            if path is not None:
                stat = path.stat()
                files.append((str(path), stat.st_mtime_ns, stat.st_size))
    tokenizer_key = None
    if tokenizer is not None:
        tokenizer_key = (type(tokenizer).__qualname__, tokenizer_name(tokenizer), len(tokenizer))
    return (dataclasses.replace(config, group_by_length=False), tokenizer_key, tuple(files))


def load_data(config: DataConfig, tokenizer: Tokenizer | None = None) -> TaskData:
    """Loads and tokenises every configured split of ``config``.

    Text tasks need ``tokenizer`` (see :func:`load_tokenizer`), except the
    synthetic task, which defaults to its own word tokenizer. Results are
    cached in memory by (config, tokenizer, file modification times), so
    repeated runs in one process (sweeps, tests) tokenise once.
    """
    if config.task == "image_classification":
        return load_image_task(config)
    kind, location = source_kind(config.source)
    if tokenizer is None:
        if kind != "synthetic":
            raise DataError(f"data.source {config.source!r} is text and needs a tokenizer (see load_tokenizer)")
        tokenizer = synthetic_tokenizer()
    key = _cache_key(config, tokenizer)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        cached = _CACHE[key]
        return dataclasses.replace(cached, group_by_length=config.group_by_length, config=config)
    task = _load_text_task(config, tokenizer)
    _CACHE[key] = task
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return task


def _within(candidates: np.ndarray | None, picked: np.ndarray | None) -> np.ndarray | None:
    """Rows of the file: ``picked`` positions among ``candidates`` (None: all of them)."""
    if picked is None:
        return candidates
    return picked if candidates is None else candidates[picked]


def _load_text_task(config: DataConfig, tokenizer: Tokenizer) -> TaskData:
    buckets = config.resolved_bucket_lengths()
    limits = {"train": config.max_train_rows, "eval": config.max_eval_rows, "test": config.max_test_rows}
    pad_id = padding_id(tokenizer)
    splits: dict[str, TextExamples] = {}
    label_names: tuple[str, ...] | None = None
    tables = {split: read_table(config, split) for split in SPLITS}
    candidates: dict[str, np.ndarray | None] = dict.fromkeys(SPLITS)  # the rows a split draws from; None: all
    if config.holdout_rows is not None:  # the test split is held out of the training file
        tables["test"] = tables["train"]
        candidates["train"], candidates["test"] = holdout_rows(tables["train"].num_rows, config.holdout_rows,
                                                               config.holdout_seed)
    for split, table in tables.items():
        if table is None:
            continue
        available = table.num_rows if candidates[split] is None else len(candidates[split])
        rows = _within(candidates[split], select_rows(available, limits[split], config.row_selection, config.row_seed))
        if config.task == "causal_lm":
            texts = table.column(config.text_columns[0], "data.text_columns", rows)
            texts = ["" if text is None else str(text) for text in texts]
            splits[split] = _language_model_examples(config, tokenizer, texts, table.where, buckets, pad_id)
            continue
        texts = [table.column(column, "data.text_columns", rows) for column in config.text_columns]
        texts = [["" if text is None else str(text) for text in column] for column in texts]
        where = f"{table.where} column {config.label_column!r}"
        labels = table.column(config.label_column, "data.label_column", rows)
        if split == "train":  # the training split fixes the class names for the others
            label_names = table.label_names(config.label_column) or _class_names_from_strings(labels)
        label_ids = _label_ids(labels, where, label_names)
        if split != "train" and label_names is None and "train" in splits:
            unseen = sorted({int(i) for i in label_ids if i > splits["train"].labels.max()})
            if unseen:
                raise DataError(f"{where} has labels {unseen[:5]} that the training split lacks; "
                                f"classes: 0..{int(splits['train'].labels.max())}")
        if split == "train" and config.shots_per_class is not None:
            picked = k_shot_rows(label_ids, config.shots_per_class, config.row_seed, names=label_names)
            texts, label_ids = [[column[i] for i in picked] for column in texts], label_ids[picked]
        ids, types = encode(tokenizer, texts[0], texts[1] if len(texts) > 1 else None, config.max_length)
        splits[split] = TextExamples.from_sequences(
            ids, labels=label_ids, token_type_ids=types, pad_id=pad_id, bucket_lengths=buckets
        )
    num_labels = None
    if config.task == "classification":
        num_labels = len(label_names) if label_names else 1 + max(int(s.labels.max()) for s in splits.values())
    return TaskData(
        task=config.task,
        splits=splits,
        num_labels=num_labels,
        label_names=label_names,
        group_by_length=config.group_by_length,
        config=config,
    )


def _language_model_examples(
    config: DataConfig,
    tokenizer: Tokenizer,
    texts: list[str],
    where: str,
    buckets: tuple[int, ...],
    pad_id: int,
) -> TextExamples:
    """Causal-LM sequences: packed into full blocks, or one padded sequence per text."""
    if config.lm_packing == "pad":
        ids, _ = encode(tokenizer, texts, None, config.max_length)
        ids = [sequence for sequence in ids if sequence]  # an empty text has nothing to predict
        if not ids:
            raise DataError(f"{where} has no non-empty text to train a language model on")
        return TextExamples.from_sequences(ids, pad_id=pad_id, bucket_lengths=buckets)
    ids, _ = encode(tokenizer, texts, None, None, add_special_tokens=False)
    separator = document_separator(tokenizer)
    stream = np.fromiter(
        itertools.chain.from_iterable(itertools.chain(sequence, separator) for sequence in ids), dtype=np.int64
    )
    block = config.max_length
    num_blocks = len(stream) // block
    if num_blocks == 0:
        raise DataError(
            f"{where} holds {len(stream)} tokens, less than one block of data.max_length={block}; "
            "lower max_length or use lm_packing: pad"
        )
    return TextExamples(
        token_ids=stream[: num_blocks * block].astype(np.int32),
        offsets=np.arange(num_blocks + 1, dtype=np.int64) * block,
        token_type_ids=None,
        labels=None,
        pad_id=pad_id,
        bucket_lengths=buckets,
    )
