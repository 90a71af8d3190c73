"""A rank search's finished points, kept as they finish so that a killed sweep resumes.

``OUTPUT/points/`` holds, per finished point, its learned factors
(``NAME.npz``, primary mode only) and its row (``NAME.MODE.json``, written
last and atomically: a row on disk means the point is complete), plus
``sweep.json``, the config and sweep the points belong to. ``--resume``
reads the rows back and the sweep trains only the points without one; a
folder of another sweep's points is refused, and one without any starts
from scratch with a notice.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import warnings
from typing import Any

from peftjax.config import ExperimentConfig
from peftjax.errors import PeftWarning
from peftjax.rank_search.config import SweepConfig, SweepError
from peftjax.rank_search.summary import save_factors
from peftjax.train.output import config_differences

POINTS_DIR = "points"
PLAN_FILE = "sweep.json"


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


class SweepProgress:
    """The finished points of the sweep in ``out`` (see the module docstring)."""

    def __init__(self, out: pathlib.Path, config: ExperimentConfig, sweep: SweepConfig, *, resume: bool,
                 overwrite: bool, finished_results: bool) -> None:
        self.folder = out / POINTS_DIR
        plan = _as_json({"config": config.to_dict(), "sweep": sweep.to_dict()})
        plan_file = self.folder / PLAN_FILE
        held = plan_file.exists()
        if overwrite:
            shutil.rmtree(self.folder, ignore_errors=True)
        elif held and resume:
            saved = json.loads(plan_file.read_text())
            differences = (config_differences(saved.get("config", {}), plan["config"])
                           + config_differences(saved.get("sweep", {}), plan["sweep"], "sweep."))
            if differences:
                raise SweepError(f"{self.folder} holds the points of another rank search ({'; '.join(differences[:5])}); "
                                 "resume with the config that wrote them, or pass --overwrite", "output_dir")
        elif held or finished_results:
            raise SweepError(f"{out} already holds a rank search; pass --resume to continue it, --overwrite to "
                             "start afresh, or set output_dir=... to another folder", "output_dir")
        elif resume:
            warnings.warn(f"--resume: no rank search in {out} yet; starting from scratch", PeftWarning, stacklevel=3)
        self.folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(plan_file, plan)

    def finished(self, mode: str) -> dict[str, dict[str, Any]]:
        """``{point name: row}`` of the points of ``mode`` already trained."""
        suffix = f".{mode}.json"
        return {path.name.removesuffix(suffix): json.loads(path.read_text())
                for path in sorted(self.folder.glob(f"*{suffix}"))}

    def record(self, mode: str, name: str, row: dict[str, Any], factors=None) -> None:
        """Keeps a finished point: its factors (when given) first, its row last."""
        if factors is not None:
            save_factors(self.folder / f"{name}.npz", factors)
        _write_atomically(self.folder / f"{name}.{mode}.json", _as_json(row))


def _write_atomically(path: pathlib.Path, payload: Any) -> None:
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text(json.dumps(payload))
    os.replace(staging, path)
