"""Examples held in memory: tokenised text and images of one split, and a task's splits."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from peftjax.config import DataConfig
from peftjax.data.errors import DataError
from peftjax.data.loader import BatchLoader

# Label value that losses skip (the convention of Hugging Face and optax users).
IGNORE_INDEX = -100


def _bucket_index(lengths: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    return np.searchsorted(np.asarray(buckets), lengths, side="left")


def _checked_weights(examples: TextExamples | ImageExamples, count: int) -> None:
    """Stores ``examples.weights`` as float32 after checking it: one finite, non-negative weight per example."""
    if examples.weights is None:
        return
    weights = np.asarray(examples.weights, np.float32)
    if weights.shape != (count,):
        raise DataError(f"weights must be one per example, [{count}], got shape {weights.shape}")
    if not np.all(np.isfinite(weights)) or (weights < 0).any():
        raise DataError("example weights must be finite and not negative")
    object.__setattr__(examples, "weights", weights)


@dataclasses.dataclass(frozen=True, eq=False)
class TextExamples:
    """Tokenised sequences of one split, stored back to back in flat arrays.

    Sequence ``i`` is ``token_ids[offsets[i]:offsets[i + 1]]``. Flat storage
    keeps 60k sentences in two small arrays instead of 60k Python lists.
    ``labels`` is int32 [N] for classification and None for causal LM (whose
    labels are the tokens themselves). ``weights`` (float32 [N], None for all
    1) weight each example's loss in training batches: a strategy that
    reweights or pseudo-labels a stream replaces them (``dataclasses.replace``).
    """

    token_ids: np.ndarray
    offsets: np.ndarray
    token_type_ids: np.ndarray | None
    labels: np.ndarray | None
    pad_id: int
    bucket_lengths: tuple[int, ...]
    weights: np.ndarray | None = None
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
        _checked_weights(self, len(lengths))

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
    """Images of one split: float32 [N, H, W, C] (already resized and normalised), labels
    and, optionally, per-example loss weights (as ``TextExamples.weights``)."""

    images: np.ndarray
    labels: np.ndarray
    weights: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise DataError(f"images must be [N, H, W, C], got shape {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels must be [N] = [{self.images.shape[0]}], got shape {self.labels.shape}")
        _checked_weights(self, len(self.labels))

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
