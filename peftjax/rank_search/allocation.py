"""Per-module ranks from a pilot run: a total rank budget allocated by the energy of each
module's Delta W spectrum.

A pilot trains LoRA at a high rank P; each adapted module m ends with singular values
sigma_m,1 >= ... >= sigma_m,P of its update Delta W_m. Keeping the top r_m directions of
module m keeps the fraction

    e_m(r_m) = sum_{i <= r_m} sigma_m,i^2 / sum_i sigma_m,i^2

of its energy. ``allocate_ranks`` chooses ranks r_m >= 1 with sum_m r_m = budget that
maximise sum_m e_m(r_m): every module starts at rank 1, then the remaining budget goes
one direction at a time to the module whose next direction holds the largest energy
fraction. As each e_m is concave (its increments sigma_m,i^2 fall with i), this greedy
choice is optimal. Energy is measured per module, so a module whose whole update is
small still gets the ranks its own spectrum needs; ties go to the module listed first.
A module's rank never exceeds the pilot's P (nor the directions its spectrum has).
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Mapping, Sequence

import numpy as np

from peftjax.errors import PeftError


def energy_fractions(singular_values: Sequence[float]) -> np.ndarray:
    """sigma_i^2 / sum_j sigma_j^2 for one module's spectrum (zeros for an all-zero one)."""
    energy = np.square(np.asarray(singular_values, np.float64))
    total = energy.sum()
    return energy / total if total > 0 else np.zeros_like(energy)


def allocate_ranks(spectra: Mapping[str, Sequence[float]], budget: int) -> dict[str, int]:
    """``{module: rank}`` summing to exactly ``budget`` (see the module docstring).

    Raises ``PeftError`` for a budget below one rank per module or above the directions
    the spectra have."""
    if not spectra:
        raise PeftError("no module spectra to allocate ranks over")
    modules = list(spectra)
    fractions = {m: energy_fractions(sorted(spectra[m], reverse=True)) for m in modules}
    available = sum(len(f) for f in fractions.values())
    if not isinstance(budget, (int, np.integer)) or budget < len(modules):
        raise PeftError(
            f"a rank budget of {budget} is below one rank for each of the {len(modules)} modules; raise the budget "
            f"(pilot.mean_rank) to at least 1 per module"
        )
    if budget > available:
        raise PeftError(f"a rank budget of {budget} exceeds the {available} directions the pilot's spectra hold; "
                        "lower the budget or train the pilot at a higher rank")
    ranks = dict.fromkeys(modules, 1)
    # Max-heap of each module's next direction's energy; the module's position breaks ties.
    heap = [(-fractions[m][1], i, m) for i, m in enumerate(modules) if len(fractions[m]) > 1]
    heapq.heapify(heap)
    for _ in range(budget - len(modules)):
        _, i, m = heapq.heappop(heap)
        ranks[m] += 1
        if ranks[m] < len(fractions[m]):
            heapq.heappush(heap, (-fractions[m][ranks[m]], i, m))
    return ranks


def captured_energy(spectra: Mapping[str, Sequence[float]], ranks: Mapping[str, int]) -> float:
    """Mean over modules of the energy fraction their ranks keep."""
    kept = [energy_fractions(sorted(spectra[m], reverse=True))[: ranks[m]].sum() for m in spectra]
    return float(np.mean(kept))


def rank_pattern(ranks: Mapping[str, int]) -> dict[str, int]:
    """``ranks`` as a ``LoraConfig.rank_pattern``: one exact-path key per module."""
    return {re.escape(module): int(rank) for module, rank in ranks.items()}
