"""Run a rank search: every (target set, rank, seed, learning rate) trained and evaluated.

Two ways to train the same points:

* ``batched``: per seed, the data and the base model are prepared once
  (``runner.prepare``); per target set, all ranks x rates are trained in one
  jitted program (``peftjax.rank_search.batched``), each member evaluated with
  ``tasks.evaluate`` on the padded, masked model that computes its rank-r LoRA.
* ``sequential``: each point is its own run, built as ``peftjax train`` builds
  it (``prepare``: data, model, methods, optimizer; ``TrainState`` and
  ``make_train_step``), without the run's checkpoints and logs.

Both feed the same rows. Results, in the config's ``output_dir``:

* ``rank_search.csv`` / ``.json``: one row per point (metrics, trainable
  parameters, step time, peak memory: null on CPU), plus in the JSON the
  per-(target set, rank) summary over seeds, the Pareto front, effective ranks,
  subspace similarities, timings and machine load;
* ``report.md`` and ``plots/*.png`` (``peftjax.rank_search.report``);
* ``points/``: each point's learned factors (``.npz``), scratch for later analysis.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import jax
import numpy as np

from peftjax.analysis import lowrank
from peftjax.config import ExperimentConfig, FrozenDict
from peftjax.core.counting import count_params
from peftjax.core.inject import delete_adapter
from peftjax.core.paths import Targets
from peftjax.data import BatchLoader
from peftjax.methods.lora import LoraConfig
from peftjax.rank_search.batched import (
    ADAPTER_NAME,
    BatchedTrainStep,
    Member,
    build_batched_state,
    member_adafactor,
    member_factors,
)
from peftjax.rank_search.cost import CompileClock, StepShapes
from peftjax.rank_search.config import (
    Point,
    SweepConfig,
    SweepError,
    TargetSet,
    adapted_modules,
    check_ranks,
    resolve_target_sets,
    template_method,
)
from peftjax.errors import Preempted
from peftjax.rank_search.progress import POINTS_DIR, SweepProgress
from peftjax.rank_search.summary import ENERGIES, agreement, mean_spectra, pareto, similarities, summarize
from peftjax.train import runner
from peftjax.train.output import OutputLock
from peftjax.train.preemption import StopSignals
from peftjax.train.sharding import global_batch, make_mesh
from peftjax.train.state import TrainState, make_train_step
from peftjax.train.tasks import evaluate

RESULTS_JSON = "rank_search.json"
RESULTS_CSV = "rank_search.csv"


@dataclasses.dataclass
class Timing:
    """Where one training run's time went, and what its training computed."""

    setup_s: float = 0.0  # data, model, adapters, optimizer state
    compile_s: float = 0.0  # tracing, lowering and compiling the step, for every batch shape
    first_step_s: float = 0.0  # the first step's wall time, its compilation included
    step_s: float = math.nan  # mean wall time of the later steps, compilation excluded
    train_s: float = 0.0  # all steps, compilation excluded
    eval_s: float = 0.0  # evaluation, its compilation excluded
    eval_compile_s: float = 0.0
    train_flops: float = 0.0  # XLA's count for the whole program (all members), all steps


# ----------------------------------------------------------------------------
# Configs of points and groups.
# ----------------------------------------------------------------------------


def _with(config: ExperimentConfig, *, seed: int, learning_rate: float | None = None, methods=None) -> ExperimentConfig:
    optim = config.optim if learning_rate is None else dataclasses.replace(config.optim, learning_rate=learning_rate)
    return dataclasses.replace(
        config,
        methods=config.methods if methods is None else methods,
        optim=optim,
        train=dataclasses.replace(config.train, seed=seed),
    )


def point_config(config: ExperimentConfig, targets: Targets, point: Point) -> ExperimentConfig:
    """The experiment config ``peftjax train`` would run for ``point``: the template
    LoRA at the point's rank and targets, seeded (adapter init, head init, data
    order and dropout) by the point's seed."""
    spec = {**config.methods[0].to_dict(), "rank": point.rank, "targets": targets, "seed": point.seed}
    return _with(config, seed=point.seed, learning_rate=point.learning_rate, methods=(FrozenDict(spec),))


def _plan(sweep: SweepConfig, target_sets: Sequence[TargetSet], default_lr: float) -> list[Point]:
    """Every point, grouped as the batched mode trains them: seed, target set, then rank and rate."""
    return [
        Point(target_set.name, rank, seed, lr)
        for seed in sweep.seeds
        for target_set in target_sets
        for rank in sweep.ranks
        for lr in sweep.rates_for(rank, default_lr, target_set.name)
    ]


# ----------------------------------------------------------------------------
# Training and evaluation (shared by both modes).
# ----------------------------------------------------------------------------


def _train(step_fn: Callable, state, loader: BatchLoader, total_steps: int, mesh, timing: Timing,
           after_step: Callable[[int], None] = lambda step: None):
    """``total_steps`` steps from the loader's start; returns the state and the losses (steps x members).
    ``timing`` gets the compilation apart from the steps, and XLA's FLOPs of all steps;
    ``after_step(step)`` runs after each step (it raises to stop the sweep)."""
    batches = loader.iterate()
    losses = []
    shapes = StepShapes()
    with CompileClock() as clock:
        started = time.perf_counter()
        batch = global_batch(next(batches), mesh)
        shapes.add(batch)
        state, metrics = step_fn(state, batch)
        losses.append(metrics["loss"])
        jax.block_until_ready(metrics["loss"])
        timing.first_step_s = time.perf_counter() - started
        after_step(1)
        later, compiled_before = time.perf_counter(), clock.seconds
        for step in range(2, total_steps + 1):
            batch = global_batch(next(batches), mesh)
            shapes.add(batch)
            state, metrics = step_fn(state, batch)
            losses.append(metrics["loss"])
            after_step(step)
        jax.block_until_ready(losses[-1])
        now = time.perf_counter()
    if total_steps > 1:
        timing.step_s = (now - later - (clock.seconds - compiled_before)) / (total_steps - 1)
    timing.compile_s = clock.seconds
    timing.train_s = now - started - clock.seconds
    timing.train_flops = shapes.total_flops(lambda example: step_fn.lower(state, example))
    return state, np.asarray(jax.device_get(losses), np.float64)


def _evaluate_splits(model, prep: runner.Prepared, config: ExperimentConfig, mesh, timing: Timing) -> dict[str, float]:
    """``{split}_{accuracy,loss}`` on the eval and test splits, as ``peftjax train`` reports them;
    adds the time taken to ``timing`` (evaluation and its compilation apart)."""
    scores = {}
    started = time.perf_counter()
    with CompileClock() as clock:
        for split in ("eval", "test"):
            if split in prep.task.splits:
                loader = prep.task.eval_loader(config.train.eval_batch_size, split)
                found = evaluate(model, loader, prep.loss_fn, mesh)
                scores.update({f"{split}_{k}": v for k, v in found.items()})
    timing.eval_s += time.perf_counter() - started - clock.seconds
    timing.eval_compile_s += clock.seconds
    return scores


def _module_kind(path: str) -> str:
    """``bert.encoder.layer.3.attention.self.query`` -> ``attention.self.query``."""
    parts = path.split(".")
    last_index = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[last_index + 1 :]) or path


@dataclasses.dataclass
class PointResult:
    """A trained point: its row, and its factors for the analysis."""

    row: dict[str, Any]
    factors: dict[str, tuple[np.ndarray, np.ndarray, float]]


def _result(
    point: Point,
    target_set: TargetSet,
    template: LoraConfig,
    counts,
    metrics: dict[str, float],
    losses: np.ndarray,
    timing: Timing,
    *,
    mode: str,
    program: str,
    members: int,
    factors,
) -> PointResult:
    spectra = {path: lowrank.delta_singular_values(a, b, s) for path, (a, b, s) in factors.items()}
    finite = bool(np.all(np.isfinite(losses)))
    row = {
        "mode": mode,
        "program": program,
        "target_set": point.target_set,
        "targets": target_set.targets if isinstance(target_set.targets, str) else "+".join(target_set.targets),
        "modules": len(factors),
        "rank": point.rank,
        "alpha": template.alpha,
        "scale": dataclasses.replace(template, rank=point.rank).scale,
        "seed": point.seed,
        "learning_rate": point.learning_rate,
        "trainable_params": counts.trainable,
        "total_params": counts.total,
        **metrics,
        "final_train_loss": float(losses[-1]),
        "finite": finite,
        "steps": len(losses),
        "members_in_program": members,
        "step_time_s": timing.step_s,
        "step_time_per_member_s": timing.step_s / members,
        "first_step_s": timing.first_step_s,
        "setup_s": timing.setup_s,
        "compile_s": timing.compile_s,
        "train_s": timing.train_s,
        "eval_s": timing.eval_s,
        "eval_compile_s": timing.eval_compile_s,
        "train_flops": timing.train_flops / members,  # this point's share of its program's
        "program_train_flops": timing.train_flops,
        "peak_memory_bytes": runner.peak_memory_bytes(),
    }
    for energy in ENERGIES:
        ranks = [lowrank.effective_rank(sv, energy) for sv in spectra.values()]
        row[f"effective_rank_{round(energy * 100)}"] = float(np.mean(ranks)) if ranks else math.nan
    row["spectra"] = {path: sv.tolist() for path, sv in spectra.items()}
    return PointResult(row, factors)


def _points_of_group(points: Sequence[Point], seed: int, target_set: str) -> list[Point]:
    return [p for p in points if p.seed == seed and p.target_set == target_set]


def _chunks(items: Sequence, size: int | None) -> Iterator[Sequence]:
    size = size or len(items)
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_batched(
    config: ExperimentConfig,
    sweep: SweepConfig,
    target_sets: Sequence[TargetSet],
    points: Sequence[Point],
    *,
    log: Callable[[str], None],
    done: Collection[str] = (),
    after_step: Callable[[int], None] = lambda step: None,
) -> Iterator[PointResult]:
    """Train ``points`` as batched programs: one per (seed, target set, chunk of max_members),
    but for programs whose points are all ``done`` (by name)."""
    template = template_method(config)
    mesh = make_mesh()
    # Compiled once per (target set, padded rank, members), reused by every seed and every chunk of
    # that shape: same graph, same optimizer config.
    steps: dict[tuple[str, int, int], tuple[BatchedTrainStep, Any]] = {}
    loss_fn = None
    for seed in sweep.seeds:
        if all(p.name in done for p in points if p.seed == seed):
            continue
        started = time.perf_counter()
        group_config = _with(config, seed=seed, methods=())
        prep = runner.prepare(group_config)  # data, base model (head seeded), loader, steps, loss
        # One loss function for all seeds, so the evaluation compiled for the first seed serves the others.
        loss_fn = loss_fn or prep.loss_fn
        prep = dataclasses.replace(prep, loss_fn=loss_fn)
        data_s = time.perf_counter() - started
        for target_set in target_sets:
            group = _points_of_group(points, seed, target_set.name)
            lora = dataclasses.replace(template, targets=target_set.targets, seed=seed)
            for chunk_index, chunk in enumerate(_chunks(group, sweep.max_members)):
                if all(p.name in done for p in chunk):  # the same chunks as the first time: the same programs
                    continue
                timing = Timing()
                started = time.perf_counter()
                members = [Member(p.rank, p.learning_rate) for p in chunk]

                def make_tx(lr: float, _prep=prep):
                    return runner.build_optimizer(_with(config, seed=seed, learning_rate=lr), _prep.total_steps,
                                                  adafactor=member_adafactor)

                shape_key = (target_set.name, max(m.rank for m in members), len(members))  # same program
                step_fn, static = steps.get(shape_key, (None, None))
                state, counts = build_batched_state(prep.model, lora, members, make_tx, reuse_static=static)
                state = state.on_mesh(mesh)
                timing.setup_s = time.perf_counter() - started + data_s
                data_s = 0.0  # the data and the model were loaded once for the seed: charged to its first program
                if step_fn is None:
                    step_fn = BatchedTrainStep(loss_fn, grad_accum=config.train.grad_accum)
                    steps[shape_key] = (step_fn, state.static)
                state, losses = _train(step_fn, state, prep.train_loader, prep.total_steps, mesh, timing, after_step)
                for index, point in enumerate(chunk):
                    model = state.member(index).model()
                    timing_i = dataclasses.replace(timing)
                    metrics = _evaluate_splits(model, prep, config, mesh, timing_i)
                    factors = member_factors(model)
                    yield _result(point, target_set, template, counts[index], metrics, losses[:, index], timing_i,
                                  mode="batched", program=f"batched-s{seed}-{target_set.name}-{chunk_index}",
                                  members=len(chunk), factors=factors)
                log(f"batched  seed={seed} {target_set.name:<12} ranks={[m.rank for m in members]} "
                    f"first step {timing.first_step_s:.1f}s, {timing.step_s:.3f}s/step for {len(chunk)} members")
                delete_adapter(prep.model, ADAPTER_NAME)  # the base again, for the next target set


def run_sequential(
    config: ExperimentConfig,
    target_sets: Sequence[TargetSet],
    points: Sequence[Point],
    *,
    log: Callable[[str], None],
    done: Collection[str] = (),
    after_step: Callable[[int], None] = lambda step: None,
) -> Iterator[PointResult]:
    """Train ``points`` one at a time, each as ``peftjax train`` builds a run, but those ``done`` (by name)."""
    template = template_method(config)
    targets_of = {t.name: t for t in target_sets}
    mesh = make_mesh()
    for point in points:
        if point.name in done:
            continue
        timing = Timing()
        started = time.perf_counter()
        target_set = targets_of[point.target_set]
        cfg = point_config(config, target_set.targets, point)
        prep = runner.prepare(cfg)
        state = TrainState.create(prep.model, prep.optimizer).on_mesh(mesh)  # as peftjax train lays it out
        counts = count_params(prep.model, prep.optimizer.labels)
        timing.setup_s = time.perf_counter() - started
        step_fn = make_train_step(prep.loss_fn, grad_accum=cfg.train.grad_accum)
        state, losses = _train(step_fn, state, prep.train_loader, prep.total_steps, mesh, timing, after_step)
        model = state.model()
        metrics = _evaluate_splits(model, prep, cfg, mesh, timing)
        log(f"sequential {point.name}: first step {timing.first_step_s:.1f}s, {timing.step_s:.3f}s/step")
        yield _result(point, target_set, template, counts, metrics, losses, timing, mode="sequential",
                      program=point.name, members=1, factors=member_factors(model))


# ----------------------------------------------------------------------------
# The command.
# ----------------------------------------------------------------------------

CSV_COLUMNS = (
    "mode", "target_set", "targets", "modules", "rank", "alpha", "scale", "seed", "learning_rate",
    "trainable_params", "total_params", "eval_accuracy", "eval_loss", "test_accuracy", "test_loss",
    "final_train_loss", "finite", "steps", "members_in_program", "step_time_s", "step_time_per_member_s",
    "first_step_s", "setup_s", "compile_s", "train_s", "eval_s", "eval_compile_s", "train_flops",
    "program_train_flops", "peak_memory_bytes", "effective_rank_90", "effective_rank_99",
)  # fmt: skip


def write_csv(path: pathlib.Path, rows: Sequence[dict], extra_columns: Sequence[str] = ()) -> None:
    columns = [c for c in (*extra_columns, *CSV_COLUMNS) if any(c in r for r in rows)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: ("" if row.get(c) is None else row.get(c)) for c in columns})


def _machine_load() -> dict[str, Any]:
    one, five, fifteen = os.getloadavg()
    return {"loadavg_1m": one, "loadavg_5m": five, "loadavg_15m": fifteen, "cpu_count": os.cpu_count(),
            "time": time.strftime("%Y-%m-%d %H:%M:%S")}


def writable_output_dir(config: ExperimentConfig) -> pathlib.Path:
    out = pathlib.Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SweepError(f"{out} is not writable ({err.strerror}); set output_dir=... to a writable folder",
                         "output_dir") from None
    return out


def validate_against_model(config: ExperimentConfig, sweep: SweepConfig) -> list[TargetSet]:
    """The checks that need the model: known target sets, ranks within every kernel's min(d, k)."""
    task, _ = runner.load_task(config)
    model = runner.build_model(config, task.num_labels)
    template = template_method(config)
    target_sets = resolve_target_sets(sweep, model)
    for index, target_set in enumerate(target_sets):
        check_ranks(sweep.ranks, adapted_modules(model, template, target_set, index), target_set)
    return target_sets


def run_rank_search(
    config: ExperimentConfig,
    sweep: SweepConfig,
    *,
    compare_sequential: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    report: bool = True,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the sweep (``sweep.mode``; with ``compare_sequential`` also the other way
    round for the wall-time ratio) and write the results; returns the JSON payload.

    Each point is kept as it finishes (``peftjax.rank_search.progress``); with
    ``resume`` the finished ones are read back instead of trained again. The
    output folder is locked for the sweep, and a SIGTERM or SIGINT stops it
    after the current step with ``Preempted``: the finished points are kept,
    the program in training starts over on ``--resume``.
    """
    out = writable_output_dir(config)
    with OutputLock(out), StopSignals() as stop:
        progress = SweepProgress(out, config, sweep, resume=resume, overwrite=overwrite,
                                 finished_results=(out / RESULTS_JSON).exists())
        return _run_rank_search(config, sweep, out, progress, stop, compare_sequential=compare_sequential,
                                report=report, log=log, command=command)


def _run_rank_search(config: ExperimentConfig, sweep: SweepConfig, out: pathlib.Path, progress: SweepProgress,
                     stop: StopSignals, *, compare_sequential: bool, report: bool, log: Callable[[str], None],
                     command: str | None) -> dict[str, Any]:
    target_sets = validate_against_model(config, sweep)
    points = _plan(sweep, target_sets, config.optim.learning_rate)
    primary = sweep.mode
    modes = [primary] + ([m for m in ("batched", "sequential") if m != primary] if compare_sequential else [])
    log(f"rank search: {len(points)} points ({len(sweep.ranks)} ranks x {len(target_sets)} target sets x "
        f"{len(sweep.seeds)} seeds x rates), modes {modes}, output {out}")
    rows_by_mode: dict[str, list[dict]] = {}
    timing: dict[str, Any] = {}
    payload: dict[str, Any] = {}
    for mode in modes:
        load_before = _machine_load()
        started = time.perf_counter()
        by_name = {p.name: row for p, row in ((p, progress.finished(mode).get(p.name)) for p in points) if row}
        reused = len(by_name)
        if reused:
            log(f"{mode}: {reused} of {len(points)} points already trained in {progress.folder}; training the rest")

        def after_step(step: int, mode=mode, by_name=by_name) -> None:
            if stop.requested(step):
                raise Preempted(stop.signum, step, f"{progress.folder} ({mode}: {len(by_name)} of {len(points)} "
                                "points finished; the program in training starts over)")

        kwargs = dict(log=log, done=set(by_name), after_step=after_step)
        results = (run_batched(config, sweep, target_sets, points, **kwargs) if mode == "batched"
                   else run_sequential(config, target_sets, points, **kwargs))
        for result in results:
            name = Point.of(result.row).name
            progress.record(mode, name, result.row, result.factors if mode == primary else None)
            by_name[name] = result.row
        rows = [by_name[p.name] for p in points]
        programs = _unique_programs(rows)
        timing[mode] = {"wall_s": time.perf_counter() - started, "points_reused": reused, "load_before": load_before,
                        "load_after": _machine_load(), "programs": len(programs),
                        **program_totals(rows)}
        rows_by_mode[mode] = rows
        log(f"{mode}: {len(rows)} points in {timing[mode]['wall_s']:.0f}s")
        if len(rows_by_mode) == 2 and not any(timing[m]["points_reused"] for m in rows_by_mode):
            # Only when both modes trained every point in this invocation: wall times of a resumed
            # sweep cover part of the work.
            timing["batched_over_sequential"] = timing["batched"]["wall_s"] / timing["sequential"]["wall_s"]
        # Written after each mode, so a long comparison that fails later keeps the sweep's results.
        payload = _write_results(out, config, sweep, target_sets, rows_by_mode, primary, timing, command, report)
    return payload


def _write_results(
    out: pathlib.Path,
    config: ExperimentConfig,
    sweep: SweepConfig,
    target_sets: Sequence[TargetSet],
    rows_by_mode: dict[str, list[dict]],
    primary: str,
    timing: dict[str, Any],
    command: str | None,
    report: bool,
) -> dict[str, Any]:
    rows = rows_by_mode[primary]
    summary = summarize(rows, sweep)
    payload = {
        "command": command,
        "config": config.to_dict(),
        "sweep": sweep.to_dict(),
        "target_sets": {t.name: t.targets if isinstance(t.targets, str) else list(t.targets) for t in target_sets},
        "mode": primary,
        "rows": [_without_spectra(r) for r in rows],
        "summary": summary,
        "pareto": pareto(summary, sweep),
        "spectra": mean_spectra(rows, sweep),
        "similarity": similarities(rows, sweep, out / POINTS_DIR),
        "timing": timing,
        "versions": runner.versions(),
    }
    write_csv(out / RESULTS_CSV, rows)
    for other, other_rows in rows_by_mode.items():
        if other != primary:
            payload[f"{other}_rows"] = [_without_spectra(r) for r in other_rows]
            payload["agreement"] = agreement(rows, other_rows, [sweep.metric])
            write_csv(out / f"rank_search_{other}.csv", other_rows)
    staging = out / f".{RESULTS_JSON}.tmp"
    staging.write_text(json.dumps(_finite_or_null(payload), indent=1, default=_json_default, allow_nan=False))
    os.replace(staging, out / RESULTS_JSON)
    if report:
        from peftjax.rank_search.report import write_report

        write_report(payload, out)
    return payload


def _without_spectra(row: dict[str, Any]) -> dict[str, Any]:
    """A row as written: per-module singular values are summarised, not listed."""
    return {k: v for k, v in row.items() if k != "spectra"}


def _unique_programs(rows: Sequence[dict]) -> list[dict]:
    """One row per trained program (members of a batched program share its timing)."""
    return list({row["program"]: row for row in rows}.values())


def program_totals(rows: Sequence[dict]) -> dict[str, float]:
    """Time and FLOPs of the programs that trained ``rows``: setup, compilation, steps and
    FLOPs once per program; evaluation and its compilation per row."""
    programs = _unique_programs(rows)
    per_program = ("first_step_s", "setup_s", "compile_s", "train_s")
    totals = {f"{key}_total": float(sum(r[key] for r in programs)) for key in per_program}
    totals["eval_s_total"] = float(sum(r["eval_s"] for r in rows))
    totals["eval_compile_s_total"] = float(sum(r["eval_compile_s"] for r in rows))
    totals["train_flops_total"] = float(sum(r["program_train_flops"] for r in programs))
    totals["optimizer_steps_total"] = int(sum(r["steps"] * r["members_in_program"] for r in programs))
    return totals


def _finite_or_null(value: Any) -> Any:
    """NaN and infinities as null: strict JSON has no such numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
