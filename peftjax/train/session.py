"""A run in progress, as training strategies see it between steps (host side).

``RunInfo`` is what is fixed when a run starts (length, epoch size, config).
A ``Stream`` is one named training data stream: the ``train`` split of the
task (``MAIN``) or one a strategy asks for (``Strategy.streams``), batched in
an order fixed by (seed, epoch) and at a position that checkpoints save. A
``Run`` is what the boundary hooks receive: the train state, the streams, a
memory per strategy that checkpoints keep, and the means to evaluate, log
and stop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from peftjax.config import ExperimentConfig
from peftjax.data import BatchLoader, ImageExamples, LoaderState, TextExamples
from peftjax.train.state import TrainState

# The name of the task's own training stream.
MAIN = "train"


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What is fixed when a run starts.

    ``total_steps`` and ``steps_per_epoch`` count optimizer updates (after
    gradient accumulation) of the main stream; ``batch_size`` is the number of
    examples one update sees from each stream. ``model`` is the model as the
    run builds it, before its first step (methods applied, strategies'
    modules attached): its structure, e.g. its layer groups.
    """

    config: ExperimentConfig
    total_steps: int
    steps_per_epoch: int
    batch_size: int
    model: nnx.Module | None = dataclasses.field(default=None, repr=False, compare=False)


class Stream:
    """One named stream of training batches: shuffled by (seed, epoch), the last
    partial batch of an epoch dropped, at a position checkpoints save.
    ``examples`` are what it batches now; ``loaded`` the examples as the data
    section gave them, whatever ``replace_examples`` did since."""

    def __init__(
        self,
        name: str,
        examples: TextExamples | ImageExamples,
        *,
        batch_size: int,
        seed: int,
        group_by_length: bool = False,
        position: LoaderState | None = None,
    ) -> None:
        self.name = name
        self._batching = dict(batch_size=batch_size, seed=seed, group_by_length=group_by_length)
        self.examples = self.loaded = examples
        self.loader = BatchLoader.for_training(examples, **self._batching)
        self._batches = self.loader.iterate(position)

    @property
    def position(self) -> LoaderState:
        """Where the next batch comes from (epoch, batch within the epoch)."""
        return self._batches.state

    def next_batch(self) -> dict[str, np.ndarray]:
        return next(self._batches)

    def replace_examples(self, examples: TextExamples | ImageExamples) -> None:
        """Go on from the same position over other examples (relabelled,
        reweighted), batched as before."""
        position = self.position
        self.examples = examples
        self.loader = BatchLoader.for_training(examples, **self._batching)
        self._batches = self.loader.iterate(position)


@dataclasses.dataclass(eq=False)
class Run:
    """A run between two steps, as the strategies' boundary hooks see it.

    A hook may replace ``state`` with another ``TrainState`` of the same
    structure (new optimizer hyper-parameters, say), replace a stream's
    examples (``streams[name].replace_examples``), keep JSON values in
    ``memory[strategy name]`` (saved in every checkpoint and back after
    ``--resume``), ``log`` scalars at the current step, ``evaluate`` the model
    and ``stop`` the run after this step.
    """

    state: TrainState
    info: RunInfo
    streams: dict[str, Stream]
    memory: dict[str, dict[str, Any]]
    step: int
    _evaluate: Callable[[nnx.Module, str], dict[str, float]] = dataclasses.field(repr=False)
    _log: Callable[[dict[str, Any]], None] = dataclasses.field(repr=False)
    stop_reason: str | None = None

    @property
    def epoch(self) -> int:
        """The main stream's epoch (0-based) that the next step reads from."""
        return self.streams[MAIN].position.epoch

    def model(self) -> nnx.Module:
        """The model with the current parameters (a fresh module each call)."""
        return self.state.model()

    def evaluate(self, split: str = "eval") -> dict[str, float]:
        """Accuracy and loss of the current model on a split of the task (``eval`` or ``test``)."""
        return self._evaluate(self.model(), split)

    def log(self, values: Mapping[str, float]) -> None:
        """Writes ``values`` at the current step to metrics.jsonl and TensorBoard."""
        self._log({"step": self.step, **values})

    def stop(self, reason: str) -> None:
        """Ends the run after this step: it is checkpointed, evaluated and reported
        as a finished one, with ``stopped`` = ``reason`` in result.json."""
        self.stop_reason = reason
