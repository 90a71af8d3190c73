"""How similar two datasets look to an encoder: ``peftjax similarity A.yaml B.yaml``.

Each dataset is a data section (``source``, ``train_split``, ...) or an
experiment config, whose ``data`` is used. The encoder (a model name such as
``minilm``, or a checkpoint folder) embeds up to ``examples`` rows of each
(a seeded sample) as the domain-adaptation strategies see them: pooled
features (``peftjax.train.tasks.pooled_features``). Reported:

* the proxy A-distance (``peftjax.transfer.divergence.proxy_a_distance``):
  0 for one distribution, 2 for separable ones;
* the squared multi-kernel MMD between the two samples of embeddings.

Also here: a dataset's profile (rows, classes, lengths) that ``peftjax advise``
reads, and the check that two datasets share a label set.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import numpy as np

from peftjax.config import ConfigError, DataConfig, ModelSpec
from peftjax.data import TaskData, check_data_files, load_data, load_tokenizer
from peftjax.errors import PeftError
from peftjax.schema import read_tree
from peftjax.transfer.divergence import gaussian_mmd2, proxy_a_distance


def read_dataset(path: str | pathlib.Path) -> DataConfig:
    """The data section of a dataset file (a data section, or an experiment config's ``data``)."""
    path = pathlib.Path(path)
    tree = read_tree(path)
    section, prefix = (tree["data"], "data.") if isinstance(tree.get("data"), dict) else (tree, "")
    try:
        config = DataConfig.from_dict(section)
        check_data_files(config)
    except ConfigError as error:
        raise ConfigError(f"{error.detail} (in {path})", f"{prefix}{error.key}" if error.key else None) from None
    return config


def encoder_spec(model: str) -> ModelSpec:
    """A model name (``minilm``) or a checkpoint folder, as a model section."""
    folder = pathlib.Path(model).expanduser()
    return ModelSpec(name=folder.name, path=str(folder)) if folder.is_dir() else ModelSpec(name=model)


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A pretrained encoder and its tokenizer."""

    spec: ModelSpec
    model: Any
    tokenizer: Any

    @classmethod
    @functools.lru_cache(maxsize=2)  # one process measuring several pairs loads (and compiles) once
    def load(cls, model: str) -> Encoder:
        from peftjax.models import from_pretrained

        spec = encoder_spec(model)
        folder = spec.checkpoint_dir()
        if folder is None:
            raise PeftError(f"--model {model!r} names no pretrained checkpoint; give minilm or a checkpoint folder")
        return cls(spec, from_pretrained(folder), load_tokenizer(spec.tokenizer_dir()))

    def load_data(self, config: DataConfig) -> TaskData:
        return load_data(config, self.tokenizer)

    def embed(self, task: TaskData, *, split: str = "train", examples: int = 1000, seed: int = 0) -> np.ndarray:
        """Pooled features of up to ``examples`` rows of ``split``, drawn by ``seed``."""
        from peftjax.train.tasks import features_and_logits

        data = task[split]
        if len(data) > examples:
            keep = np.sort(np.random.default_rng(seed).choice(len(data), examples, replace=False))
            data = dataclasses.replace(data, **_subset(data, keep))
        features, _ = features_and_logits(self.model, data, 64)
        return features


def _subset(examples, rows: np.ndarray) -> dict[str, Any]:
    """The fields of ``TextExamples`` holding only ``rows``."""
    lengths = examples.lengths[rows]
    offsets = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    take = np.concatenate([np.arange(examples.offsets[r], examples.offsets[r + 1]) for r in rows])
    types = None if examples.token_type_ids is None else examples.token_type_ids[take]
    labels = None if examples.labels is None else examples.labels[rows]
    weights = None if examples.weights is None else examples.weights[rows]
    return dict(token_ids=examples.token_ids[take], offsets=offsets, token_type_ids=types, labels=labels,
                weights=weights)


def similarity(features_a: np.ndarray, features_b: np.ndarray, *, seed: int = 0) -> dict[str, float]:
    """Proxy A-distance (with the domain classifier's error) and squared MMD of two samples of features."""
    found = proxy_a_distance(features_a, features_b, seed=seed)
    size = found["examples"]
    rng = np.random.default_rng(seed)
    a = features_a[np.sort(rng.choice(len(features_a), size, replace=False))]
    b = features_b[np.sort(rng.choice(len(features_b), size, replace=False))]
    return {**found, "mmd2": float(gaussian_mmd2(a, b))}


def label_set(task: TaskData) -> tuple:
    """The classes of a task: its label names, else the class ids its training split uses."""
    if task.label_names:
        return tuple(task.label_names)
    return tuple(int(c) for c in np.unique(task["train"].labels))


def check_same_labels(source: TaskData, target: TaskData, source_where: str, target_where: str) -> None:
    """Raises unless the two datasets label the same classes: transfer between
    domains of one task, which is what similarity, domain adaptation and the
    advice compare."""
    if source.task != "classification" or target.task != "classification":
        raise PeftError(f"{source_where} and {target_where}: similarity and advice compare classification data")
    source_labels, target_labels = label_set(source), label_set(target)
    if source_labels != target_labels:
        raise PeftError(f"the source dataset {source_where} has labels {list(source_labels)} but {target_where} has "
                        f"{list(target_labels)}: domain transfer needs one label set (the same task in another "
                        "domain); map the labels to one set, or leave the source out")


@dataclasses.dataclass(frozen=True)
class DatasetProfile:
    """What ``advise`` reads from a dataset: size, classes, lengths in tokens."""

    rows: int
    classes: int
    per_class: tuple[int, ...]
    length_median: float
    length_p95: float
    max_length: int

    @classmethod
    def of(cls, task: TaskData) -> DatasetProfile:
        train = task["train"]
        counts = np.bincount(train.labels, minlength=task.num_labels or 0) if train.labels is not None else ()
        lengths = train.lengths
        return cls(rows=len(train), classes=len(counts), per_class=tuple(int(c) for c in counts),
                   length_median=float(np.median(lengths)), length_p95=float(np.percentile(lengths, 95)),
                   max_length=task.config.max_length if task.config is not None else int(lengths.max()))

    @property
    def smallest_class(self) -> int:
        return min(self.per_class) if self.per_class else self.rows
