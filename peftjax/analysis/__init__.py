"""Analyses of trained adapters: spectra and effective rank of LoRA updates,
subspace similarity between adapters (Hu et al. 2021, section 7.2), Pareto fronts."""

from peftjax.analysis.lowrank import (
    delta_input_subspace,
    delta_singular_values,
    effective_rank,
    energy_fractions,
    input_subspace,
    pareto_front,
    random_similarity,
    similarity_grid,
    subspace_similarity,
)

__all__ = [
    "delta_input_subspace",
    "delta_singular_values",
    "effective_rank",
    "energy_fractions",
    "input_subspace",
    "pareto_front",
    "random_similarity",
    "similarity_grid",
    "subspace_similarity",
]
