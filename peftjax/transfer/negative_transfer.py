"""Does pretraining help? ``peftjax negative-transfer CONFIG --seeds 0,1,2,3,4``.

The same config, the same budget, trained from the pretrained checkpoint and
from a random initialisation of its architecture (``model.init: random``),
once per seed; both runs of a seed share the data order and the new
parameters' initialisation. The transfer gain is ``pretrained - random`` of
the metric, paired by seed. Negative transfer (Rosenstein et al. 2005; Wang
et al. 2019, "Characterizing and Avoiding Negative Transfer") is flagged when
the gain is below zero beyond the noise: the upper end of its two-sided 95%
t-interval over seeds is below 0. A gain whose interval holds 0 is reported
as not distinguishable from none.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from peftjax.config import ConfigError, ExperimentConfig
from peftjax.errors import PeftError
from peftjax.transfer.grid import Cell, mean_and_std, run_cells

INITS = ("pretrained", "random")


def transfer_gain(pretrained: Sequence[float], random: Sequence[float], *, confidence: float = 0.95) -> dict[str, Any]:
    """The paired gain ``pretrained[i] - random[i]``: its mean, sample std, the
    t-interval of its mean, and the verdict (``negative transfer``, ``positive
    transfer`` or ``no clear difference``)."""
    from scipy import stats

    if len(pretrained) != len(random) or len(pretrained) < 2:
        raise PeftError(f"the gain needs the same number (>= 2) of pretrained and random runs, "
                        f"got {len(pretrained)} and {len(random)}")
    gains = np.asarray(pretrained, np.float64) - np.asarray(random, np.float64)
    mean, std = mean_and_std(gains)
    half = float(stats.t.ppf(0.5 + confidence / 2, len(gains) - 1)) * std / np.sqrt(len(gains))
    low, high = mean - half, mean + half
    verdict = "negative transfer" if high < 0 else "positive transfer" if low > 0 else "no clear difference"
    return {"gains": gains.tolist(), "mean": mean, "std": std, "interval": [low, high], "confidence": confidence,
            "negative_transfer": bool(high < 0), "verdict": verdict}


def report(result: dict[str, Any], metric: str) -> str:
    gain = result["gain"]
    lines = ["| seed | pretrained | random | gain |", "| ---: | ---: | ---: | ---: |"]
    for seed, p, r, g in zip(result["seeds"], result["pretrained"], result["random"], gain["gains"]):
        lines.append(f"| {seed} | {p:.4f} | {r:.4f} | {g:+.4f} |")
    low, high = gain["interval"]
    lines.append("")
    lines.append(f"{metric}: transfer gain {gain['mean']:+.4f} ± {gain['std']:.4f} (mean ± sample std over "
                 f"{len(gain['gains'])} seeds), {gain['confidence']:.0%} interval [{low:+.4f}, {high:+.4f}]: "
                 f"**{gain['verdict']}**.")
    return "\n".join(lines)


def run_negative_transfer(config: ExperimentConfig, seeds: Sequence[int], *, metric: str = "test_accuracy",
                          keep: bool = False, log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Trains both inits for every seed (cells already done are read back), writes
    ``negative_transfer.json`` and ``.md`` in the config's output folder."""
    if config.model.init != "pretrained":
        raise ConfigError("the check sets model.init itself; leave it pretrained", "model.init")
    if config.model.checkpoint_dir() is None:
        raise ConfigError(f"model {config.model.name!r} has no pretrained checkpoint to compare with", "model.name")
    out = pathlib.Path(config.output_dir)
    cells = [Cell({"init": init, "seed": seed}, {"model.init": init, "train.seed": seed})
             for init in INITS for seed in seeds]
    rows = run_cells(config, cells, out, keep=keep, compile_cache=out / "compile_cache", log=log)
    if metric not in rows[0]:
        raise ConfigError(f"the runs report no {metric!r}; metrics: {sorted(rows[0])}", "--metric")
    by_init = {init: [row[metric] for row in rows if row["init"] == init] for init in INITS}
    result = {"config": config.to_dict(), "metric": metric, "seeds": list(seeds), **by_init, "rows": rows,
              "gain": transfer_gain(by_init["pretrained"], by_init["random"])}
    (out / "negative_transfer.json").write_text(json.dumps(result, indent=2))
    (out / "negative_transfer.md").write_text(report(result, metric) + "\n")
    return result
