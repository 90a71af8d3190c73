"""Per-module ranks from a pilot's spectra: hand-built spectra, expected ranks, the budget exactly."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from peftjax.errors import PeftError
from peftjax.rank_search.allocation import allocate_ranks, captured_energy, energy_fractions, rank_pattern


def test_hand_built_spectra_give_the_expected_ranks():
    spectra = {
        "flat": [1.0, 1.0, 1.0, 1.0],  # energy spread evenly: 0.25 per direction
        "steep": [10.0, 1.0, 0.1, 0.01],  # one direction holds 99%
        "two": [3.0, 3.0, 0.3, 0.0],  # two directions of 0.4975 each
    }
    # Each starts at 1; the remaining 3 go to the largest next fractions: two's 0.4975, flat's 0.25, flat's 0.25.
    assert allocate_ranks(spectra, 6) == {"flat": 3, "steep": 1, "two": 2}
    assert allocate_ranks(spectra, 3) == {"flat": 1, "steep": 1, "two": 1}
    # Scale-free: multiplying a module's update does not change its share.
    scaled = {**spectra, "steep": [100 * s for s in spectra["steep"]]}
    assert allocate_ranks(scaled, 6) == allocate_ranks(spectra, 6)
    # Ties go to the module listed first.
    assert allocate_ranks({"a": [1.0, 1.0], "b": [1.0, 1.0]}, 3) == {"a": 2, "b": 1}


def test_the_allocation_is_optimal_and_spends_the_budget_exactly():
    rng = np.random.default_rng(0)
    spectra = {f"m{i}": np.sort(rng.exponential(size=5))[::-1] for i in range(4)}
    for budget in range(4, 21):
        ranks = allocate_ranks(spectra, budget)
        assert sum(ranks.values()) == budget and all(1 <= r <= 5 for r in ranks.values())
        best = max(
            (dict(zip(spectra, choice)) for choice in itertools.product(range(1, 6), repeat=4) if sum(choice) == budget),
            key=lambda r: captured_energy(spectra, r),
        )
        assert captured_energy(spectra, ranks) == pytest.approx(captured_energy(spectra, best), abs=1e-12)


def test_energy_fractions_and_rank_pattern():
    np.testing.assert_allclose(energy_fractions([3.0, 4.0]), [9 / 25, 16 / 25])
    assert rank_pattern({"bert.encoder.layer.0.attention.self.query": 3}) == {
        r"bert\.encoder\.layer\.0\.attention\.self\.query": 3}


def test_a_budget_below_one_rank_per_module_or_above_the_spectra_is_refused():
    spectra = {"a": [2.0, 1.0], "b": [1.0, 0.5], "c": [1.0]}
    with pytest.raises(PeftError, match="a rank budget of 2 is below one rank for each of the 3 modules"):
        allocate_ranks(spectra, 2)
    with pytest.raises(PeftError, match="exceeds the 5 directions"):
        allocate_ranks(spectra, 6)
