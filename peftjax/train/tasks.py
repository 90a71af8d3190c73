"""What a task computes from a model and a loader batch: inputs, losses, evaluation.

The runner, rank search, the benchmarks and the training strategies' loss
terms share these, so the loss a run trains on is the loss it is evaluated
and benchmarked with. Losses are weighted means: every batch row carries a
weight (0 for rows that only fill the last evaluation batch), and the sums
are weighted so each example counts once.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from peftjax.data import IGNORE_INDEX, BatchLoader, ImageExamples, TextExamples
from peftjax.errors import PeftError
from peftjax.models.common import ModelOutput
from peftjax.train.sharding import global_batch

Batch = dict[str, jax.Array]
# (logits, batch) -> (mean loss, {"loss_sum", "correct", "count"})
LogitsLoss = Callable[[jax.Array, Batch], tuple[jax.Array, dict[str, jax.Array]]]


def model_inputs(model: nnx.Module, batch: Batch) -> dict[str, jax.Array]:
    """The keyword arguments the model takes, from a loader batch."""
    if "pixel_values" in batch:  # loaders give NHWC images; the ViT takes NCHW as transformers does
        return {"pixel_values_bchw": jnp.transpose(batch["pixel_values"], (0, 3, 1, 2))}
    accepted = inspect.signature(type(model).__call__).parameters
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch and k in accepted}


def model_output(model: nnx.Module, batch: Batch) -> ModelOutput:
    """The model's whole output (hidden states, logits, pooled output) for a loader batch."""
    inputs = model_inputs(model, batch)
    if "pixel_values_bchw" in inputs:
        return model(inputs["pixel_values_bchw"])
    return model(**inputs)


def call_model(model: nnx.Module, batch: Batch) -> jax.Array:
    return model_output(model, batch).logits


def pooled_features(output: ModelOutput, batch: Batch) -> jax.Array:
    """One vector per example, (batch, hidden): the pooler's output where the model
    has a pooler, else the mean of the last hidden states over real tokens."""
    if output.pooler_output is not None:
        return output.pooler_output
    hidden_btd = output.last_hidden_state.astype(jnp.float32)
    if "attention_mask" not in batch:
        return hidden_btd.mean(axis=1)
    mask_bt1 = batch["attention_mask"].astype(jnp.float32)[..., None]
    return (hidden_btd * mask_bt1).sum(axis=1) / jnp.maximum(mask_bt1.sum(axis=1), 1.0)


def pooled_width(model: nnx.Module) -> int:
    """The width of ``pooled_features``: ``config.hidden_size`` (transformers), or
    the last stage's channels for a model that lists its stages' widths (ResNet's
    ``hidden_sizes``)."""
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None) or (getattr(config, "hidden_sizes", None) or (None,))[-1]
    if width is None:
        raise PeftError(f"{type(model).__name__} has neither config.hidden_size nor config.hidden_sizes, "
                        "so the width of its pooled features is unknown; give its config one of them")
    return int(width)


def _weighted(losses: jax.Array, correct: jax.Array, weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    total = weights.sum()
    stats = {"loss_sum": (losses * weights).sum(), "correct": (correct * weights).sum(), "count": total}
    return (losses * weights).sum() / jnp.maximum(total, 1.0), stats


def logits_loss(task: str) -> LogitsLoss:
    """``f(logits, batch) -> (mean loss, {"loss_sum", "correct", "count"})`` for the task:
    cross-entropy on the labels (next-token labels for ``causal_lm``)."""

    def classification(logits, batch):
        logits = logits.astype(jnp.float32)
        weights = batch.get("weights", jnp.ones(logits.shape[0], jnp.float32))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        return _weighted(losses, correct, weights)

    def causal_lm(logits, batch):
        logits = logits[:, :-1].astype(jnp.float32)
        labels = batch["labels"][:, 1:]
        weights = (labels != IGNORE_INDEX).astype(jnp.float32)
        if "weights" in batch:
            weights = weights * batch["weights"][:, None]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        return _weighted(losses, correct, weights)

    return causal_lm if task == "causal_lm" else classification


def loss_and_stats(task: str) -> Callable:
    """``f(model, batch) -> (mean loss, {"correct", "count", "loss_sum"})`` for the task."""
    from_logits = logits_loss(task)

    def loss(model, batch):
        return from_logits(call_model(model, batch), batch)

    return loss


def evaluate(model: nnx.Module, loader: BatchLoader, loss_fn: Callable, mesh) -> dict[str, float]:
    """Accuracy and mean loss of ``model`` in eval mode over one pass of ``loader``
    (each example counted once). For a language model the accuracy is next-token
    accuracy, the loss the mean over predicted tokens, and ``perplexity`` is
    ``exp(loss)``."""
    model.eval()
    graphdef, params = nnx.split(model)
    evaluate_batch = _evaluator(loss_fn)
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for batch in loader:
        stats = evaluate_batch(graphdef, params, global_batch(batch, mesh))
        for key in totals:
            totals[key] += float(stats[key])
    scores = {"accuracy": totals["correct"] / totals["count"], "loss": totals["loss_sum"] / totals["count"]}
    if getattr(loader.examples, "is_causal_lm", False):
        scores["perplexity"] = math.exp(scores["loss"]) if scores["loss"] < 700 else math.inf  # exp overflows past ~709
    return scores


_EVALUATORS: dict[Callable, Callable] = {}


def _evaluator(loss_fn: Callable) -> Callable:
    """One jitted evaluation per loss function (compiled once per model graph)."""
    if loss_fn not in _EVALUATORS:

        def evaluate_batch(graphdef, params, batch):
            return loss_fn(nnx.merge(graphdef, params), batch)[1]

        _EVALUATORS[loss_fn] = jax.jit(evaluate_batch, static_argnums=0)
    return _EVALUATORS[loss_fn]


@jax.jit(static_argnums=0)
def _features_and_logits(graphdef: nnx.GraphDef, state: nnx.State, batch: Batch) -> tuple[jax.Array, jax.Array]:
    output = model_output(nnx.merge(graphdef, state), batch)
    return pooled_features(output, batch), output.logits


def features_and_logits(
    model: nnx.Module, examples: TextExamples | ImageExamples, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Pooled features (N, hidden) and logits (N, ...) of every example, in order,
    with ``model`` in eval mode (logits None for a model without a head); one
    program per batch shape."""
    model.eval()
    graphdef, state = nnx.split(model)
    loader = BatchLoader.for_evaluation(examples, batch_size)
    features, logits = [], []
    for indices in loader.epoch_plan(0):
        batch_features, batch_logits = _features_and_logits(graphdef, state, loader.batch(indices))
        features.append(np.asarray(batch_features[: len(indices)], np.float32))
        if batch_logits is not None:
            logits.append(np.asarray(batch_logits[: len(indices)], np.float32))
    return np.concatenate(features), np.concatenate(logits) if logits else None
