"""The common ground of the domain-adaptation strategies (``dann``, ``mmd``,
``pseudo_label``, ``importance_weighting``): the experiment's own data is the
labelled source domain and ``target`` names the target domain's data, read
as a stream named ``target`` that the strategies share.

The target's labels are hidden from training: the loss terms use its
features only, and pseudo-labelling replaces its labels (and gives weight 0
to what it has not labelled) before the first step. The loader needs a label
column, so an unlabelled file carries any constant one; when the labels are
real, the strategies log how well the model and its pseudo-labels match them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from peftjax.config import DataConfig
from peftjax.errors import PeftError
from peftjax.schema import require
from peftjax.strategies.base import Strategy
from peftjax.train.session import MAIN, Run

# The stream the target domain's examples come in, shared by every strategy that names it.
TARGET = "target"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetDomainStrategy(Strategy):
    """Base of a strategy that adapts from the experiment's data to ``target``."""

    target: DataConfig | None = None

    def _validate(self) -> None:
        require(self.target is not None, "target",
                f"{self.strategy} trains on the labelled source (the experiment's data) and an unlabelled "
                "target stream; give target: {source: ..., train_split: ...}")
        require(self.target.task in ("classification", "image_classification"), "target.task",
                f"domain adaptation here is for classification (text or images), got {self.target.task}")

    def streams(self) -> Mapping[str, DataConfig]:
        return {TARGET: self.target}

    def on_start(self, run: Run) -> None:
        check_label_sets(run.streams[MAIN].loaded.labels, run.streams[TARGET].loaded.labels, self.strategy)


def check_label_sets(source: np.ndarray, target: np.ndarray, who: str) -> None:
    """Raises when the target's labels are classes the source does not have:
    another task, not another domain of this one."""
    extra = sorted(set(np.unique(target).tolist()) - set(np.unique(source).tolist()))
    if extra:
        raise PeftError(f"{who}: the target stream has labels {extra} that the source data lacks "
                        f"(source classes {sorted(np.unique(source).tolist())}); domain adaptation needs one label "
                        "set: the same task in another domain. Check strategies' target.label_column and data")
