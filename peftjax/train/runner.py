"""One experiment config in, metrics, checkpoints and ``result.json`` out.

``run(config)`` is what ``peftjax train`` calls; rank search calls the same
pieces. The steps, in order: check the output folder (before anything slow),
load model and data, apply the methods and attach the training strategies,
build the optimizer from labels, lay the state out on the mesh, then train
with periodic evaluation, checkpoints and logs, and write the result last and
atomically. Strategies (``peftjax.strategies``) come in through their hooks
at fixed points of the loop; the loop knows none of them by name.
"""

from __future__ import annotations

import dataclasses
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
from peftjax.config import ExperimentConfig, load_config
from peftjax.core.adapter_io import load_adapter, save_adapter
from peftjax.core.counting import count_params, summary
from peftjax.core.inject import apply
from peftjax.core.labels import PeftOptimizer, ScheduledTransformation, scheduled
from peftjax.errors import ModelLoadError, NonFiniteLossError, PeftError, Preempted, RunError
from peftjax.methods.base import config_from_dict
from peftjax.strategies.base import (
    Strategy,
    attach_modules,
    build_strategies,
    stage_optimizer,
    stage_starts,
    stages_at,
    step_loss,
    strategy_from_dict,
)
from peftjax.train.checkpoint import Checkpointer
from peftjax.train.output import CHECKPOINTS, RESULT_FILE, OutputLock, RunLog, start_point, writable_output_dir
from peftjax.train.preemption import StopSignals
from peftjax.train.session import MAIN, Run, RunInfo, Stream
from peftjax.train.schedules import slanted_triangular
from peftjax.train.sharding import global_batch, make_mesh
from peftjax.train.state import TrainState, make_train_step
from peftjax.train.tasks import evaluate, loss_and_stats

# ----------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------


def finished_result(config: ExperimentConfig) -> dict[str, Any] | None:
    """The result of a finished run of this very config in its output folder, else None
    (an experiment driver started again reuses it; a run of an edited config is not it)."""
    path = pathlib.Path(config.output_dir) / RESULT_FILE
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    wanted = json.loads(json.dumps(config.to_dict()))
    same = {**result["config"], "output_dir": None} == {**wanted, "output_dir": None}  # found in it, by any spelling
    return result if same else None


def compute_dtype(config: ExperimentConfig):
    return jnp.bfloat16 if config.train.precision == "bf16" else jnp.float32


def build_model(
    config: ExperimentConfig, num_labels: int | None, adapter: str | os.PathLike | None = None
) -> nnx.Module:
    """The base model the config names (a checkpoint or a preset), with its head, and
    ``adapter`` (a saved adapter folder) loaded onto it when given."""
    from peftjax.models import checkpoint_architecture, from_config, from_pretrained

    spec = config.model
    overrides = {**spec.options.to_dict(), **({"remat": True} if config.train.remat else {})}
    kwargs = dict(task=config.data.task, num_labels=spec.num_labels or num_labels, dtype=compute_dtype(config))
    folder = spec.checkpoint_dir()
    try:
        if folder is None:
            model = from_config(spec.name, seed=config.train.seed, **kwargs, **overrides)
            return model if adapter is None else load_adapter(model, adapter)
        if spec.init == "random":  # the checkpoint's architecture, its weights left unread
            model = from_config(checkpoint_architecture(folder), seed=config.train.seed, **kwargs, **overrides)
            return model if adapter is None else load_adapter(model, adapter)
        return from_pretrained(folder, seed=config.train.seed, config_overrides=overrides or None,
                               ignore_mismatched_sizes=True, freeze_new_head=spec.freeze_new_head, adapter=adapter,
                               **kwargs)
    except ModelLoadError as err:
        raise type(err)(f"{_model_key(config)}: {err}") from None


def _model_key(config: ExperimentConfig) -> str:
    """The config key that chose the model, for messages."""
    return f"model.path={config.model.path!r}" if config.model.path else f"model.name={config.model.name!r}"


def with_model_defaults(config: ExperimentConfig) -> ExperimentConfig:
    """``config`` with the data fields left null to follow the model filled in: an image
    model's size and normalisation (``peftjax.models.names.image_defaults``)."""
    data = config.data
    unset = [key for key in ("image_size", "image_mean", "image_std") if getattr(data, key) is None]
    if data.task != "image_classification" or not unset:
        return config
    from peftjax.models import registry
    from peftjax.models.factory import preset_config
    from peftjax.models.loading import read_config
    from peftjax.models.names import image_defaults

    folder = config.model.checkpoint_dir()
    if folder is None:
        model_config = preset_config(config.model.name)
    else:
        model_config = registry.config_from_hf_dict(read_config(folder))
    defaults = image_defaults(model_config, folder)
    return dataclasses.replace(config, data=dataclasses.replace(data, **{key: defaults[key] for key in unset}))


def load_task(config: ExperimentConfig) -> tuple[data_lib.TaskData, Any]:
    config = with_model_defaults(config)
    data_lib.check_data_files(config.data)
    kind = config.data.source.split(":", 1)[0]
    tokenizer = None
    if config.data.task != "image_classification" and kind != "synthetic":
        folder = config.model.tokenizer_dir()
        if folder is None:
            raise RunError(f"model {config.model.name!r} is a preset without a packaged tokenizer; set model.tokenizer "
                           "to the folder of the tokenizer its vocabulary belongs to")
        try:
            tokenizer = data_lib.load_tokenizer(folder)
        except PeftError as err:
            key = f"model.tokenizer={config.model.tokenizer!r}" if config.model.tokenizer else _model_key(config)
            raise type(err)(f"{key}: {err}") from None
    return data_lib.load_data(config.data, tokenizer), tokenizer


def check_image_shape(config: ExperimentConfig, model: nnx.Module, task: data_lib.TaskData) -> None:
    """Raises before compiling when the images cannot go into a fixed-size model (ViT)."""
    size, channels = getattr(model.config, "image_size", None), getattr(model.config, "num_channels", 3)
    if task.task != "image_classification" or size is None:
        return
    height, width, got = task["train"].images.shape[1:]
    if (height, width, got) != (size, size, channels):
        raise RunError(
            f"data gives {height}x{width} images with {got} channels, but model {config.model.name!r} takes "
            f"{size}x{size} with {channels} (its config's image_size, num_channels); leave data.image_size "
            f"null to follow the model, or set it to {size}"
        )


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
    if sched.decay == "slanted_triangular":
        return slanted_triangular(peak, total_steps, cut_frac=sched.cut_frac, ratio=sched.ratio)
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


def build_optimizer(
    config: ExperimentConfig, total_steps: int, *, adafactor: Callable = optax.adafactor
) -> ScheduledTransformation:
    """The config's optimizer: the rule at rate 1 per label, the clipping and the
    schedule once for the whole model (``peftjax.core.labels.scheduled``).
    ``adafactor(1.0)`` builds Adafactor (the rank search's batched mode passes one
    that counts each member's own entries)."""
    o = config.optim
    make = {
        "adamw": lambda: optax.adamw(1.0, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay),
        "adam": lambda: optax.adam(1.0, b1=o.b1, b2=o.b2, eps=o.eps),
        "sgd": lambda: optax.sgd(1.0, momentum=o.momentum or None),
        "adafactor": lambda: adafactor(1.0),
        "lion": lambda: optax.lion(1.0, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
    }
    return scheduled(make[o.name](), learning_rate_schedule(config, total_steps), max_grad_norm=o.max_grad_norm)


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
    stats = jax.local_devices()[0].memory_stats()
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
    optimizer: PeftOptimizer  # the first stage's
    loss_fn: Callable  # the task's loss on one batch: evaluation, rank search
    info: RunInfo
    tx: optax.GradientTransformation  # before labels: every stage's optimizer partitions it
    strategies: tuple[Strategy, ...]
    stage_starts: tuple[tuple[int, ...], ...]
    streams: dict[str, data_lib.TaskData]  # the strategies' extra streams

    def stages(self, step: int) -> tuple[int, ...]:
        """Each strategy's stage during optimizer step ``step`` (counted from 1): a state
        saved after ``step`` steps holds this stage's labels; ``stages(0)`` is the first."""
        return stages_at(self.stage_starts, max(step - 1, 0))

    def optimizer_at(self, step: int) -> PeftOptimizer:
        """The optimizer of the stage that optimizer step ``step`` trains in."""
        return stage_optimizer(self.model, self.tx, self.strategies, self.stages(step), self.info)


def _check_token_ids(config: ExperimentConfig, model: nnx.Module, tokenizer, task: data_lib.TaskData) -> None:
    if tokenizer is not None and hasattr(model, "get_input_embeddings") and model.get_input_embeddings() is not None:
        vocab = model.get_input_embeddings().num_embeddings
        data_lib.check_tokenizer_matches(tokenizer, vocab, config.model.name, task)
    elif task.task != "image_classification":
        data_lib.check_tokenizer_matches(data_lib.synthetic_tokenizer(), model.get_input_embeddings().num_embeddings,
                                         config.model.name, task)


def load_streams(
    config: ExperimentConfig, strategies: tuple[Strategy, ...], tokenizer, model: nnx.Module
) -> dict[str, data_lib.TaskData]:
    """The strategies' extra streams, each read and tokenised like the main data;
    two strategies may share a stream by giving the same name and data."""
    wanted: dict[str, Any] = {}
    for index, strategy in enumerate(strategies):
        for name, data in strategy.streams().items():
            if name == MAIN or wanted.get(name, data) != data:
                raise RunError(f"strategies.{index} ({strategy.strategy}): stream name {name!r} is taken by "
                               f"{'the task' if name == MAIN else 'another strategy with other data'}; rename it")
            wanted[name] = data
    streams = {}
    for name, data in sorted(wanted.items()):
        try:
            data_lib.check_data_files(data)
            streams[name] = data_lib.load_data(data, tokenizer)
        except PeftError as err:
            raise RunError(f"stream {name!r}: {err}") from None
        _check_token_ids(config, model, tokenizer, streams[name])
    return streams


def prepare(config: ExperimentConfig) -> Prepared:
    task, tokenizer = load_task(config)
    model = build_model(config, task.num_labels)
    check_image_shape(config, model, task)
    _check_token_ids(config, model, tokenizer, task)
    apply_methods(model, config)
    strategies = build_strategies(config.strategy_dicts())
    attach_modules(model, strategies, seed=config.train.seed)
    model.train()
    loop = config.train
    batch_size = loop.batch_size * loop.grad_accum
    loader = task.train_loader(batch_size, seed=loop.seed)
    total = loop.steps if loop.steps is not None else max(1, math.ceil(loop.epochs * loader.steps_per_epoch))
    info = RunInfo(config=config, total_steps=total, steps_per_epoch=loader.steps_per_epoch, batch_size=batch_size,
                   model=model)
    tx = build_optimizer(config, total)
    starts = stage_starts(strategies, info)
    streams = load_streams(config, strategies, tokenizer, model)
    optimizer = stage_optimizer(model, tx, strategies, stages_at(starts, 0), info)  # step 1's
    return Prepared(model, task, loader, total, optimizer, loss_and_stats(config.data.task), info, tx, strategies,
                    starts, streams)


def _streams(prep: Prepared, positions: dict[str, dict]) -> dict[str, Stream]:
    """The main stream (shuffled with ``train.seed``, as ``task.train_loader``) and the
    strategies' (the i-th by name with ``train.seed + i``), from ``positions`` when saved."""
    seed = prep.info.config.train.seed
    tasks = {MAIN: prep.task, **prep.streams}
    return {
        name: Stream(name, task["train"], batch_size=prep.info.batch_size, seed=seed + index,
                     group_by_length=task.group_by_length,
                     position=data_lib.LoaderState.from_dict(positions[name]) if name in positions else None)
        for index, (name, task) in enumerate(tasks.items())
    }


def load_experiment(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """An experiment YAML with ``key.sub=value`` overrides: methods and strategies
    validated, data files checked, before anything trains."""
    config = load_config(path, overrides, method_validator=config_from_dict, strategy_validator=strategy_from_dict)
    data_lib.check_data_files(config.data)
    return config


def run(config: ExperimentConfig, *, resume: bool = False, progress: bool = True, fsdp: int = 1) -> dict[str, Any]:
    """Train ``config`` to completion and return the result (also in result.json).

    With ``resume``, go on from the newest readable checkpoint in the output
    folder, or start from scratch when it has none yet. The folder is locked
    for the run. A SIGTERM or SIGINT stops the run after the current step with
    a checkpoint, raising ``Preempted`` (see ``peftjax.train.preemption``).
    """
    config = with_model_defaults(config)  # the values used are the values recorded
    out = writable_output_dir(config)
    with OutputLock(out), StopSignals() as stop:
        return _run(config, out, resume=start_point(out, config, resume=resume), progress=progress, fsdp=fsdp,
                    stop=stop)


def _run(config: ExperimentConfig, out: pathlib.Path, *, resume: bool, progress: bool, fsdp: int,
         stop: StopSignals) -> dict[str, Any]:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    prep = prepare(config)
    loop = config.train
    mesh = make_mesh(fsdp=fsdp)
    checkpointer = Checkpointer(out / CHECKPOINTS, keep=loop.keep)
    meta: dict[str, Any] = {}
    if resume:  # the saved state has the labels of the stage its last step trained in
        state, meta = checkpointer.restore(lambda step: TrainState.create(prep.model, prep.optimizer_at(step)))
    else:
        state = TrainState.create(prep.model, prep.optimizer)
    if progress:  # the counts at start-up, as a reader checks them before trusting a run
        tqdm.write(summary(prep.model, state.tx.labels))
    best = meta.get("best", {"metric": None, "step": None})
    positions = {**meta.get("streams", {}), **({MAIN: meta["loader"]} if "loader" in meta else {})}
    step_fn = make_train_step(step_loss(config.data.task, prep.strategies, prep.info), grad_accum=loop.grad_accum)
    eval_loader = prep.task.eval_loader(loop.eval_batch_size, "eval") if "eval" in prep.task.splits else None
    metric_name, higher_is_better = ("loss", False) if config.data.task == "causal_lm" else ("accuracy", True)

    log = RunLog(out, config, int(state.step))
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

    log_line = log.write

    def evaluate_split(model: nnx.Module, split: str) -> dict[str, float]:
        return evaluate(model, prep.task.eval_loader(loop.eval_batch_size, split), prep.loss_fn, mesh)

    session = Run(state=state.on_mesh(mesh), info=prep.info, streams=_streams(prep, positions),
                  memory={s.strategy: {} for s in prep.strategies} | meta.get("strategies", {}),
                  step=int(state.step), _evaluate=evaluate_split, _log=log_line)
    start_step = session.step
    stages = prep.stages(start_step)
    for strategy in prep.strategies:
        strategy.on_start(session)
    bar = tqdm(total=prep.total_steps, initial=start_step, disable=not progress, dynamic_ncols=True, unit="step")
    tokens_since, clock = 0, time.perf_counter()
    try:
        for step in range(start_step + 1, prep.total_steps + 1):
            if prep.stages(step) != stages:  # a new label set: the step compiles once for it, now
                stages = prep.stages(step)
                session.state = session.state.relabel(prep.optimizer_at(step))
            epoch = session.epoch
            batches = {name: stream.next_batch() for name, stream in session.streams.items()}
            batch = batches[MAIN]
            tokens_since += int(batch["attention_mask"].sum()) if "attention_mask" in batch else len(batch["labels"])
            placed = {name: global_batch(b, mesh) for name, b in batches.items()}
            session.state, metrics = step_fn(session.state, placed)
            session.step = step
            pending.append((step, metrics["loss"]))
            bar.update(1)
            for strategy in prep.strategies:
                strategy.on_step(session, metrics)
            if session.epoch != epoch:
                for strategy in prep.strategies:
                    strategy.on_epoch(session, epoch)
            last = step == prep.total_steps or session.stop_reason is not None
            if (loop.log_every and step % loop.log_every == 0) or last:
                check_finite()
                now = time.perf_counter()
                speed = tokens_since / max(now - clock, 1e-9)
                tokens_since, clock = 0, now
                record = {"step": step, "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                          "tokens_per_s": speed, "epoch": session.epoch}
                for name, values in metrics.get("terms", {}).items():
                    record.update({f"{name}_{key}": float(value) for key, value in values.items()})
                log_line(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{speed:,.0f}")
            if eval_loader is not None and ((loop.eval_every and step % loop.eval_every == 0) or last):
                check_finite()
                scores = evaluate(session.model(), eval_loader, prep.loss_fn, mesh)
                log_line({"step": step, **{f"eval_{k}": v for k, v in scores.items()}})
                value = scores[metric_name]
                if best["metric"] is None or (value > best["metric"] if higher_is_better else value < best["metric"]):
                    best = {"metric": value, "step": step}
                    save_adapter(session.model(), out / "best")
                for strategy in prep.strategies:
                    strategy.on_eval(session, scores)
                last = last or session.stop_reason is not None
            preempted = stop.requested(step)
            if (loop.checkpoint_every and step % loop.checkpoint_every == 0) or last or preempted:
                check_finite()
                positions = {name: stream.position.to_dict() for name, stream in session.streams.items()}
                extra = {"best": best, "streams": positions, "strategies": session.memory, "config": config.to_dict()}
                saved = checkpointer.save(session.state, positions.pop(MAIN), extra)
                last_good = step
            if preempted:
                raise Preempted(stop.signum, step, str(saved))
            if session.stop_reason is not None:
                break
    finally:
        bar.close()
        log.close()
        checkpointer.close()

    state = session.state
    model = state.model()
    save_adapter(model, out / "adapter")
    final = {}
    for split in ("eval", "test"):
        if split in prep.task.splits:
            final.update({f"{split}_{k}": v for k, v in evaluate_split(model, split).items()})
    if best["step"] is not None and best["step"] != int(state.step) and "test" in prep.task.splits:
        best_model = build_model(config, prep.task.num_labels, adapter=out / "best")
        final.update({f"best_test_{k}": v for k, v in evaluate_split(best_model, "test").items()})
    if best["metric"] is not None:
        final[f"best_eval_{metric_name}"] = best["metric"]
    counts = count_params(model, state.tx.labels)
    result = {
        "config": config.to_dict(),
        "params": {"trainable": counts.trainable, "total": counts.total},
        "metrics": final,
        "best_step": best["step"],
        "steps": int(state.step),
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_bytes": peak_memory_bytes(),
        "versions": versions(),
        **({"stopped": session.stop_reason} if session.stop_reason is not None else {}),
    }
    if jax.process_index() == 0:
        _write_json_atomically(out / RESULT_FILE, result)
    return result
