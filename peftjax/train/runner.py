"""One experiment config in, metrics, checkpoints and ``result.json`` out.

``run(config)`` is what ``peftjax train`` calls; rank search calls the same
pieces. The steps, in order: check the output folder (before anything slow),
load model and data, apply the methods, build the optimizer from labels, lay
the state out on the mesh, then train with periodic evaluation, checkpoints
and logs, and write the result last and atomically.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import pathlib
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from peftjax import data as data_lib
from peftjax.config import ExperimentConfig
from peftjax.core.adapter_io import load_adapter, save_adapter
from peftjax.core.counting import count_params, summary
from peftjax.core.inject import apply
from peftjax.core.labels import make_optimizer
from peftjax.errors import PeftError
from peftjax.methods.base import config_from_dict
from peftjax.train.checkpoint import Checkpointer
from peftjax.train.sharding import global_batch, make_mesh
from peftjax.train.state import TrainState, make_train_step

HEADS = {
    "classification": "sequence-classification",
    "causal_lm": "causal-lm",
    "image_classification": "image-classification",
}
RESULT_FILE = "result.json"


class RunError(PeftError):
    """A run that cannot start or cannot go on; the message names the fix."""


class NonFiniteLossError(RunError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------


def check_output_dir(config: ExperimentConfig, *, resume: bool) -> pathlib.Path:
    """Create and probe the output folder before any slow work."""
    out = pathlib.Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunError(f"output_dir {str(out)!r} is not writable ({err.strerror}); set output_dir=... to a writable folder") from None
    has_run = (out / "checkpoints").exists() or (out / RESULT_FILE).exists()
    if has_run and not resume:
        raise RunError(f"{out} already holds a run; pass --resume to continue it, or set output_dir=... to another folder")
    if resume and not (out / "checkpoints").exists():
        raise RunError(f"--resume: {out / 'checkpoints'} does not exist; nothing to resume")
    return out


def compute_dtype(config: ExperimentConfig):
    return jnp.bfloat16 if config.train.precision == "bf16" else jnp.float32


def build_model(config: ExperimentConfig, num_labels: int | None) -> nnx.Module:
    """The base model the config names (a checkpoint or a preset), with its head."""
    from peftjax.models import from_config, from_pretrained

    spec = config.model
    overrides = {**spec.options.to_dict(), **({"remat": True} if config.train.remat else {})}
    kwargs = dict(task=HEADS[config.data.task], num_labels=spec.num_labels or num_labels, dtype=compute_dtype(config))
    folder = spec.checkpoint_dir()
    if folder is None:
        return from_config(spec.name, seed=config.train.seed, **kwargs, **overrides)
    return from_pretrained(folder, seed=config.train.seed, config_overrides=overrides or None,
                           ignore_mismatched_sizes=True, **kwargs)


def load_task(config: ExperimentConfig) -> tuple[data_lib.TaskData, Any]:
    data_lib.check_data_files(config.data)
    kind = config.data.source.split(":", 1)[0]
    tokenizer = None
    if config.data.task != "image_classification" and kind != "synthetic":
        folder = config.model.tokenizer_dir()
        if folder is None:
            raise RunError(f"model {config.model.name!r} has no tokenizer folder; set model.tokenizer=PATH")
        tokenizer = data_lib.load_tokenizer(folder)
    return data_lib.load_data(config.data, tokenizer), tokenizer


def apply_methods(model: nnx.Module, config: ExperimentConfig) -> nnx.Module:
    for index, spec in enumerate(config.method_dicts()):
        name = spec.pop("adapter_name", "default" if index == 0 else f"adapter{index}")
        try:
            apply(model, config_from_dict(spec), adapter_name=name)
        except PeftError as err:
            raise RunError(f"methods.{index}: {err}") from None
    return model


def learning_rate_schedule(config: ExperimentConfig, total_steps: int) -> optax.Schedule:
    peak, sched = config.optim.learning_rate, config.schedule
    warmup = sched.warmup_for(total_steps)
    decay_steps = max(total_steps - warmup, 1)
    end = peak * sched.end_lr_ratio
    if sched.decay == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=sched.end_lr_ratio)
    elif sched.decay == "linear":
        decay = optax.linear_schedule(peak, end, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def build_optimizer(config: ExperimentConfig, total_steps: int) -> optax.GradientTransformation:
    o = config.optim
    lr = learning_rate_schedule(config, total_steps)
    make = {
        "adamw": lambda: optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
        "adam": lambda: optax.adam(lr, b1=o.b1, b2=o.b2, eps=o.eps),
        "sgd": lambda: optax.sgd(lr, momentum=o.momentum or None),
        "adafactor": lambda: optax.adafactor(lr),
        "lion": lambda: optax.lion(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
    }
    tx = make[o.name]()
    return optax.chain(optax.clip_by_global_norm(o.max_grad_norm), tx) if o.max_grad_norm else tx


def model_inputs(model: nnx.Module, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """The keyword arguments the model takes, from a loader batch."""
    if "pixel_values" in batch:  # loaders give NHWC images; the ViT takes NCHW as transformers does
        return {"pixel_values_bchw": jnp.transpose(batch["pixel_values"], (0, 3, 1, 2))}
    accepted = inspect.signature(type(model).__call__).parameters
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch and k in accepted}


def call_model(model: nnx.Module, batch: dict[str, jax.Array]) -> jax.Array:
    inputs = model_inputs(model, batch)
    if "pixel_values_bchw" in inputs:
        return model(inputs["pixel_values_bchw"]).logits
    return model(**inputs).logits


def loss_and_stats(task: str) -> Callable:
    """``f(model, batch) -> (mean loss, {"correct", "count", "loss_sum"})`` for the task.

    Examples carry a weight (0 for rows that only pad the last eval batch);
    sums are weighted so every example counts once.
    """

    def classification(model, batch):
        logits = call_model(model, batch).astype(jnp.float32)
        weights = batch.get("weights", jnp.ones(logits.shape[0], jnp.float32))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])
        correct = (jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32)
        total = weights.sum()
        stats = {"loss_sum": (losses * weights).sum(), "correct": (correct * weights).sum(), "count": total}
        return (losses * weights).sum() / jnp.maximum(total, 1.0), stats

    def causal_lm(model, batch):
        logits = call_model(model, batch)[:, :-1].astype(jnp.float32)
        labels = batch["labels"][:, 1:]
        weights = (labels != data_lib.IGNORE_INDEX).astype(jnp.float32)
        if "weights" in batch:
            weights = weights * batch["weights"][:, None]
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
        correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
        total = weights.sum()
        stats = {"loss_sum": (losses * weights).sum(), "correct": (correct * weights).sum(), "count": total}
        return (losses * weights).sum() / jnp.maximum(total, 1.0), stats

    return causal_lm if task == "causal_lm" else classification


def evaluate(model: nnx.Module, loader: data_lib.BatchLoader, loss_fn: Callable, mesh) -> dict[str, float]:
    """Accuracy and mean loss of ``model`` in eval mode over one pass of ``loader``
    (each example counted once)."""
    model.eval()
    graphdef, params = nnx.split(model)
    evaluate_batch = _evaluator(loss_fn)
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for batch in loader:
        stats = evaluate_batch(graphdef, params, global_batch(batch, mesh))
        for key in totals:
            totals[key] += float(stats[key])
    return {"accuracy": totals["correct"] / totals["count"], "loss": totals["loss_sum"] / totals["count"]}


_EVALUATORS: dict[Callable, Callable] = {}


def _evaluator(loss_fn: Callable) -> Callable:
    """One jitted evaluation per loss function (compiled once per model graph)."""
    if loss_fn not in _EVALUATORS:

        def evaluate_batch(graphdef, params, batch):
            return loss_fn(nnx.merge(graphdef, params), batch)[1]

        _EVALUATORS[loss_fn] = jax.jit(evaluate_batch, static_argnums=0)
    return _EVALUATORS[loss_fn]


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "device": str(jax.devices()[0].device_kind)}
    for name in ("peftjax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "datasets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def peak_memory_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _write_json_atomically(path: pathlib.Path, payload: dict) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(staging, path)


# ----------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Prepared:
    """Everything a run builds before its first step."""

    model: nnx.Module
    task: data_lib.TaskData
    train_loader: data_lib.BatchLoader
    total_steps: int
    optimizer: optax.GradientTransformation
    loss_fn: Callable


def prepare(config: ExperimentConfig) -> Prepared:
    task, tokenizer = load_task(config)
    model = build_model(config, task.num_labels)
    if tokenizer is not None and hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
        vocab = model.get_input_embeddings().num_embeddings
        data_lib.check_tokenizer_matches(tokenizer, vocab, config.model.name, task)
    elif config.data.task != "image_classification":
        data_lib.check_tokenizer_matches(data_lib.synthetic_tokenizer(), model.get_input_embeddings().num_embeddings,
                                         config.model.name, task)
    apply_methods(model, config)
    model.train()
    loop = config.train
    loader = task.train_loader(loop.batch_size * loop.grad_accum, seed=loop.seed)
    total = loop.steps if loop.steps is not None else max(1, math.ceil(loop.epochs * loader.steps_per_epoch))
    optimizer = make_optimizer(model, build_optimizer(config, total))
    return Prepared(model, task, loader, total, optimizer, loss_and_stats(config.data.task))


def run(config: ExperimentConfig, *, resume: bool = False, progress: bool = True, fsdp: int = 1) -> dict[str, Any]:
    """Train ``config`` to completion and return the result (also in result.json)."""
    from tensorboardX import SummaryWriter
    from tqdm.auto import tqdm

    out = check_output_dir(config, resume=resume)
    started = time.perf_counter()
    prep = prepare(config)
    if progress:  # the counts at start-up, as a reader checks them before trusting a run
        tqdm.write(summary(prep.model, prep.optimizer.labels))
    loop = config.train
    mesh = make_mesh(fsdp=fsdp)
    state = TrainState.create(prep.model, prep.optimizer)
    checkpointer = Checkpointer(out / "checkpoints", keep=loop.keep)
    position = data_lib.LoaderState()
    best = {"metric": None, "step": None}
    if resume:
        state, meta = checkpointer.restore(state)
        position = data_lib.LoaderState.from_dict(meta["loader"])
        best = meta["best"]
    state = state.on_mesh(mesh)
    step_fn = make_train_step(lambda m, b: prep.loss_fn(m, b), grad_accum=loop.grad_accum)
    eval_loader = prep.task.eval_loader(loop.eval_batch_size, "eval") if "eval" in prep.task.splits else None
    metric_name, higher_is_better = ("loss", False) if config.data.task == "causal_lm" else ("accuracy", True)

    (out / "config.yaml").write_text(config.to_yaml())
    log = (out / "metrics.jsonl").open("a")
    writer = SummaryWriter(str(out / "tensorboard"))
    batches = prep.train_loader.iterate(position)
    start_step = int(state.step)
    pending: list[tuple[int, jax.Array]] = []  # losses not yet checked on the host
    last_good = checkpointer.latest_step()

    def check_finite() -> None:
        if not pending:
            return
        values = np.asarray(jax.device_get([loss for _, loss in pending]))
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            step_no = pending[bad[0]][0]
            raise NonFiniteLossError(
                f"loss is {values[bad[0]]} at step {step_no}; stopped. The last good checkpoint is "
                f"{'step ' + str(last_good) if last_good is not None else 'none'} in {out / 'checkpoints'}. "
                "Lower optim.learning_rate, enable optim.max_grad_norm, or use precision=fp32."
            )
        pending.clear()

    def log_line(record: dict) -> None:
        log.write(json.dumps(record) + "\n")
        log.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                writer.add_scalar(key, value, record["step"])

    bar = tqdm(total=prep.total_steps, initial=start_step, disable=not progress, dynamic_ncols=True, unit="step")
    tokens_since, clock = 0, time.perf_counter()
    try:
        for step in range(start_step + 1, prep.total_steps + 1):
            batch = next(batches)
            tokens_since += int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(batch["labels"])
            state, metrics = step_fn(state, global_batch(batch, mesh))
            pending.append((step, metrics["loss"]))
            bar.update(1)
            if (loop.log_every and step % loop.log_every == 0) or step == prep.total_steps:
                check_finite()
                now = time.perf_counter()
                speed = tokens_since / max(now - clock, 1e-9)
                tokens_since, clock = 0, now
                record = {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                          "tokens_per_s": speed, "epoch": batches.state.epoch}
                log_line(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{speed:,.0f}")
            evaluate_now = eval_loader is not None and (
                (loop.eval_every and step % loop.eval_every == 0) or step == prep.total_steps
            )
            if evaluate_now:
                check_finite()
                scores = evaluate(state.model(), eval_loader, prep.loss_fn, mesh)
                log_line({"step": step, **{f"eval_{k}": v for k, v in scores.items()}})
                value = scores[metric_name]
                if best["metric"] is None or (value > best["metric"] if higher_is_better else value < best["metric"]):
                    best = {"metric": value, "step": step}
                    save_adapter(state.model(), out / "best")
            if (loop.checkpoint_every and step % loop.checkpoint_every == 0) or step == prep.total_steps:
                check_finite()
                checkpointer.save(state, batches.state.to_dict(), {"best": best})
                last_good = step
    finally:
        bar.close()
        log.close()
        writer.close()
        checkpointer.close()

    model = state.model()
    save_adapter(model, out / "adapter")
    final = {}
    for split in ("eval", "test"):
        if split in prep.task.splits:
            scores = evaluate(model, prep.task.eval_loader(loop.eval_batch_size, split), prep.loss_fn, mesh)
            final.update({f"{split}_{k}": v for k, v in scores.items()})
    if best["step"] is not None and best["step"] != int(state.step) and "test" in prep.task.splits:
        best_model = load_adapter(build_model(config, prep.task.num_labels), out / "best")
        scores = evaluate(best_model, prep.task.eval_loader(loop.eval_batch_size, "test"), prep.loss_fn, mesh)
        final.update({f"best_test_{k}": v for k, v in scores.items()})
    if best["metric"] is not None:
        final[f"best_eval_{metric_name}"] = best["metric"]
    counts = count_params(model, prep.optimizer.labels)
    result = {
        "config": config.to_dict(),
        "params": {"trainable": counts.trainable, "total": counts.total},
        "metrics": final,
        "best_step": best["step"],
        "steps": int(state.step),
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_bytes": peak_memory_bytes(),
        "versions": versions(),
    }
    _write_json_atomically(out / RESULT_FILE, result)
    return result

