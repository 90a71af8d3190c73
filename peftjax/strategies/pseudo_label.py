"""Pseudo-labelling (self-training; Lee 2013, and the class-balanced selection of
Zou et al. 2018): the model labels the unlabelled target stream with its own
confident predictions and trains on them beside the source.

Rounds start after ``start`` of the run and are spread evenly over the rest.
At each round the current model predicts every target example; those whose
top class has probability at least ``threshold`` are candidates, and the same
number of each class is kept, the most confident first (at most
``max_per_class``), so that a class the model favours does not crowd out the
others. Until the next round the target stream's batches carry these labels
with weight 1 and every other example with weight 0, and the term is
``weight * L_task(target)``. Before the first round nothing is labelled and
the term is 0. Each round's selection is in the run's memory, so a resumed
run trains on the same labels.

Each round logs the count per class, and, against the target file's own
labels (never used in training), the accuracy of the selected labels and of
the model on the whole target stream.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from peftjax.schema import require
from peftjax.strategies.base import StepContext, register_strategy
from peftjax.strategies.target_domain import TARGET, TargetDomainStrategy
from peftjax.train.session import Run
from peftjax.train.tasks import features_and_logits


def balanced_selection(probabilities: np.ndarray, threshold: float, max_per_class: int | None = None) -> np.ndarray:
    """Rows to pseudo-label: for every class the same number of rows predicted
    as that class with probability >= ``threshold``, the most confident first;
    that number is the smallest class's count of such rows (capped at
    ``max_per_class``). Rows in increasing order; empty when a class has none."""
    predicted = probabilities.argmax(1)
    confidence = probabilities.max(1)
    per_class = []
    for label in range(probabilities.shape[1]):
        rows = np.flatnonzero((predicted == label) & (confidence >= threshold))
        per_class.append(rows[np.argsort(-confidence[rows], kind="stable")])
    keep = min(len(rows) for rows in per_class)
    if max_per_class is not None:
        keep = min(keep, max_per_class)
    return np.sort(np.concatenate([rows[:keep] for rows in per_class])).astype(np.int64)


@register_strategy("pseudo_label")
@dataclasses.dataclass(frozen=True, kw_only=True)
class PseudoLabelConfig(TargetDomainStrategy):
    """Class-balanced pseudo-labels on ``target`` above a confidence threshold, in rounds.

    Attributes:
      target: the target domain's data (a data section; its labels are only reported).
      threshold: the least top-class probability a pseudo-label needs.
      rounds: how many times the target is labelled again.
      start: the share of the run trained on the source alone before the first round.
      weight: the target term's factor.
      max_per_class: at most this many pseudo-labels per class and round (null: no cap).
    """

    threshold: float = 0.9
    rounds: int = 3
    start: float = 0.5
    weight: float = 1.0
    max_per_class: int | None = None

    def _validate(self) -> None:
        super()._validate()
        require(0 < self.threshold <= 1, "threshold", f"must be in (0, 1], got {self.threshold}")
        require(self.rounds >= 1, "rounds", f"must be at least 1, got {self.rounds}")
        require(0 <= self.start < 1, "start", f"must be in [0, 1), got {self.start}")
        require(self.weight > 0, "weight", f"must be positive, got {self.weight}")
        require(self.max_per_class is None or self.max_per_class >= 1, "max_per_class", "must be at least 1 or null")

    def round_steps(self, total_steps: int) -> list[int]:
        """The steps after which a round labels the target, increasing and inside the run."""
        first = self.start * total_steps
        spacing = (total_steps - first) / self.rounds
        steps = sorted({max(1, int(round(first + r * spacing))) for r in range(self.rounds)})
        return [step for step in steps if step < total_steps]

    def loss(self, ctx: StepContext) -> tuple[jax.Array, dict[str, jax.Array]]:
        value, stats = ctx.task_loss(TARGET)
        return self.weight * value, {"labelled": stats["count"]}

    def on_start(self, run: Run) -> None:
        super().on_start(run)
        memory = run.memory[self.strategy]
        self._relabel(run, np.asarray(memory.get("rows", []), np.int64), np.asarray(memory.get("labels", []), np.int32))

    def on_step(self, run: Run, metrics) -> None:
        if run.step not in self.round_steps(run.info.total_steps):
            return
        stream = run.streams[TARGET]
        _, logits = features_and_logits(run.model(), stream.loaded, run.info.config.train.eval_batch_size)
        probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
        rows = balanced_selection(probabilities, self.threshold, self.max_per_class)
        labels = probabilities[rows].argmax(1).astype(np.int32)
        memory = run.memory[self.strategy]
        memory.update(round=memory.get("round", 0) + 1, rows=rows.tolist(), labels=labels.tolist())
        self._relabel(run, rows, labels)
        truth = stream.loaded.labels
        record = {f"{self.strategy}_round": memory["round"], f"{self.strategy}_selected": len(rows),
                  f"{self.strategy}_target_accuracy": float((probabilities.argmax(1) == truth).mean())}
        record.update({f"{self.strategy}_class_{c}": int((labels == c).sum()) for c in range(logits.shape[1])})
        if len(rows):
            record[f"{self.strategy}_label_accuracy"] = float((labels == truth[rows]).mean())
        memory.setdefault("log", []).append({"step": run.step, **record})
        run.log(record)

    def _relabel(self, run: Run, rows: np.ndarray, labels: np.ndarray) -> None:
        """The target stream with ``labels`` at ``rows`` (weight 1) and label 0 with weight 0 elsewhere."""
        stream = run.streams[TARGET]
        count = len(stream.loaded)
        all_labels = np.zeros(count, np.int32)
        all_labels[rows] = labels
        weights = np.zeros(count, np.float32)
        weights[rows] = 1.0
        stream.replace_examples(dataclasses.replace(stream.loaded, labels=all_labels, weights=weights))
