"""Batching: fixed-size batches in an order fixed by (seed, epoch), and the
position of the next batch (:class:`LoaderState`) that checkpoints save."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Protocol

import numpy as np

from peftjax.data.errors import DataError


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

    weights: np.ndarray | None  # per-example loss weights, None for all 1

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
        """The batch of these examples, filled to ``batch_size`` with weight-0 copies;
        a real row's weight is its example's (1 unless the examples carry weights)."""
        indices = np.asarray(indices, dtype=np.int64)
        real = len(indices)
        if real > self.batch_size or real == 0:
            raise DataError(f"a batch takes 1 to {self.batch_size} examples, got {real}")
        filled = np.concatenate([indices, np.full(self.batch_size - real, indices[-1])])
        batch = self.examples.collate(filled)
        weights = np.zeros(self.batch_size, np.float32)
        weights[:real] = 1.0 if self.examples.weights is None else self.examples.weights[indices]
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
