"""Learning curves over K labelled examples per class: ``peftjax few-shot CONFIG``.

The file is an experiment config (the base of every run) plus::

    few_shot:
      shots: [4, 8, 16, 32, 64, 128]     # K, examples per class
      seeds: [0, 1, 2, 3, 4]
      metric: test_accuracy
      arms:                              # name -> dotted overrides of the base (run and shown by name)
        linear_probe: {methods: [{type: linear_probe}], optim.learning_rate: 1.0e-2}
        lora: {methods: [{type: lora, targets: [query, value], rank: 8, also_train: ['classifier\\..*']}]}

Every arm trains at every K with every seed: ``data.shots_per_class`` is K
and both ``data.row_seed`` (which examples) and ``train.seed`` (initialisation,
order) are the seed, so the arms of one seed see the same examples, and a
seed's sample for K is inside its sample for 2K (``peftjax.data.subsets``).
Everything else (steps, batch size, evaluation split) is the base config's:
one budget for every K. The report is the mean and sample standard deviation
over seeds of ``metric`` per arm and K, as a table and a plot.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterable
from typing import Any

from peftjax.config import ConfigError, ExperimentConfig, FrozenDict, apply_overrides, load_config
from peftjax.schema import Section, require
from peftjax.transfer.grid import Cell, mean_and_std, run_cells

SECTION = "few_shot"


@dataclasses.dataclass(frozen=True, kw_only=True)
class FewShotConfig(Section):
    """The ``few_shot`` section (see the module docstring)."""

    shots: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    metric: str = "test_accuracy"
    arms: FrozenDict = dataclasses.field(default_factory=FrozenDict)

    def _validate(self) -> None:
        require(len(self.shots) > 0 and all(k >= 1 for k in self.shots), "shots", "needs K >= 1 values")
        require(list(self.shots) == sorted(set(self.shots)), "shots", f"must increase, got {list(self.shots)}")
        require(len(self.seeds) > 0 and len(set(self.seeds)) == len(self.seeds), "seeds", "needs distinct seeds")
        require(len(self.arms) > 0, "arms", "needs at least one arm: {name: {dotted.key: value, ...}}")
        for name, overrides in self.arms.items():
            require(isinstance(overrides, FrozenDict), f"arms.{name}",
                    "must map dotted config keys to values, e.g. {methods: [{type: linear_probe}]}")


def load_few_shot(path: str | pathlib.Path, overrides: Iterable[str] = ()) -> tuple[ExperimentConfig, FewShotConfig]:
    """The base experiment config and its ``few_shot`` section; every arm's
    config is built once here, so a bad override fails before any training."""
    from peftjax.methods.base import config_from_dict
    from peftjax.strategies import strategy_from_dict

    sections: dict[str, Any] = {SECTION: None}
    config = load_config(path, overrides, method_validator=config_from_dict, strategy_validator=strategy_from_dict,
                         split_sections=sections)
    if sections[SECTION] is None:
        raise ConfigError(f"{path} has no few_shot section (shots, seeds, arms)", SECTION)
    try:
        few_shot = FewShotConfig.from_dict(sections[SECTION])
    except ConfigError as error:
        raise error.prefixed(f"{SECTION}.") from None
    require(config.data.task == "classification", "data.task", "few-shot sampling needs classes")
    for cell in cells(few_shot):
        cell.config(config, pathlib.Path(config.output_dir))
    return config, few_shot


def cells(few_shot: FewShotConfig) -> list[Cell]:
    """Every (arm, K, seed), seeds outermost: a grid stopped early has every arm and K for its first seeds.
    An arm's programs are the same for every K and seed, compiled once with the persistent cache."""
    return [
        Cell({"arm": arm, "shots": k, "seed": seed},
             {**overrides.to_dict(), "data.shots_per_class": k, "data.row_seed": seed, "train.seed": seed})
        for seed in few_shot.seeds for k in few_shot.shots for arm, overrides in few_shot.arms.items()
    ]


def check_shots(config: ExperimentConfig, few_shot: FewShotConfig) -> None:
    """Loads the data at the largest K once: K larger than a class is an error before any training."""
    from peftjax.train.runner import load_task

    load_task(apply_overrides(config, [f"data.shots_per_class={max(few_shot.shots)}"]))


def summarise(rows: list[dict[str, Any]], few_shot: FewShotConfig) -> list[dict[str, Any]]:
    """``{arm, shots, mean, std, runs}`` per arm and K, in the section's order."""
    summary = []
    for arm in few_shot.arms:
        for k in few_shot.shots:
            values = [row[few_shot.metric] for row in rows if row["arm"] == arm and row["shots"] == k]
            if values:
                mean, std = mean_and_std(values)
                summary.append({"arm": arm, "shots": k, "mean": mean, "std": std, "runs": len(values)})
    return summary


def table(summary: list[dict[str, Any]], metric: str) -> str:
    """A markdown table: one row per K, one column per arm, ``mean ± std``."""
    arms = list(dict.fromkeys(row["arm"] for row in summary))
    shots = sorted({row["shots"] for row in summary})
    cell = {(row["arm"], row["shots"]): row for row in summary}
    lines = [f"| K per class | {' | '.join(arms)} |", "| ---: |" + " ---: |" * len(arms)]
    for k in shots:
        values = [f"{cell[arm, k]['mean']:.4f} ± {cell[arm, k]['std']:.4f}" if (arm, k) in cell else "" for arm in arms]
        lines.append(f"| {k} | {' | '.join(values)} |")
    return "\n".join(lines) + f"\n\n{metric}, mean ± sample std over seeds."


def plot(summary: list[dict[str, Any]], metric: str, path: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for arm in dict.fromkeys(row["arm"] for row in summary):
        points = [row for row in summary if row["arm"] == arm]
        axes.errorbar([p["shots"] for p in points], [p["mean"] for p in points], yerr=[p["std"] for p in points],
                      marker="o", capsize=3, label=arm)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("labelled examples per class (K)")
    axes.set_ylabel(metric)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_few_shot(config: ExperimentConfig, few_shot: FewShotConfig, *, keep: bool = False,
                 log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Trains every cell not yet done, writes ``few_shot.json``, ``few_shot.md`` and
    ``few_shot.png`` in the config's output folder and returns the JSON payload."""
    import json

    out = pathlib.Path(config.output_dir)
    check_shots(config, few_shot)
    rows = run_cells(config, cells(few_shot), out, keep=keep, compile_cache=out / "compile_cache", log=log)
    missing = sorted({few_shot.metric} - set(rows[0])) if rows else []
    if missing:
        raise ConfigError(f"the runs report no {missing[0]!r}; metrics: {sorted(rows[0])}", f"{SECTION}.metric")
    summary = summarise(rows, few_shot)
    payload = {"config": config.to_dict(), "few_shot": few_shot.to_dict(), "rows": rows, "summary": summary}
    (out / "few_shot.json").write_text(json.dumps(payload, indent=2))
    (out / "few_shot.md").write_text(table(summary, few_shot.metric) + "\n")
    plot(summary, few_shot.metric, out / "few_shot.png", f"{config.name}: {few_shot.metric} over K")
    return payload
