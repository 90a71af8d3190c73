"""Many short runs of one experiment config, each with its own overrides: the
engine under ``peftjax few-shot``, ``peftjax negative-transfer`` and the
domain-adaptation experiment.

A cell is a key (``{"arm": "lora", "shots": 16, "seed": 0}``) and dotted
overrides of the base config. Cells run one after another in this process,
each a whole ``peftjax train`` run in a folder of its own under
``OUT/runs/``, so a cell's ``config.yaml``, ``metrics.jsonl`` and
``result.json`` are there to inspect. A cell whose ``cell.json`` exists was
finished by an earlier invocation and is read back, so an interrupted grid
goes on where it stopped. Programs that several cells compile alike (the
same method and batch shapes, another seed or K) are compiled once when a
persistent compilation cache is set (``compile_cache``, unless the process
has one already).

After a cell's run its final model can be evaluated on the test split of
other data (``evaluate_on``: a domain-adaptation run trains on the source
and is scored on the target); then, unless ``keep``, its checkpoints and
adapter files are deleted (a grid of full fine-tuning runs would fill a disk).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from peftjax.config import DataConfig, ExperimentConfig, apply_overrides
from peftjax.errors import PeftError

CELL_FILE = "cell.json"


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a grid: what identifies it, and how its config differs from the base."""

    key: Mapping[str, Any]
    overrides: Mapping[str, Any]

    @property
    def folder(self) -> str:
        return "-".join(f"{name}{value}" for name, value in self.key.items())

    def config(self, base: ExperimentConfig, out: pathlib.Path) -> ExperimentConfig:
        settings = {**self.overrides, "output_dir": str(out / "runs" / self.folder)}
        try:
            return apply_overrides(base, [f"{key}={json.dumps(value)}" for key, value in settings.items()])
        except PeftError as error:
            raise PeftError(f"cell {dict(self.key)}: {error}") from None


def use_compile_cache(folder: str | pathlib.Path) -> None:
    """Keep every compiled program in ``folder`` so that a later run compiling the same one loads it,
    unless the process already has a persistent cache (``JAX_COMPILATION_CACHE_DIR``)."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    pathlib.Path(folder).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def evaluate_adapter(config: ExperimentConfig, adapter: pathlib.Path, data: DataConfig,
                     split: str = "test") -> dict[str, float]:
    """Accuracy and loss on ``split`` of ``data`` of the model ``config`` builds with the saved ``adapter``."""
    from peftjax.core.adapter_io import load_adapter
    from peftjax.data import load_data
    from peftjax.train.runner import build_model, load_task
    from peftjax.train.sharding import make_mesh
    from peftjax.train.tasks import evaluate, loss_and_stats

    task, tokenizer = load_task(config)
    other = load_data(data, tokenizer)
    model = load_adapter(build_model(config, task.num_labels), adapter)
    loader = other.eval_loader(config.train.eval_batch_size, split)
    return evaluate(model, loader, loss_and_stats(config.data.task), make_mesh())


def run_cells(
    base: ExperimentConfig,
    cells: Sequence[Cell],
    out: str | pathlib.Path,
    *,
    evaluate_on: Mapping[str, DataConfig] | None = None,
    keep: bool = False,
    compile_cache: str | pathlib.Path | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> list[dict[str, Any]]:
    """Runs every cell not yet finished; returns one row per cell: its key, the
    run's final metrics, ``<name>_accuracy``/``_loss`` for each ``evaluate_on``
    entry, trainable parameters, steps and wall time."""
    from peftjax.train.runner import run

    out = pathlib.Path(out)
    if compile_cache is not None:
        use_compile_cache(compile_cache)
    configs = [cell.config(base, out) for cell in cells]  # every cell's config is checked before the first run
    rows = []
    for index, (cell, config) in enumerate(zip(cells, configs)):
        folder = pathlib.Path(config.output_dir)
        if (folder / CELL_FILE).exists():
            rows.append(json.loads((folder / CELL_FILE).read_text()))
            continue
        if folder.exists():  # a cell interrupted before it finished starts again
            shutil.rmtree(folder)
        started = time.perf_counter()
        result = run(config, progress=False)
        row = {**cell.key, **result["metrics"], "trainable": result["params"]["trainable"],
               "steps": result["steps"], **({"stopped": result["stopped"]} if "stopped" in result else {})}
        for name, data in (evaluate_on or {}).items():
            scores = evaluate_adapter(config, folder / "adapter", data)
            row.update({f"{name}_{metric}": value for metric, value in scores.items()})
        row["wall_time_s"] = time.perf_counter() - started
        if not keep:
            for name in ("checkpoints", "adapter", "best", "tensorboard"):
                shutil.rmtree(folder / name, ignore_errors=True)
        (folder / CELL_FILE).write_text(json.dumps(row, indent=2))
        rows.append(row)
        scores = ", ".join(f"{k}={v:.4f}" for k, v in row.items() if k.endswith("accuracy"))
        log(f"[{index + 1}/{len(cells)}] {dict(cell.key)}: {scores} ({row['wall_time_s']:.0f} s)")
    return rows


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
