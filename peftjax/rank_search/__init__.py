"""Rank search: LoRA at many ranks and target sets, trained batched or one at a time.

* ``config``: the ``sweep:`` section (``SweepConfig``), named target sets per model
  family, and the checks that name the key at fault;
* ``batched``: K ranks in one jitted program over one shared base
  (``build_batched_state``, ``BatchedTrainStep``, ``MaskedLoraLinear``);
* ``sweep``: ``run_rank_search``, what ``peftjax rank-search`` runs;
* ``summary``: means over seeds, the Pareto front, spectra and subspace similarities;
* ``report``: ``report.md`` and plots from the results;
* ``dylora``, ``allocation``, ``searches``: DyLoRA (every rank from one run),
  AdaLoRA (``peftjax.methods.adalora``) and per-module ranks from a pilot's
  spectra, trained on the grid's data and budget;
* ``compare``: ``run_comparison``, the grid and those searches in one command;
* ``cost``: compilation time apart from step time, and XLA-counted FLOPs.
"""

from peftjax.rank_search.batched import (
    BatchedLoraState,
    BatchedTrainStep,
    MaskedLoraLinear,
    Member,
    build_batched_state,
    member_factors,
)
from peftjax.rank_search.compare import run_comparison
from peftjax.rank_search.config import SweepConfig, SweepError, TargetSet, load_rank_search
from peftjax.rank_search.dylora import DyLoraTrainStep, set_rank
from peftjax.rank_search.sweep import run_rank_search

__all__ = [
    "BatchedLoraState",
    "BatchedTrainStep",
    "DyLoraTrainStep",
    "MaskedLoraLinear",
    "Member",
    "SweepConfig",
    "SweepError",
    "TargetSet",
    "build_batched_state",
    "load_rank_search",
    "member_factors",
    "run_comparison",
    "run_rank_search",
    "set_rank",
]
