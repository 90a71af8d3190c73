"""Data pipeline: from files (or the hub) to fixed-shape numpy batches.

Everything is loaded and tokenised once, held in memory as flat numpy arrays,
and cut into batches on demand; nothing here touches jax, so the trainer
decides where batches go.

Batches are dicts of numpy arrays with a fixed batch dimension ``B``:

======================  ==================  =========================================
task                    key                 array
======================  ==================  =========================================
classification          ``input_ids``       int32 [B, T], ``T`` one of the buckets
                        ``attention_mask``  int32 [B, T], 1 = real token
                        ``token_type_ids``  int32 [B, T], only if the tokenizer gives them
                        ``labels``          int32 [B]
causal_lm               ``input_ids``,      as above
                        ``attention_mask``
                        ``labels``          int32 [B, T]: ``input_ids`` with padding set
                                            to ``IGNORE_INDEX`` (-100); not shifted, the
                                            loss predicts ``labels[:, 1:]`` from
                                            ``logits[:, :-1]``
image_classification    ``pixel_values``    float32 [B, H, W, C]
                        ``labels``          int32 [B]
every task              ``weights``         float32 [B]: 1 for a real example, 0 for
                                            a row that only fills the last batch
======================  ==================  =========================================

Shapes stay few so jit compiles few times: each text batch is padded to the
smallest bucket length that fits its longest sequence, and every batch has
``B`` rows. Training drops an epoch's last partial batch; evaluation fills it
with copies of a real example whose ``weights`` are 0 (copies, not padding, so
no row is fully masked), hence a weighted sum counts each example exactly once.

Order is a pure function of ``(seed, epoch)``: shuffling uses
``numpy.random.default_rng((seed, epoch))``. A :class:`LoaderState` (epoch,
batch index within the epoch) therefore pins the position exactly; the trainer
saves ``iterator.state`` in checkpoints and resumes with ``loader.iterate(state)``.
"""

from __future__ import annotations

import collections
import contextlib
import csv
import dataclasses
import difflib
import itertools
import math
import os
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from peftjax.config import ConfigError, DataConfig
from peftjax.errors import PeftError

__all__ = [
    "IGNORE_INDEX",
    "BatchIterator",
    "BatchLoader",
    "DataError",
    "DataFileNotFoundError",
    "ImageExamples",
    "LoaderState",
    "TaskData",
    "TextExamples",
    "WordTokenizer",
    "check_data_files",
    "check_tokenizer_matches",
    "clear_cache",
    "image_task_from_arrays",
    "load_data",
    "load_image_folder",
    "load_tokenizer",
    "require_shared_data",
    "select_rows",
    "shared_data_dir",
    "split_sizes",
    "sst2_path",
    "synthetic_sentiment",
]

# Label value that losses skip (the convention of Hugging Face and optax users).
IGNORE_INDEX = -100
# Environment variable that moves the shared data folder.
SHARED_DATA_ENV = "PEFTJAX_SHARED_DATA"

_SPLITS = ("train", "eval", "test")
_TEXT_SUFFIXES = {".tsv": "tsv", ".csv": "csv", ".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
# Texts go to the tokenizer in chunks so the Python lists it returns stay small.
_TOKENIZE_CHUNK = 4096


class DataError(PeftError):
    """Data that cannot be loaded or does not fit the model; the message says how to fix it."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A data file or folder the config names does not exist."""


# --------------------------------------------------------------------------
# Shared data.
# --------------------------------------------------------------------------


def shared_data_dir() -> pathlib.Path:
    """The shared data folder: ``$PEFTJAX_SHARED_DATA``, else ``<repo>/../shared/data``.

    The shared data lives beside the repository and is never copied into it.
    When the package is not imported from a checkout (so ``<repo>`` is
    site-packages), ``../shared/data`` from the working directory is used.
    """
    override = os.environ.get(SHARED_DATA_ENV)
    if override:
        return pathlib.Path(override).expanduser().resolve()
    repo = pathlib.Path(__file__).resolve().parents[2]
    beside_repo = (repo.parent / "shared" / "data").resolve()
    if beside_repo.exists():
        return beside_repo
    beside_cwd = (pathlib.Path.cwd().parent / "shared" / "data").resolve()
    return beside_cwd if beside_cwd.exists() else beside_repo


def sst2_path() -> pathlib.Path:
    """The shared SST-2 folder (``train.tsv``, ``dev.tsv``, ``test.tsv``)."""
    return shared_data_dir() / "sst2"


def require_shared_data(*relative_paths: str) -> pathlib.Path:
    """Test helper: the shared data folder, when ``relative_paths`` exist in it.

    When something is missing the calling test fails if ``CI=true`` (CI must
    have the data, and a silent skip would hide that) and is skipped with the
    expected location otherwise. pytest is imported only here.
    """
    root = shared_data_dir()
    missing = [str(root / path) for path in relative_paths or ("",) if not (root / path).exists()]
    if not missing:
        return root
    import pytest

    message = (
        f"shared data missing: {', '.join(missing)}; it is expected at {root} "
        f"(<repo>/../shared/data, or set ${SHARED_DATA_ENV})"
    )
    if os.environ.get("CI", "").strip().lower() == "true":
        pytest.fail(f"{message}; CI=true requires it", pytrace=False)
    pytest.skip(message)
    raise AssertionError("unreachable")  # pytest.skip raises


def _looks_shared(path: pathlib.Path) -> bool:
    text = str(path)
    return "shared/data" in text.replace(os.sep, "/") or str(shared_data_dir()) in text


def _missing_file_error(path: pathlib.Path, what: str, tried: Sequence[pathlib.Path] = ()) -> DataFileNotFoundError:
    message = f"{what} not found: {path}"
    if tried:
        message += f" (tried {', '.join(p.name for p in tried)})"
    if _looks_shared(path):
        message += (
            f". The shared data is expected at {shared_data_dir()}, beside the repository "
            f"(<repo>/../shared/data, e.g. sst2/train.tsv); set ${SHARED_DATA_ENV} if it lives elsewhere"
        )
    return DataFileNotFoundError(message)


# --------------------------------------------------------------------------
# Where a config's data is.
# --------------------------------------------------------------------------


def _source_kind(source: str) -> tuple[str, str]:
    """``(kind, location)`` with kind ``local``, ``hub`` or ``synthetic``."""
    if source.startswith("hub:"):
        return "hub", source.removeprefix("hub:")
    if source.startswith("synthetic:"):
        return "synthetic", source.removeprefix("synthetic:")
    if source.startswith("shared:"):
        return "local", str(shared_data_dir() / source.removeprefix("shared:"))
    return "local", str(pathlib.Path(source).expanduser())


def _split_name(config: DataConfig, split: str) -> str | None:
    return getattr(config, f"{split}_split")


def _local_split_path(config: DataConfig, split: str) -> pathlib.Path | None:
    """The file (text) or folder (images) of one split of a local source; raises if absent."""
    name = _split_name(config, split)
    if name is None:
        return None
    folder = pathlib.Path(_source_kind(config.source)[1])
    path = pathlib.Path(name).expanduser()
    if not path.is_absolute():
        if folder.is_file():
            raise DataError(
                f"data.source={config.source!r} is a file; data.source names the folder and "
                f"data.{split}_split the file in it (data.source: {folder.parent}, "
                f"data.{split}_split: {folder.name})"
            )
        if not folder.is_dir():
            raise _missing_file_error(folder, f"data folder (data.source={config.source!r})")
        path = folder / path
    key = f"data.{split}_split={name!r}"
    if config.task == "image_classification":
        if not path.is_dir():
            raise _missing_file_error(path, f"image folder ({key})")
        return path
    if path.is_file():
        return path
    tried = []
    if not path.suffix:
        tried = [path.with_suffix(suffix) for suffix in _TEXT_SUFFIXES]
        found = [candidate for candidate in tried if candidate.is_file()]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise DataError(f"{key} matches several files ({', '.join(map(str, found))}); name one with its extension")
    raise _missing_file_error(path, f"data file ({key})", tried)


def check_data_files(config: DataConfig) -> None:
    """Raises ConfigError naming the key and path when a local split file is missing.

    Hub and synthetic sources are not checked (that needs the network or is
    always fine). ``load_config`` calls this so a typo fails at once.
    """
    if _source_kind(config.source)[0] != "local":
        return
    for split in _SPLITS:
        try:
            _local_split_path(config, split)
        except DataError as error:
            message = str(error)
            key = "data.source" if "data folder" in message or "is a file" in message else f"data.{split}_split"
            raise ConfigError(str(error), key) from None


# --------------------------------------------------------------------------
# Loader state and batching.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoaderState:
    """Position of the next batch: epoch and batch index within that epoch.

    Saved in checkpoints; ``loader.iterate(state)`` continues with exactly the
    batches that were not yet seen. After an epoch's last batch the state is
    ``(epoch + 1, 0)``.
    """

    epoch: int = 0
    step_in_epoch: int = 0

    def __post_init__(self) -> None:
        if self.epoch < 0 or self.step_in_epoch < 0:
            raise DataError(f"LoaderState fields must not be negative, got {self}")

    def to_dict(self) -> dict[str, int]:
        """Plain ints for JSON checkpoints."""
        return {"epoch": int(self.epoch), "step_in_epoch": int(self.step_in_epoch)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LoaderState:
        """Inverse of :meth:`to_dict`."""
        return cls(epoch=int(data["epoch"]), step_in_epoch=int(data["step_in_epoch"]))


class Examples(Protocol):
    """What a loader batches: a split held in memory."""

    def __len__(self) -> int: ...

    def collate(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The batch made of these examples, in this order."""
        ...

    def group_keys(self) -> np.ndarray | None:
        """Per-example shape group (bucket index) for grouping by length, or None."""
        ...

    def sequence_lengths(self) -> tuple[int, ...]:
        """Every padded length a batch may have (empty for non-sequence data)."""
        ...


class BatchLoader:
    """Cuts one split into fixed-size batches, in an order fixed by (seed, epoch).

    Build one with :meth:`for_training` (shuffled, last partial batch dropped)
    or :meth:`for_evaluation` (file order, last batch filled with weight-0
    rows). Iterating a loader directly gives one pass over epoch 0.
    """

    def __init__(
        self,
        examples: Examples,
        *,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        group_by_length: bool = False,
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}")
        if seed < 0:
            raise DataError(f"the shuffle seed must not be negative, got {seed}")
        if len(examples) == 0:
            raise DataError("cannot batch an empty split")
        self.examples = examples
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self._group_keys = examples.group_keys() if group_by_length else None
        if group_by_length and self._group_keys is None:
            raise DataError("group_by_length needs sequences; these examples have one shape")
        self.steps_per_epoch = self._count_batches()
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the split has {len(examples)} examples, fewer than one batch of {batch_size} "
                "(training drops partial batches); lower train.batch_size or use more rows"
            )

    @classmethod
    def for_training(
        cls, examples: Examples, batch_size: int, *, seed: int = 0, group_by_length: bool = False
    ) -> BatchLoader:
        """Shuffled by (seed, epoch); each epoch's last partial batch is dropped."""
        return cls(
            examples, batch_size=batch_size, shuffle=True, drop_last=True, seed=seed, group_by_length=group_by_length
        )

    @classmethod
    def for_evaluation(cls, examples: Examples, batch_size: int, *, group_by_length: bool = False) -> BatchLoader:
        """In order; every example once, the last batch filled with weight-0 rows."""
        return cls(examples, batch_size=batch_size, shuffle=False, drop_last=False, group_by_length=group_by_length)

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def _count_batches(self) -> int:
        rounding = (lambda n: n // self.batch_size) if self.drop_last else (lambda n: -(-n // self.batch_size))
        if self._group_keys is None:
            return rounding(len(self.examples))
        return sum(rounding(int(count)) for count in np.bincount(self._group_keys) if count)

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        """The example indices of each batch of ``epoch`` (partial only when not dropping)."""
        rng = np.random.default_rng((self.seed, epoch))
        order = rng.permutation(len(self.examples)) if self.shuffle else np.arange(len(self.examples))
        if self._group_keys is None:
            groups = [order]
        else:
            keys = self._group_keys[order]
            order = order[np.argsort(keys, kind="stable")]  # random within a group when shuffled
            boundaries = np.flatnonzero(np.diff(np.sort(keys))) + 1
            groups = np.split(order, boundaries)
        batches = []
        for group in groups:
            full = len(group) - len(group) % self.batch_size if self.drop_last else len(group)
            batches.extend(group[start : start + self.batch_size] for start in range(0, full, self.batch_size))
        if self.shuffle and self._group_keys is not None:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The batch of these examples, filled to ``batch_size`` with weight-0 copies."""
        indices = np.asarray(indices, dtype=np.int64)
        real = len(indices)
        if real > self.batch_size or real == 0:
            raise DataError(f"a batch takes 1 to {self.batch_size} examples, got {real}")
        filled = np.concatenate([indices, np.full(self.batch_size - real, indices[-1])])
        batch = self.examples.collate(filled)
        weights = np.zeros(self.batch_size, np.float32)
        weights[:real] = 1.0
        batch["weights"] = weights
        return batch

    def iterate(self, state: LoaderState | None = None, *, stop_epoch: int | None = None) -> BatchIterator:
        """Batches from ``state`` on, across epochs, until ``stop_epoch`` starts (None: forever)."""
        return BatchIterator(self, state or LoaderState(), stop_epoch)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iterate(LoaderState(), stop_epoch=1)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batch_shapes(self) -> list[tuple[int, ...]]:
        """Every ``(B, T)`` a batch's token arrays may have, or ``[(B,)]`` without sequences."""
        lengths = self.examples.sequence_lengths()
        if not lengths:
            return [(self.batch_size,)]
        return [(self.batch_size, length) for length in lengths]


class BatchIterator(Iterator[dict[str, np.ndarray]]):
    """Yields batches; ``state`` is always the position of the next one."""

    def __init__(self, loader: BatchLoader, state: LoaderState, stop_epoch: int | None) -> None:
        if state.step_in_epoch > loader.steps_per_epoch:
            raise DataError(
                f"{state} is past the end of an epoch of {loader.steps_per_epoch} batches; was it saved "
                "with another batch size, data subset or group_by_length setting?"
            )
        self._loader = loader
        self._state = state
        self._stop_epoch = stop_epoch
        self._plan_epoch: int | None = None
        self._plan: list[np.ndarray] = []

    @property
    def state(self) -> LoaderState:
        return self._state

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, step = self._state.epoch, self._state.step_in_epoch
        if step >= self._loader.steps_per_epoch:
            epoch, step = epoch + 1, 0
        if self._stop_epoch is not None and epoch >= self._stop_epoch:
            self._state = LoaderState(epoch, step)
            raise StopIteration
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self._loader.epoch_plan(epoch), epoch
        batch = self._loader.batch(self._plan[step])
        step += 1
        self._state = LoaderState(epoch + 1, 0) if step == self._loader.steps_per_epoch else LoaderState(epoch, step)
        return batch


# --------------------------------------------------------------------------
# Examples held in memory.
# --------------------------------------------------------------------------


def _bucket_index(lengths: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    return np.searchsorted(np.asarray(buckets), lengths, side="left")


@dataclasses.dataclass(frozen=True, eq=False)
class TextExamples:
    """Tokenised sequences of one split, stored back to back in flat arrays.

    Sequence ``i`` is ``token_ids[offsets[i]:offsets[i + 1]]``. Flat storage
    keeps 60k sentences in two small arrays instead of 60k Python lists.
    ``labels`` is int32 [N] for classification and None for causal LM (whose
    labels are the tokens themselves).
    """

    token_ids: np.ndarray
    offsets: np.ndarray
    token_type_ids: np.ndarray | None
    labels: np.ndarray | None
    pad_id: int
    bucket_lengths: tuple[int, ...]
    lengths: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        lengths = np.diff(self.offsets)
        object.__setattr__(self, "lengths", lengths)
        if len(lengths) and int(lengths.max()) > self.bucket_lengths[-1]:
            raise DataError(
                f"a sequence of {int(lengths.max())} tokens is longer than the largest bucket "
                f"{self.bucket_lengths[-1]}; truncate to max_length"
            )
        if self.labels is not None and len(self.labels) != len(lengths):
            raise DataError(f"{len(self.labels)} labels for {len(lengths)} sequences")

    @classmethod
    def from_sequences(
        cls,
        sequences: Sequence[Sequence[int]],
        *,
        labels: Sequence[int] | None = None,
        token_type_ids: Sequence[Sequence[int]] | None = None,
        pad_id: int = 0,
        bucket_lengths: tuple[int, ...],
    ) -> TextExamples:
        """Packs lists of token ids (as tokenizers return them)."""
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        offsets = np.zeros(len(sequences) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(sequences), dtype=np.int64, count=int(offsets[-1]))
        types = None
        if token_type_ids is not None:
            types = np.fromiter(itertools.chain.from_iterable(token_type_ids), dtype=np.int64, count=int(offsets[-1]))
            types = types.astype(np.int32)
        return cls(
            token_ids=flat.astype(np.int32),
            offsets=offsets,
            token_type_ids=types,
            labels=None if labels is None else np.asarray(labels, np.int32),
            pad_id=pad_id,
            bucket_lengths=tuple(bucket_lengths),
        )

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def is_causal_lm(self) -> bool:
        return self.labels is None

    def max_token_id(self) -> int:
        return int(self.token_ids.max()) if len(self.token_ids) else -1

    def group_keys(self) -> np.ndarray:
        return _bucket_index(self.lengths, self.bucket_lengths)

    def sequence_lengths(self) -> tuple[int, ...]:
        return self.bucket_lengths

    def sequence(self, index: int) -> np.ndarray:
        """Token ids of one example (for inspection and tests)."""
        return self.token_ids[self.offsets[index] : self.offsets[index + 1]]

    def collate(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        lengths = self.lengths[indices]
        width = self.bucket_lengths[int(_bucket_index(lengths.max(keepdims=True), self.bucket_lengths)[0])]
        positions = np.arange(width)
        mask = positions[None, :] < lengths[:, None]
        gather = np.minimum(self.offsets[indices][:, None] + positions[None, :], max(len(self.token_ids) - 1, 0))
        input_ids = np.where(mask, self.token_ids[gather], self.pad_id).astype(np.int32)
        batch = {"input_ids": input_ids, "attention_mask": mask.astype(np.int32)}
        if self.token_type_ids is not None:
            batch["token_type_ids"] = np.where(mask, self.token_type_ids[gather], 0).astype(np.int32)
        if self.labels is None:
            batch["labels"] = np.where(mask, input_ids, IGNORE_INDEX).astype(np.int32)
        else:
            batch["labels"] = self.labels[indices]
        return batch


@dataclasses.dataclass(frozen=True, eq=False)
class ImageExamples:
    """Images of one split: float32 [N, H, W, C] (already resized and normalised) and labels."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"images must be [N, H, W, C], got shape {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels must be [N] = [{self.images.shape[0]}], got shape {self.labels.shape}")

    @classmethod
    def from_arrays(cls, images: np.ndarray, labels: np.ndarray) -> ImageExamples:
        """Wraps arrays; uint8 images are scaled to [0, 1], other dtypes are kept as values."""
        images = np.asarray(images)
        if images.dtype == np.uint8:
            images = images.astype(np.float32) / 255.0
        elif not np.issubdtype(images.dtype, np.number):
            raise DataError(f"images must be numeric, got dtype {images.dtype}")
        labels = np.asarray(labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"image labels must be integers, got dtype {labels.dtype}")
        if labels.size and labels.min() < 0:
            raise DataError(f"image labels must not be negative, got {labels.min()}")
        return cls(images=images.astype(np.float32), labels=labels.astype(np.int32))

    def __len__(self) -> int:
        return len(self.labels)

    def group_keys(self) -> None:
        return None

    def sequence_lengths(self) -> tuple[int, ...]:
        return ()

    def collate(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return {"pixel_values": self.images[indices], "labels": self.labels[indices]}


@dataclasses.dataclass(frozen=True, eq=False)
class TaskData:
    """The loaded splits of one task and what a model head needs to know about them."""

    task: str
    splits: Mapping[str, TextExamples | ImageExamples]
    num_labels: int | None
    label_names: tuple[str, ...] | None = None
    group_by_length: bool = False
    config: DataConfig | None = None

    def __getitem__(self, split: str) -> TextExamples | ImageExamples:
        if split not in self.splits:
            raise DataError(f"no {split!r} split was loaded (set data.{split}_split); loaded: {sorted(self.splits)}")
        return self.splits[split]

    def train_loader(self, batch_size: int, *, seed: int = 0) -> BatchLoader:
        """Shuffled training batches of the ``train`` split."""
        return BatchLoader.for_training(self["train"], batch_size, seed=seed, group_by_length=self.group_by_length)

    def eval_loader(self, batch_size: int, split: str = "eval") -> BatchLoader:
        """One ordered pass over ``split`` (``eval`` or ``test``), every example counted once."""
        return BatchLoader.for_evaluation(self[split], batch_size, group_by_length=self.group_by_length)

    def max_token_id(self) -> int:
        """The largest token id in any split (-1 for images)."""
        ids = [examples.max_token_id() for examples in self.splits.values() if isinstance(examples, TextExamples)]
        return max(ids, default=-1)


# --------------------------------------------------------------------------
# Tokenizers.
# --------------------------------------------------------------------------


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer this module uses."""

    pad_token_id: int | None

    def __call__(self, text: Any, text_pair: Any = None, **kwargs: Any) -> Mapping[str, Any]: ...

    def __len__(self) -> int: ...


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """A tokenizer from a local folder (tokenizer.json / vocab files) with AutoTokenizer.

    Only local folders: runs and tests must not download.
    """
    folder = pathlib.Path(path).expanduser()
    if not folder.is_dir():
        raise _missing_file_error(folder, "tokenizer folder")
    from transformers import AutoTokenizer  # lazy: transformers takes seconds to import

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise DataError(f"could not load a tokenizer from {folder}: {error}") from None


def _tokenizer_name(tokenizer: Tokenizer) -> str:
    return str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)


def check_tokenizer_matches(
    tokenizer: Tokenizer, vocab_size: int, model_name: str, data: TaskData | TextExamples | None = None
) -> None:
    """Raises DataError when token ids could index past the model's embedding table.

    A tokenizer with more tokens than the model's vocabulary is the usual sign
    that it belongs to another model; on an accelerator the out-of-range ids
    would not fail but silently read garbage embeddings. With ``data``, the ids
    actually present are checked as well.
    """
    size = len(tokenizer)
    name = _tokenizer_name(tokenizer)
    fix = "use the tokenizer saved with the model's checkpoint (model.tokenizer, or the checkpoint folder)"
    if size > vocab_size:
        raise DataError(
            f"tokenizer {name!r} has {size} tokens but model {model_name!r} embeds only {vocab_size}: "
            f"ids from {vocab_size} on have no embedding; {fix}"
        )
    if data is not None:
        largest = data.max_token_id()
        if largest >= vocab_size:
            raise DataError(
                f"the data holds token id {largest} but model {model_name!r} embeds only ids below "
                f"{vocab_size} (tokenised with {name!r}); {fix}"
            )


class WordTokenizer:
    """A whitespace tokenizer over a fixed word list, with BERT-style special tokens.

    It lets the built-in synthetic task (and tests) run without any tokenizer
    files. It answers the calls this module makes of a Hugging Face tokenizer:
    ``tok(texts, pairs, truncation=, max_length=, add_special_tokens=)``.
    """

    special_tokens = ("[PAD]", "[CLS]", "[SEP]", "[UNK]")
    pad_token_id = 0
    cls_token_id = 1
    sep_token_id = 2
    unk_token_id = 3
    eos_token_id = 2

    def __init__(self, words: Sequence[str], name: str = "peftjax-words") -> None:
        vocabulary = list(self.special_tokens) + sorted(set(words) - set(self.special_tokens))
        self.vocab = {word: index for index, word in enumerate(vocabulary)}
        self.name_or_path = name

    def __len__(self) -> int:
        return len(self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.get(word, self.unk_token_id) for word in text.lower().split()]

    def _encode_one(
        self, first: str, second: str | None, truncation: bool, max_length: int | None, add_special_tokens: bool
    ) -> tuple[list[int], list[int]]:
        a, b = self._ids(first), (self._ids(second) if second is not None else None)
        specials = (3 if b is not None else 2) if add_special_tokens else 0
        if truncation and max_length is not None:
            budget = max(max_length - specials, 0)
            while len(a) + len(b or ()) > budget:  # longest first, as Hugging Face does
                (a if b is None or len(a) >= len(b) else b).pop()
        if add_special_tokens:
            a = [self.cls_token_id, *a, self.sep_token_id]
            b = None if b is None else [*b, self.sep_token_id]
        ids = a + (b or [])
        types = [0] * len(a) + [1] * len(b or [])
        return ids, types

    def __call__(
        self,
        text: str | Sequence[str],
        text_pair: str | Sequence[str] | None = None,
        *,
        truncation: bool = False,
        max_length: int | None = None,
        add_special_tokens: bool = True,
        **_: Any,
    ) -> dict[str, Any]:
        single = isinstance(text, str)
        firsts = [text] if single else list(text)
        seconds = [text_pair] if single and text_pair is not None else text_pair
        if seconds is not None and len(seconds) != len(firsts):
            raise DataError(f"{len(firsts)} texts but {len(seconds)} pair texts")
        encoded = [
            self._encode_one(first, None if seconds is None else seconds[i], truncation, max_length, add_special_tokens)
            for i, first in enumerate(firsts)
        ]
        ids = [e[0] for e in encoded]
        types = [e[1] for e in encoded]
        masks = [[1] * len(e[0]) for e in encoded]
        if single:
            return {"input_ids": ids[0], "token_type_ids": types[0], "attention_mask": masks[0]}
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": masks}


def _encode(
    tokenizer: Tokenizer,
    first: list[str],
    second: list[str] | None,
    max_length: int | None,
    add_special_tokens: bool = True,
) -> tuple[list[list[int]], list[list[int]] | None]:
    """Token ids (and token type ids when the tokenizer gives them), chunk by chunk."""
    ids: list[list[int]] = []
    types: list[list[int]] | None = []
    for start in range(0, len(first), _TOKENIZE_CHUNK):
        stop = start + _TOKENIZE_CHUNK
        encoding = tokenizer(
            first[start:stop],
            None if second is None else second[start:stop],
            truncation=max_length is not None,
            max_length=max_length,
            padding=False,
            add_special_tokens=add_special_tokens,
            return_attention_mask=False,
            verbose=False,
        )
        ids.extend(encoding["input_ids"])
        chunk_types = encoding.get("token_type_ids")
        if chunk_types is None or types is None:
            types = None
        else:
            types.extend(chunk_types)
    return ids, types


def _pad_id(tokenizer: Tokenizer) -> int:
    for attribute in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return value
    return 0


def _document_separator(tokenizer: Tokenizer) -> list[int]:
    for attribute in ("eos_token_id", "sep_token_id"):
        value = getattr(tokenizer, attribute, None)
        if isinstance(value, int):
            return [value]
    return []


# --------------------------------------------------------------------------
# The built-in synthetic task.
# --------------------------------------------------------------------------

_POSITIVE = ("good", "great", "wonderful", "delightful", "brilliant", "charming", "moving", "superb", "funny", "fresh")
_NEGATIVE = ("bad", "awful", "boring", "dull", "clumsy", "tedious", "bland", "weak", "messy", "stale")
_NEUTRAL = (
    "the", "film", "movie", "plot", "story", "acting", "cast", "script", "music", "ending",
    "is", "was", "quite", "really", "a", "and", "with", "its", "director", "scenes",
)  # fmt: skip
_NEGATION = "not"
_SYNTHETIC_SIZES = {"train": 2048, "eval": 512, "test": 512}
_SYNTHETIC_TASKS = ("sentiment",)


def synthetic_sentiment(split: str, num_rows: int | None = None) -> tuple[list[str], list[int]]:
    """Sentences and labels of the built-in sentiment task (no files, no download).

    Each sentence mixes neutral words with one to four sentiment words; "not"
    flips the word after it. The label is 1 when the positive words outweigh
    the negative ones (ties never occur), so a model must read several words
    and the negation, yet a small model learns it in a few hundred steps. The
    splits are fixed: ``train`` 2048, ``eval`` 512, ``test`` 512 rows, each from
    its own seed.
    """
    if split not in _SYNTHETIC_SIZES:
        raise DataError(f"the synthetic task has splits {list(_SYNTHETIC_SIZES)}, not {split!r}")
    rng = np.random.default_rng((5, _SPLITS.index(split)))
    count = _SYNTHETIC_SIZES[split] if num_rows is None else num_rows
    texts, labels = [], []
    while len(texts) < count:
        # Units keep "not" next to its word when later phrases are inserted.
        units = [[str(word)] for word in rng.choice(_NEUTRAL, size=int(rng.integers(2, 24)))]
        score = 0
        for _ in range(int(rng.integers(1, 5))):
            positive = bool(rng.integers(2))
            phrase = [str(rng.choice(_POSITIVE if positive else _NEGATIVE))]
            if rng.random() < 0.25:
                phrase.insert(0, _NEGATION)
                positive = not positive
            score += 1 if positive else -1
            units.insert(int(rng.integers(len(units) + 1)), phrase)
        if score == 0:
            continue
        texts.append(" ".join(itertools.chain.from_iterable(units)))
        labels.append(int(score > 0))
    return texts, labels


def synthetic_tokenizer() -> WordTokenizer:
    """The word tokenizer that covers the synthetic task's vocabulary."""
    return WordTokenizer(_POSITIVE + _NEGATIVE + _NEUTRAL + (_NEGATION,), name="peftjax-synthetic-words")


# --------------------------------------------------------------------------
# Reading tables.
# --------------------------------------------------------------------------


def select_rows(num_rows: int, limit: int | None, mode: str, seed: int) -> np.ndarray | None:
    """Row indices kept by ``max_*_rows`` (None = all rows), in file order.

    ``first`` keeps rows 0..limit-1; ``sample`` keeps ``limit`` rows drawn
    without replacement by ``numpy.random.default_rng(seed)``, sorted.
    """
    if limit is None or limit >= num_rows:
        return None
    if mode == "first":
        return np.arange(limit)
    if mode == "sample":
        return np.sort(np.random.default_rng(seed).choice(num_rows, size=limit, replace=False))
    raise DataError(f"row selection must be 'first' or 'sample', got {mode!r}")


@dataclasses.dataclass
class _Table:
    """Columns of one split before tokenisation, however they were read."""

    where: str  # a path or hub name, for error messages
    num_rows: int
    columns: list[str]
    read: Any  # (column name, row indices or None) -> list of values
    label_names: Any = None  # column name -> tuple of class names, when the source has them

    def column(self, name: str, config_key: str, rows: np.ndarray | None) -> list[Any]:
        if name not in self.columns:
            close = difflib.get_close_matches(name, self.columns, n=1)
            suggestion = f"; did you mean {close[0]!r}?" if close else ""
            raise DataError(
                f"column {name!r} ({config_key}) not found in {self.where}; columns present: {self.columns}{suggestion}"
            )
        return self.read(name, rows)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """The ``datasets`` module with its progress bars off (their setting restored after)."""
    import datasets  # lazy: importing datasets takes a second

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if enabled:
            datasets.enable_progress_bars()


def _arrow_table(dataset: Any, where: str) -> _Table:
    table = dataset.data  # the underlying Arrow table; no row selection was applied to it

    def read(name: str, rows: np.ndarray | None) -> list[Any]:
        column = table.column(name)
        if rows is not None:
            column = column.take(rows)
        return column.to_pylist()

    features = dataset.features

    def label_names(name: str) -> tuple[str, ...] | None:
        names = getattr(features.get(name), "names", None)
        return tuple(names) if names else None

    return _Table(where, dataset.num_rows, list(dataset.column_names), read, label_names)


def _file_format(config: DataConfig, path: pathlib.Path) -> str:
    if config.format != "auto":
        return config.format
    suffix = path.suffix.lower()
    if suffix not in _TEXT_SUFFIXES:
        raise DataError(f"cannot tell the format of {path} from its extension; set data.format (csv, tsv, ...)")
    return _TEXT_SUFFIXES[suffix]


def _read_local_table(config: DataConfig, path: pathlib.Path) -> _Table:
    file_format = _file_format(config, path)
    if file_format in ("csv", "tsv"):
        # keep_default_na=False: a sentence such as "null" or "NA" stays text.
        builder, options = "csv", {"keep_default_na": False}
        if file_format == "tsv":
            options.update(delimiter="\t", quoting=csv.QUOTE_NONE)  # TSV has no quoting
    elif file_format in ("json", "jsonl"):
        builder, options = "json", {}
    else:
        builder, options = "parquet", {}
    with _quiet_datasets() as datasets:
        try:
            dataset = datasets.load_dataset(
                builder, data_files={"data": str(path)}, split="data", cache_dir=config.cache_dir, **options
            )
        except Exception as error:  # datasets wraps parser errors in many types
            raise DataError(f"could not read {path} as {file_format}: {type(error).__name__}: {error}") from None
    return _arrow_table(dataset, str(path))


def _read_hub_table(config: DataConfig, name: str, split_name: str) -> _Table:
    where = f"hub dataset {name!r}" + (f" ({config.subset})" if config.subset else "") + f" split {split_name!r}"
    with _quiet_datasets() as datasets:
        try:
            dataset = datasets.load_dataset(name, config.subset, split=split_name, cache_dir=config.cache_dir)
        except Exception as error:  # connection, missing dataset, missing split, ...
            raise DataError(
                f"could not load {where}: {type(error).__name__}: {error}. Offline, the hub is only reachable "
                "through its local cache; use a local copy instead (for SST-2: data.source: shared:sst2)"
            ) from None
    return _arrow_table(dataset, where)


def _read_synthetic_table(name: str, split: str) -> _Table:
    if name not in _SYNTHETIC_TASKS:
        raise DataError(f"unknown synthetic task {name!r}; built in: {list(_SYNTHETIC_TASKS)}")
    texts, labels = synthetic_sentiment(split)
    values = {"sentence": texts, "label": labels}

    def read(column: str, rows: np.ndarray | None) -> list[Any]:
        data = values[column]
        return data if rows is None else [data[i] for i in rows]

    return _Table(f"synthetic:{name} ({split})", len(texts), list(values), read, lambda column: None)


def _read_table(config: DataConfig, split: str) -> _Table | None:
    split_name = _split_name(config, split)
    if split_name is None:
        return None
    kind, location = _source_kind(config.source)
    if kind == "synthetic":
        return _read_synthetic_table(location, split)
    if kind == "hub":
        return _read_hub_table(config, location, split_name)
    return _read_local_table(config, _local_split_path(config, split))


def split_sizes(config: DataConfig) -> dict[str, int]:
    """Rows in each configured split before ``max_*_rows``, read without tokenising (fast)."""
    if config.task == "image_classification":
        raise DataError("split_sizes counts rows of text tables; load image folders with load_data")
    sizes = {}
    for split in _SPLITS:
        table = _read_table(config, split)
        if table is not None:
            sizes[split] = table.num_rows
    return sizes


# --------------------------------------------------------------------------
# Labels.
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# Loading.
# --------------------------------------------------------------------------

_CACHE: collections.OrderedDict[tuple, TaskData] = collections.OrderedDict()
_CACHE_SIZE = 4


def clear_cache() -> None:
    """Forgets every tokenised task kept in memory by :func:`load_data`."""
    _CACHE.clear()


def _cache_key(config: DataConfig, tokenizer: Tokenizer | None) -> tuple:
    files = []
    if _source_kind(config.source)[0] == "local" and config.task != "image_classification":
        for split in _SPLITS:
            path = _local_split_path(config, split)
            if path is not None:
                stat = path.stat()
                files.append((str(path), stat.st_mtime_ns, stat.st_size))
    tokenizer_key = None
    if tokenizer is not None:
        tokenizer_key = (type(tokenizer).__qualname__, _tokenizer_name(tokenizer), len(tokenizer))
    return (dataclasses.replace(config, group_by_length=False), tokenizer_key, tuple(files))


def load_data(config: DataConfig, tokenizer: Tokenizer | None = None) -> TaskData:
    """Loads and tokenises every configured split of ``config``.

    Text tasks need ``tokenizer`` (see :func:`load_tokenizer`), except the
    synthetic task, which defaults to its own word tokenizer. Results are
    cached in memory by (config, tokenizer, file modification times), so
    repeated runs in one process (sweeps, tests) tokenise once.
    """
    if config.task == "image_classification":
        return _load_image_task(config)
    kind, location = _source_kind(config.source)
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


def _load_text_task(config: DataConfig, tokenizer: Tokenizer) -> TaskData:
    buckets = config.resolved_bucket_lengths()
    limits = {"train": config.max_train_rows, "eval": config.max_eval_rows, "test": config.max_test_rows}
    pad_id = _pad_id(tokenizer)
    splits: dict[str, TextExamples] = {}
    label_names: tuple[str, ...] | None = None
    for split in _SPLITS:
        table = _read_table(config, split)
        if table is None:
            continue
        rows = select_rows(table.num_rows, limits[split], config.row_selection, config.row_seed)
        texts = [table.column(column, "data.text_columns", rows) for column in config.text_columns]
        texts = [["" if text is None else str(text) for text in column] for column in texts]
        if config.task == "causal_lm":
            splits[split] = _language_model_examples(config, tokenizer, texts[0], table.where, buckets, pad_id)
            continue
        labels = table.column(config.label_column, "data.label_column", rows)
        if split == "train":  # the training split fixes the class names for the others
            label_names = table.label_names(config.label_column) or _class_names_from_strings(labels)
        label_ids = _label_ids(labels, f"{table.where} column {config.label_column!r}", label_names)
        ids, types = _encode(tokenizer, texts[0], texts[1] if len(texts) > 1 else None, config.max_length)
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
        ids, _ = _encode(tokenizer, texts, None, config.max_length)
        ids = [sequence for sequence in ids if sequence]  # an empty text has nothing to predict
        if not ids:
            raise DataError(f"{where} has no non-empty text to train a language model on")
        return TextExamples.from_sequences(ids, pad_id=pad_id, bucket_lengths=buckets)
    ids, _ = _encode(tokenizer, texts, None, None, add_special_tokens=False)
    separator = _document_separator(tokenizer)
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


# --------------------------------------------------------------------------
# Images.
# --------------------------------------------------------------------------


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def load_image_folder(
    folder: str | os.PathLike[str],
    *,
    image_size: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    class_names: Sequence[str] | None = None,
) -> tuple[ImageExamples, tuple[str, ...]]:
    """Images from ``folder/<class>/<image>``, resized to ``image_size`` square, RGB.

    Pixels are scaled to [0, 1], then normalised as ``(x - mean) / std`` per
    channel (ViT checkpoints expect 0.5/0.5). Classes are the subfolder names in
    sorted order, or ``class_names`` (pass the training split's names for the
    evaluation split so class ids agree).
    """
    from PIL import Image  # lazy: only image tasks need it

    root = pathlib.Path(folder)
    if not root.is_dir():
        raise _missing_file_error(root, "image folder")
    present = sorted((child.name for child in root.iterdir() if child.is_dir()), key=_natural_key)
    if not present:
        raise DataError(f"{root} has no class subfolders; expected {root}/<class name>/<image files>")
    names = tuple(class_names) if class_names is not None else tuple(present)
    unknown = sorted(set(present) - set(names))
    if unknown:
        raise DataError(f"{root} has class folders {unknown} that the training split lacks; classes: {list(names)}")
    mean_array = np.asarray(mean, np.float32)
    std_array = np.asarray(std, np.float32)
    if mean_array.shape not in ((1,), (3,)) or std_array.shape != mean_array.shape:
        raise DataError(f"image mean/std need 1 or 3 values each, got {list(mean)} and {list(std)}")
    images, labels = [], []
    for label, name in enumerate(names):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.iterdir(), key=lambda p: _natural_key(p.name)):
            if path.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as image:
                    resized = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
            except OSError as error:
                raise DataError(f"could not read image {path}: {error}") from None
            images.append(np.asarray(resized, np.float32) / 255.0)
            labels.append(label)
    if not images:
        raise DataError(f"{root} has no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in its class folders")
    pixels = (np.stack(images) - mean_array) / std_array
    return ImageExamples(images=pixels.astype(np.float32), labels=np.asarray(labels, np.int32)), names


def _load_image_task(config: DataConfig) -> TaskData:
    kind, _ = _source_kind(config.source)
    if kind != "local":
        raise DataError(
            f"image_classification reads a local folder (data.source), not {config.source!r}; "
            "for arrays use image_task_from_arrays"
        )
    splits: dict[str, ImageExamples] = {}
    class_names: tuple[str, ...] | None = None
    limits = {"train": config.max_train_rows, "eval": config.max_eval_rows, "test": config.max_test_rows}
    for split in _SPLITS:
        path = _local_split_path(config, split)
        if path is None:
            continue
        examples, names = load_image_folder(
            path, image_size=config.image_size, mean=config.image_mean, std=config.image_std, class_names=class_names
        )
        class_names = class_names or names
        rows = select_rows(len(examples), limits[split], config.row_selection, config.row_seed)
        if rows is not None:
            examples = ImageExamples(images=examples.images[rows], labels=examples.labels[rows])
        splits[split] = examples
    return TaskData(
        task="image_classification",
        splits=splits,
        num_labels=len(class_names or ()),
        label_names=class_names,
        config=config,
    )


def image_task_from_arrays(
    train: tuple[np.ndarray, np.ndarray],
    eval: tuple[np.ndarray, np.ndarray] | None = None,  # noqa: A002 - the split's name
    test: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    num_labels: int | None = None,
) -> TaskData:
    """An image classification task from ``(images [N, H, W, C], labels [N])`` pairs."""
    splits = {
        name: ImageExamples.from_arrays(*arrays)
        for name, arrays in (("train", train), ("eval", eval), ("test", test))
        if arrays is not None
    }
    shapes = {examples.images.shape[1:] for examples in splits.values()}
    if len(shapes) > 1:
        raise DataError(f"every split needs the same image shape, got {sorted(shapes)}")
    largest = max(int(examples.labels.max()) for examples in splits.values())
    if num_labels is not None and largest >= num_labels:
        raise DataError(f"label {largest} does not fit num_labels={num_labels}")
    return TaskData(task="image_classification", splits=splits, num_labels=num_labels or largest + 1)
