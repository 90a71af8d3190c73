"""One command for the comparison: the grid and the searches on the same data and budget.

``run_comparison`` runs the grid (``sweep.run_rank_search``: every rank x target
set x seed) when ``sweep.searches`` lists it, then each other search
(``peftjax.rank_search.searches``), and adds to ``rank_search.json``:

* ``search_rows``: every search's rows (``rank_search_searches.csv`` too);
* ``comparison``: per (search, target set), what the search picks and what it
  cost. A search picks by ``sweep.select_metric`` (mean over seeds): the grid
  and DyLoRA a rank, AdaLoRA and the pilot have one allocation each. Its
  ``sweep.metric`` is reported as mean ± std over seeds, against the grid's
  best (the grid's (target set, rank) of best mean ``metric``) with the
  difference in points, and its cost summed over seeds: wall time (setup,
  compilation, training, evaluation), optimizer steps, and XLA-counted
  training FLOPs, with the FLOPs as a fraction of the grid's.

The goal the report checks: a search within 1 point of the grid's best at
most 0.25x the grid's training FLOPs.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from peftjax.config import ExperimentConfig
from peftjax.rank_search.config import SweepConfig, TargetSet, higher_is_better
from peftjax.rank_search.searches import SEARCH_RUNNERS
from peftjax.rank_search.progress import POINTS_DIR, SweepProgress
from peftjax.rank_search.sweep import (
    RESULTS_JSON,
    _json_default,
    _finite_or_null,
    _without_spectra,
    program_totals,
    run_rank_search,
    validate_against_model,
    writable_output_dir,
    write_csv,
)

SEARCHES_CSV = "rank_search_searches.csv"
# The benchmark goal: within this many points of the grid's best, at most this fraction of its FLOPs.
GOAL_POINTS = 1.0
GOAL_FLOPS_FRACTION = 0.25
SEARCH_COLUMNS = ("search", "rank_pattern", "mean_kept_rank", "budget", "captured_energy", "trained_params")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _cost(rows: Sequence[dict]) -> dict[str, float]:
    """What the programs behind ``rows`` cost, plus a pilot's cost where a row used one."""
    totals = program_totals(rows)
    pilots = [r["pilot"] for r in rows if r.get("pilot")]
    wall = sum(totals[f"{k}_total"] for k in ("setup_s", "compile_s", "train_s", "eval_s", "eval_compile_s"))
    wall += sum(p["setup_s"] + p["compile_s"] + p["train_s"] + p["eval_s"] for p in pilots)
    return {
        "wall_s": wall,
        "compile_s": totals["compile_s_total"] + totals["eval_compile_s_total"] + sum(p["compile_s"] for p in pilots),
        "train_s": totals["train_s_total"] + sum(p["train_s"] for p in pilots),
        "eval_s": totals["eval_s_total"] + sum(p["eval_s"] for p in pilots),
        "optimizer_steps": totals["optimizer_steps_total"] + sum(p["steps"] for p in pilots),
        "train_flops": totals["train_flops_total"] + sum(p["train_flops"] for p in pilots),
        "programs": len({r["program"] for r in rows}),
    }


def _by_rank(rows: Sequence[dict], sweep: SweepConfig) -> list[dict[str, Any]]:
    """Per rank (at the row's own learning rate, one per rank here): mean ± std over seeds."""
    grouped: dict[tuple[int, float], list[dict]] = defaultdict(list)
    for row in rows:
        grouped[(row["rank"], row["learning_rate"])].append(row)
    entries = []
    for (rank, lr), group in sorted(grouped.items()):
        mean, std = _mean_std([r.get(sweep.metric, math.nan) for r in group])
        select = float(np.mean([r.get(sweep.select_metric, math.nan) for r in group]))
        entries.append({"rank": rank, "learning_rate": lr, "seeds": len(group), "mean": mean, "std": std,
                        "select": select, "trainable_params": int(np.mean([r["trainable_params"] for r in group]))})
    return entries


def _pick(entries: Sequence[dict], key: str, higher: bool) -> dict:
    finite = [e for e in entries if math.isfinite(e[key])] or list(entries)
    return (max if higher else min)(finite, key=lambda e: e[key])


def compare(rows: Sequence[dict], sweep: SweepConfig, target_sets: Sequence[str]) -> dict[str, Any]:
    """The comparison table (see the module docstring) from every search's rows."""
    higher_metric, higher_select = higher_is_better(sweep.metric), higher_is_better(sweep.select_metric)
    entries, grid_best, grid_flops = [], {}, {}
    for target_set in target_sets:
        grid = [r for r in rows if r["search"] == "grid" and r["target_set"] == target_set]
        if grid:
            best = _pick(_by_rank(grid, sweep), "mean", higher_metric)
            grid_best[target_set] = best
            grid_flops[target_set] = _cost(grid)["train_flops"]
    for search in ["grid", *[s for s in sweep.searches if s != "grid"]]:
        for target_set in target_sets:
            mine = [r for r in rows if r["search"] == search and r["target_set"] == target_set]
            if not mine:
                continue
            ranks = _by_rank(mine, sweep)
            picked = _pick(ranks, "select", higher_select)
            entry = {"search": search, "target_set": target_set, "picked_rank": picked["rank"],
                     "metric": sweep.metric, "mean": picked["mean"], "std": picked["std"], "seeds": picked["seeds"],
                     "trainable_params": picked["trainable_params"], "by_rank": ranks, **_cost(mine)}
            if search in ("adalora", "pilot"):
                entry["rank_patterns"] = [r["rank_pattern"] for r in mine]
                entry["mean_kept_rank"] = float(np.mean([r["mean_kept_rank"] for r in mine]))
            best = grid_best.get(target_set)
            if best is not None:
                entry["grid_best_rank"], entry["grid_best_mean"] = best["rank"], best["mean"]
                entry["points_from_grid_best"] = 100.0 * (picked["mean"] - best["mean"]) * (1 if higher_metric else -1)
                entry["flops_fraction_of_grid"] = entry["train_flops"] / grid_flops[target_set]
                entry["meets_goal"] = bool(entry["points_from_grid_best"] >= -GOAL_POINTS
                                           and entry["flops_fraction_of_grid"] <= GOAL_FLOPS_FRACTION)
            entries.append(entry)
    return {"entries": entries, "goal": {"points": GOAL_POINTS, "flops_fraction": GOAL_FLOPS_FRACTION}}


def run_comparison(
    config: ExperimentConfig,
    sweep: SweepConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
    log: Callable[[str], None] = print,
    command: str | None = None,
    report: bool = True,
) -> dict[str, Any]:
    """The grid (if listed) and every other search of ``sweep.searches``; returns the JSON payload.
    With ``resume`` the grid's finished points are read back (``run_rank_search``); the other
    searches train again."""
    out = pathlib.Path(config.output_dir)
    if "grid" in sweep.searches:
        payload = run_rank_search(config, sweep, overwrite=overwrite, resume=resume, report=False, log=log,
                                  command=command)
        target_sets = [TargetSet(name, targets if isinstance(targets, str) else tuple(targets))
                       for name, targets in payload["target_sets"].items()]
        grid_rows = payload["rows"]
    else:
        out = writable_output_dir(config)
        SweepProgress(out, config, sweep, resume=resume, overwrite=overwrite,  # refuses another search's folder
                      finished_results=(out / RESULTS_JSON).exists())
        target_sets = validate_against_model(config, sweep)
        payload = {"command": command, "config": config.to_dict(), "sweep": sweep.to_dict(), "rows": [],
                   "target_sets": {t.name: t.targets if isinstance(t.targets, str) else list(t.targets)
                                   for t in target_sets}}
        grid_rows = []
    search_rows: list[dict] = []
    for search in sweep.searches:
        if search == "grid":
            continue
        runner = SEARCH_RUNNERS[search]
        extra = {"grid_rows": grid_rows, "points_dir": out / POINTS_DIR} if search == "pilot" else {}
        for result in runner(config, sweep, target_sets, log=log, **extra):
            search_rows.append(_without_spectra(result.row))
        payload["search_rows"] = search_rows
        payload["comparison"] = compare([{**r, "search": "grid"} for r in grid_rows] + search_rows, sweep,
                                        [t.name for t in target_sets])
        write_csv(out / SEARCHES_CSV, search_rows, extra_columns=SEARCH_COLUMNS)
        staging = out / f".{RESULTS_JSON}.tmp"  # after each search: a later failure keeps the earlier ones
        staging.write_text(json.dumps(_finite_or_null(payload), indent=1, default=_json_default, allow_nan=False))
        os.replace(staging, out / RESULTS_JSON)
        log(f"{search}: {len([r for r in search_rows if r['search'] == search])} rows")
    if not search_rows and grid_rows:
        payload["comparison"] = compare([{**r, "search": "grid"} for r in grid_rows], sweep,
                                        [t.name for t in target_sets])
    if report:
        from peftjax.rank_search.report import write_report

        write_report(payload, out)
    return payload
