"""The searches a rank search compares with its grid: DyLoRA, AdaLoRA and pilot-allocated LoRA.

Each trains, per seed and target set, on what the grid's points train on: the
same rows in the same order (``runner.prepare`` with the seed), the same
number of optimizer steps, the same optimizer and schedule, the target set's
learning rate (``sweep.rates_for`` at the search's largest rank) and the same
evaluation. Each yields ``PointResult`` rows whose ``search`` names it, with
the timing and XLA-counted training FLOPs of the programs that trained them
(``sweep.Timing``):

* ``dylora``: one LoRA at ``sweep.dylora.max_rank`` trained by
  ``DyLoraTrainStep``; a row per swept rank up to it, evaluated from the one
  adapter truncated to that rank (``dylora.set_rank``). The rows share one
  program: its cost is the search's, once.
* ``adalora``: one ``AdaLoraConfig`` run (``sweep.adalora`` plus the target
  set, the template's ``also_train`` and seed, and the run's length); its row
  holds the kept ranks per module (``rank_pattern``) and the parameters the
  kept triplets use.
* ``pilot``: the Delta W spectra of a rank-``sweep.pilot.rank`` LoRA (the
  grid's point at that rank and seed when the grid trained it, else a pilot
  run here) allocate ``mean_rank`` x modules ranks (``allocation``), and a
  LoRA with that ``rank_pattern`` is trained. The pilot's training is part of
  the search's cost (for a grid point: its share of the batched program).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from peftjax.analysis import lowrank
from peftjax.config import ExperimentConfig
from peftjax.core.counting import ParamCount, count_params
from peftjax.core.inject import apply, delete_adapter, iter_wrappers
from peftjax.core.labels import make_optimizer
from peftjax.methods.adalora import (
    AdaLoraConfig,
    AdaLoraLinear,
    hf_rank_pattern,
    kept_ranks,
    trainable_after_pruning,
)
from peftjax.methods.base import MethodConfig
from peftjax.methods.lora import LoraConfig
from peftjax.rank_search import allocation
from peftjax.rank_search.batched import ADAPTER_NAME, Member, build_batched_state, member_factors
from peftjax.rank_search.config import Point, SweepConfig, TargetSet, template_method
from peftjax.rank_search.dylora import DyLoraTrainStep, set_rank
from peftjax.rank_search.summary import load_factors
from peftjax.rank_search.sweep import PointResult, Timing, _evaluate_splits, _result, _train, _with
from peftjax.train import runner
from peftjax.train.sharding import make_mesh
from peftjax.train.state import TrainState, make_train_step

Log = Callable[[str], None]


@dataclasses.dataclass
class _Group:
    """One seed's prepared data and base model, shared by the searches of that seed."""

    seed: int
    prep: runner.Prepared
    setup_s: float

    def charge_setup(self) -> float:
        """The data and model loading time, charged once: to the first program that asks."""
        spent, self.setup_s = self.setup_s, 0.0
        return spent


def _groups(config: ExperimentConfig, sweep: SweepConfig) -> Iterator[_Group]:
    loss_fn = None
    for seed in sweep.seeds:
        started = time.perf_counter()
        prep = runner.prepare(_with(config, seed=seed, methods=()))
        loss_fn = loss_fn or prep.loss_fn  # one loss function: one evaluation program for every seed
        yield _Group(seed, dataclasses.replace(prep, loss_fn=loss_fn), time.perf_counter() - started)


def _make_tx(config: ExperimentConfig, group: _Group):
    return lambda lr: runner.build_optimizer(_with(config, seed=group.seed, learning_rate=lr), group.prep.total_steps)


def _rate(sweep: SweepConfig, config: ExperimentConfig, rank: int, target_set: TargetSet) -> float:
    return sweep.rates_for(rank, config.optim.learning_rate, target_set.name)[0]


def _train_method(config: ExperimentConfig, group: _Group, method: MethodConfig, learning_rate: float, mesh):
    """Apply ``method`` to the seed's base model, train it as ``peftjax train`` would
    (``make_optimizer``, ``TrainState``, ``make_train_step``), evaluate, and take the
    adapter off again. Returns the trained state, losses, counts, metrics and timing."""
    timing = Timing()
    started = time.perf_counter()
    prep = group.prep
    apply(prep.model, method, adapter_name=ADAPTER_NAME)
    try:
        optimizer = make_optimizer(prep.model, _make_tx(config, group)(learning_rate))
        state = TrainState.create(prep.model, optimizer).on_mesh(mesh)
        counts = count_params(prep.model, optimizer.labels)
        timing.setup_s = time.perf_counter() - started + group.charge_setup()
        step_fn = make_train_step(prep.loss_fn, grad_accum=config.train.grad_accum)
        state, losses = _train(step_fn, state, prep.train_loader, prep.total_steps, mesh, timing)
        metrics = _evaluate_splits(state.model(), prep, config, mesh, timing)
    finally:
        delete_adapter(prep.model, ADAPTER_NAME)
    return state, losses, counts, metrics, timing


def _with_search(result: PointResult, search: str, **extra: Any) -> PointResult:
    result.row.update(search=search, **extra)
    return result


# ----------------------------------------------------------------------------
# DyLoRA.
# ----------------------------------------------------------------------------


def _lora_params(factors: Mapping[str, tuple[np.ndarray, np.ndarray, float]]) -> int:
    return sum(a.size + b.size for a, b, _ in factors.values())


def run_dylora(config: ExperimentConfig, sweep: SweepConfig, target_sets: Sequence[TargetSet], *,
               log: Log) -> Iterator[PointResult]:
    template = template_method(config)
    max_rank, min_rank = sweep.dylora.max_rank, sweep.dylora.min_rank
    ranks = [r for r in sweep.ranks if min_rank <= r <= max_rank]
    mesh = make_mesh()
    for group in _groups(config, sweep):
        for target_set in target_sets:
            timing = Timing()
            started = time.perf_counter()
            lora = dataclasses.replace(template, targets=target_set.targets, seed=group.seed)
            lr = _rate(sweep, config, max_rank, target_set)
            state, (counts,) = build_batched_state(group.prep.model, lora, [Member(max_rank, lr)],
                                                   _make_tx(config, group))
            state = state.on_mesh(mesh)
            timing.setup_s = time.perf_counter() - started + group.charge_setup()
            # The seed that draws the ranks is a constant of the program: one program per seed.
            step_fn = DyLoraTrainStep(group.prep.loss_fn, lora, max_rank=max_rank, min_rank=min_rank,
                                      seed=group.seed, grad_accum=config.train.grad_accum)
            state, losses = _train(step_fn, state, group.prep.train_loader, group.prep.total_steps, mesh, timing)
            model = state.member(0).model()
            full = sum(w.lora_a.size + w.lora_b.size for _, w in iter_wrappers(model))  # at max_rank
            for rank in ranks:
                set_rank(model, rank, lora)
                timing_r = dataclasses.replace(timing)
                metrics = _evaluate_splits(model, group.prep, config, mesh, timing_r)
                factors = member_factors(model)
                own = _lora_params(factors)  # a rank-r LoRA's A and B: the padding counted out
                point = Point(target_set.name, rank, group.seed, lr)
                yield _with_search(
                    _result(point, target_set, lora, ParamCount(counts.trainable - full + own, counts.total - full + own),
                            metrics, losses[:, 0], timing_r, mode="dylora",
                        program=f"dylora-s{group.seed}-{target_set.name}", members=1, factors=factors),
                    "dylora", dylora_max_rank=max_rank)
            log(f"dylora   seed={group.seed} {target_set.name:<12} r_max={max_rank}: first step "
                f"{timing.first_step_s:.1f}s, {timing.step_s:.3f}s/step; ranks {ranks} evaluated")
            delete_adapter(group.prep.model, ADAPTER_NAME)


# ----------------------------------------------------------------------------
# AdaLoRA.
# ----------------------------------------------------------------------------


def adalora_config(sweep: SweepConfig, template: LoraConfig, target_set: TargetSet, seed: int,
                   total_steps: int) -> AdaLoraConfig:
    """``sweep.adalora`` for one run: the target set, the template's head and seed, the run's length."""
    return AdaLoraConfig(targets=target_set.targets, also_train=template.also_train, exclude=template.exclude,
                         seed=seed, total_steps=total_steps, **sweep.adalora)


def run_adalora(config: ExperimentConfig, sweep: SweepConfig, target_sets: Sequence[TargetSet], *,
                log: Log) -> Iterator[PointResult]:
    template = template_method(config)
    mesh = make_mesh()
    for group in _groups(config, sweep):
        for target_set in target_sets:
            method = adalora_config(sweep, template, target_set, group.seed, group.prep.total_steps)
            lr = _rate(sweep, config, method.init_rank, target_set)
            state, losses, counts, metrics, timing = _train_method(config, group, method, lr, mesh)
            ranks = kept_ranks(state.opt_state)
            model = state.model()
            kept_params = trainable_after_pruning(model, ranks)
            adapter_params = sum(math.prod(w.shape) for w in _adalora_factors(model))
            point = Point(target_set.name, method.target_rank, group.seed, lr)
            yield _with_search(
                _result(point, target_set, template, ParamCount(counts.trainable - adapter_params + kept_params,
                        counts.total), metrics, losses, timing, mode="adalora",
                        program=f"adalora-s{group.seed}-{target_set.name}", members=1, factors={}),
                "adalora", rank_pattern=ranks, hf_rank_pattern=hf_rank_pattern(state.opt_state),
                trained_params=counts.trainable, init_rank=method.init_rank,
                mean_kept_rank=float(np.mean(list(ranks.values()))))
            log(f"adalora  seed={group.seed} {target_set.name:<12} r {method.init_rank} -> {method.target_rank} mean: "
                f"kept {sorted(ranks.values())}; {timing.step_s:.3f}s/step")


def _adalora_factors(model) -> list:
    return [v for _, w in iter_wrappers(model) if isinstance(w, AdaLoraLinear)
            for v in (w.lora_a, w.lora_e, w.lora_b)]


# ----------------------------------------------------------------------------
# Pilot allocation.
# ----------------------------------------------------------------------------


def _grid_pilot(grid_rows: Sequence[dict], points_dir: pathlib.Path | None, target_set: str, rank: int,
                seed: int) -> tuple[dict, dict[str, np.ndarray]] | None:
    """The grid's row at (target set, rank, seed) and its Delta W spectra, if it trained it."""
    for row in grid_rows:
        if (row["target_set"], row["rank"], row["seed"]) == (target_set, rank, seed):
            file = points_dir / f"{Point.of(row).name}.npz" if points_dir else None
            if file is None or not file.exists():
                return None
            spectra = {m: lowrank.delta_singular_values(a, b, s) for m, (a, b, s) in load_factors(file).items()}
            return row, spectra
    return None


def run_pilot(config: ExperimentConfig, sweep: SweepConfig, target_sets: Sequence[TargetSet], *, log: Log,
              grid_rows: Sequence[dict] = (), points_dir: pathlib.Path | None = None) -> Iterator[PointResult]:
    template = template_method(config)
    pilot_rank, mesh = sweep.pilot.rank, make_mesh()
    for group in _groups(config, sweep):
        for target_set in target_sets:
            found = _grid_pilot(grid_rows, points_dir, target_set.name, pilot_rank, group.seed)
            if found is not None:
                pilot_row, spectra = found
                pilot_cost = {key: pilot_row[key] / pilot_row["members_in_program"]
                              for key in ("setup_s", "compile_s", "train_s")}
                pilot_cost.update(train_flops=pilot_row["train_flops"], eval_s=0.0, steps=pilot_row["steps"],
                                  source=f"grid point {Point.of(pilot_row).name}")
            else:
                pilot = dataclasses.replace(template, targets=target_set.targets, seed=group.seed, rank=pilot_rank)
                lr = _rate(sweep, config, pilot_rank, target_set)
                state, losses, _, _, timing = _train_method(config, group, pilot, lr, mesh)
                spectra = {m: lowrank.delta_singular_values(a, b, s) for m, (a, b, s)
                           in member_factors(state.model()).items()}
                pilot_cost = dict(setup_s=timing.setup_s, compile_s=timing.compile_s, train_s=timing.train_s,
                                  train_flops=timing.train_flops, eval_s=timing.eval_s, steps=len(losses),
                                  source="own pilot run")
            budget = int(round(sweep.pilot.mean_rank * len(spectra)))
            ranks = allocation.allocate_ranks(spectra, budget)
            method = dataclasses.replace(template, targets=tuple(ranks), seed=group.seed,
                                         rank=max(1, round(sweep.pilot.mean_rank)),
                                         rank_pattern=allocation.rank_pattern(ranks))
            lr = _rate(sweep, config, max(ranks.values()), target_set)
            state, losses, counts, metrics, timing = _train_method(config, group, method, lr, mesh)
            factors = member_factors(state.model())
            point = Point(target_set.name, method.rank, group.seed, lr)
            yield _with_search(
                _result(point, target_set, template, counts, metrics, losses, timing, mode="pilot",
                        program=f"pilot-s{group.seed}-{target_set.name}", members=1, factors=factors),
                "pilot", rank_pattern=ranks, budget=budget, pilot_rank=pilot_rank, pilot=pilot_cost,
                captured_energy=allocation.captured_energy(spectra, ranks),
                mean_kept_rank=float(np.mean(list(ranks.values()))))
            log(f"pilot    seed={group.seed} {target_set.name:<12} budget {budget} from rank {pilot_rank} "
                f"({pilot_cost['source']}): ranks {sorted(ranks.values())}")


SEARCH_RUNNERS = {"dylora": run_dylora, "adalora": run_adalora, "pilot": run_pilot}
