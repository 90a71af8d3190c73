"""The rank search's results summarised: learning rates chosen, means over seeds,
the Pareto front, spectra and subspace similarities of the learned adapters."""

from __future__ import annotations

import math
import pathlib
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from peftjax.analysis import lowrank
from peftjax.rank_search.config import Point, SweepConfig, higher_is_better

# Energy levels of the effective rank reported per adapter.
ENERGIES = (0.9, 0.99)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def select_learning_rates(rows: Sequence[dict], sweep: SweepConfig) -> dict[tuple[str, int], float]:
    """Per (target set, rank): the rate with the best mean ``select_metric`` over seeds
    (the only rate when rates are not tuned)."""
    by_rate: dict[tuple[str, int], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        key = (row["target_set"], row["rank"])
        by_rate[key][row["learning_rate"]].append(row.get(sweep.select_metric, math.nan))
    better = higher_is_better(sweep.select_metric)
    chosen = {}
    for key, rates in by_rate.items():
        if len(rates) == 1:
            chosen[key] = next(iter(rates))
            continue
        means = {lr: float(np.mean(v)) for lr, v in rates.items()}
        finite = {lr: m for lr, m in means.items() if math.isfinite(m)} or means
        chosen[key] = (max if better else min)(finite, key=finite.get)
    return chosen


def summarize(rows: Sequence[dict], sweep: SweepConfig) -> list[dict[str, Any]]:
    """One entry per (target set, rank) at its selected rate: the metric's mean and
    std over seeds, parameters, timing, effective ranks."""
    chosen = select_learning_rates(rows, sweep)
    groups: dict[tuple[str, int], list[dict]] = defaultdict(list)
    for row in rows:
        key = (row["target_set"], row["rank"])
        if row["learning_rate"] == chosen[key]:
            groups[key].append(row)
    summary = []
    for (target_set, rank), group in groups.items():
        mean, std = _mean_std([r.get(sweep.metric, math.nan) for r in group])
        memory = [r["peak_memory_bytes"] for r in group if r["peak_memory_bytes"] is not None]
        entry = {
            "target_set": target_set,
            "rank": rank,
            "learning_rate": chosen[(target_set, rank)],
            "seeds": len(group),
            "metric": sweep.metric,
            "mean": mean,
            "std": std,
            "trainable_params": group[0]["trainable_params"],
            "step_time_s": float(np.mean([r["step_time_s"] for r in group])),
            "step_time_per_member_s": float(np.mean([r["step_time_per_member_s"] for r in group])),
            "members_in_program": group[0]["members_in_program"],
            "peak_memory_bytes": max(memory) if memory else None,
            "all_finite": all(r["finite"] for r in group),
        }
        for energy in ENERGIES:
            key = f"effective_rank_{round(energy * 100)}"
            entry[key] = float(np.mean([r[key] for r in group]))
        summary.append(entry)
    order = {t.name: i for i, t in enumerate(sweep.target_sets)}
    return sorted(summary, key=lambda e: (order.get(e["target_set"], len(order)), e["rank"]))


def pareto(summary: Sequence[dict], sweep: SweepConfig) -> list[dict[str, Any]]:
    """The (target set, rank) entries on the front of trainable parameters vs the metric."""
    front = lowrank.pareto_front([e["trainable_params"] for e in summary], [e["mean"] for e in summary],
                                 higher_is_better=higher_is_better(sweep.metric))
    return [{k: summary[i][k] for k in ("target_set", "rank", "trainable_params", "mean", "std")} for i in front]


def load_factors(path: pathlib.Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    with np.load(path) as data:
        modules = sorted({key.rsplit("|", 1)[0] for key in data.files})
        return {m: (data[f"{m}|A"], data[f"{m}|B"], float(data[f"{m}|scale"])) for m in modules}


def save_factors(path: pathlib.Path, factors: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> None:
    arrays = {}
    for module, (a, b, scale) in factors.items():
        arrays[f"{module}|A"], arrays[f"{module}|B"], arrays[f"{module}|scale"] = a, b, np.float64(scale)
    np.savez(path, **arrays)


def similarities(rows: Sequence[dict], sweep: SweepConfig, points_dir: pathlib.Path) -> dict[str, Any]:
    """Subspace similarity (Hu et al. 2021, section 7.2) between adapters.

    Across ranks: each rank r vs the largest rank R at the same seed, over the
    modules both adapt: phi(1, 1) (top directions) and phi(r, r) (all of rank
    r's directions vs R's top r), on A's input-space singular vectors (the
    paper's phi) and on Delta W's input-space singular vectors (what the update
    reads). Across seeds: the same rank at two seeds. With the random-subspace
    expectation max(i', j') / d beside each. Also the phi(i', j') grid of one
    rank pair (8 vs R when 8 is swept), averaged over modules, for the plot.
    """
    chosen = select_learning_rates(rows, sweep)
    picked = {(r["target_set"], r["rank"], r["seed"]): r for r in rows
              if r["learning_rate"] == chosen[(r["target_set"], r["rank"])]}
    largest = max(sweep.ranks)
    grid_rank = 8 if 8 in sweep.ranks and largest > 8 else (sweep.ranks[-2] if len(sweep.ranks) > 1 else None)
    result: dict[str, Any] = {"largest_rank": largest, "grid_ranks": [grid_rank, largest] if grid_rank else None,
                              "across_ranks": [], "across_seeds": [], "grid": {}}
    bases_cache: dict[tuple, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def bases(target_set: str, rank: int, seed: int):
        key = (target_set, rank, seed)
        if key not in bases_cache:
            row = picked.get(key)
            file = points_dir / f"{Point.of(row).name}.npz" if row else None
            if file is None or not file.exists():
                bases_cache[key] = {}
            else:
                bases_cache[key] = {
                    m: (lowrank.input_subspace(a), lowrank.delta_input_subspace(a, b))
                    for m, (a, b, _) in load_factors(file).items()
                }
        return bases_cache[key]

    def compare(first, second, top: int) -> dict[str, float]:
        modules = sorted(set(first) & set(second))
        if not modules:
            return {}
        stats = defaultdict(list)
        for m in modules:
            (a1, d1), (a2, d2) = first[m], second[m]
            dim = a1.shape[0]
            stats["phi_A_top1"].append(lowrank.subspace_similarity(a1, a2, 1, 1))
            stats["phi_A_top_r"].append(lowrank.subspace_similarity(a1, a2, top, top))
            stats["phi_dW_top1"].append(lowrank.subspace_similarity(d1, d2, 1, 1))
            stats["phi_dW_top_r"].append(lowrank.subspace_similarity(d1, d2, top, top))
            stats["random_top1"].append(lowrank.random_similarity(1, 1, dim))
            stats["random_top_r"].append(lowrank.random_similarity(top, top, dim))
        return {k: float(np.mean(v)) for k, v in stats.items()} | {"modules": len(modules)}

    for target_set in [t.name for t in sweep.target_sets]:
        for rank in sweep.ranks:
            if rank < largest:
                found = [compare(bases(target_set, rank, s), bases(target_set, largest, s), rank) for s in sweep.seeds]
                found = [f for f in found if f]
                if found:
                    result["across_ranks"].append({"target_set": target_set, "rank": rank, "vs_rank": largest,
                                                   **_average(found)})
            if len(sweep.seeds) > 1:
                pairs = [(a, b) for i, a in enumerate(sweep.seeds) for b in sweep.seeds[i + 1 :]]
                found = [compare(bases(target_set, rank, a), bases(target_set, rank, b), rank) for a, b in pairs]
                found = [f for f in found if f]
                if found:
                    result["across_seeds"].append({"target_set": target_set, "rank": rank, "seed_pairs": len(found),
                                                   **_average(found)})
        if grid_rank:
            first, second = bases(target_set, grid_rank, sweep.seeds[0]), bases(target_set, largest, sweep.seeds[0])
            modules = sorted(set(first) & set(second))
            if modules:
                grids = [lowrank.similarity_grid(first[m][0], second[m][0]) for m in modules]
                result["grid"][target_set] = np.mean(grids, axis=0).tolist()
    return result


def _average(found: Sequence[dict[str, float]]) -> dict[str, float]:
    return {k: float(np.mean([f[k] for f in found])) for k in found[0]}


def mean_spectra(rows: Sequence[dict], sweep: SweepConfig) -> dict[str, dict[int, list[float]]]:
    """Per target set and rank (selected rate): sigma_i / sigma_1 of Delta W, averaged
    over modules and seeds."""
    chosen = select_learning_rates(rows, sweep)
    collected: dict[str, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        if row["learning_rate"] != chosen[(row["target_set"], row["rank"])]:
            continue
        for values in row["spectra"].values():
            values = np.asarray(values)
            if values.size and values[0] > 0:
                collected[row["target_set"]][row["rank"]].append(values / values[0])
    return {t: {r: np.mean(v, axis=0).tolist() for r, v in sorted(by_rank.items())} for t, by_rank in collected.items()}


def agreement(first: Sequence[dict], second: Sequence[dict], metric_names: Sequence[str]) -> dict[str, Any]:
    """How far the batched and the sequential rows of the same points are apart."""
    key = lambda r: (r["target_set"], r["rank"], r["seed"], r["learning_rate"])  # noqa: E731
    others = {key(r): r for r in second}
    diffs: dict[str, list[float]] = defaultdict(list)
    for row in first:
        other = others.get(key(row))
        if other is None:
            continue
        for name in [*metric_names, "final_train_loss"]:
            if name in row and name in other:
                diffs[name].append(abs(row[name] - other[name]))
    return {f"max_abs_diff_{k}": float(np.max(v)) for k, v in diffs.items() if v} | {"points": len(first)}
