"""Spectra, effective rank, subspace similarity and Pareto fronts on matrices built by hand."""

from __future__ import annotations

import numpy as np
import pytest

from peftjax.analysis import (
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


def orthonormal(rows: int, cols: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(rows, cols)))
    return q


def factors_with_spectrum(sigmas, d_in=12, d_out=10, seed=0):
    """A (d_in, r), B (r, d_out) whose product has exactly the singular values ``sigmas``."""
    r = len(sigmas)
    u, v = orthonormal(d_in, r, seed), orthonormal(d_out, r, seed + 1)
    return u * np.asarray(sigmas), v.T  # A B = U diag(sigma) V^T


def test_singular_values_of_the_product_through_the_factors():
    a, b = factors_with_spectrum([5.0, 3.0, 0.5, 0.0])
    np.testing.assert_allclose(delta_singular_values(a, b, scale=2.0), [10.0, 6.0, 1.0, 0.0], atol=1e-12)
    dense = np.linalg.svd(2.0 * a @ b, compute_uv=False)[:4]
    np.testing.assert_allclose(delta_singular_values(a, b, 2.0), dense, atol=1e-12)


def test_einsum_shaped_factors_are_flattened_to_matrices():
    a, b = factors_with_spectrum([4.0, 1.0], d_in=12, d_out=10)
    a_heads, b_heads = a.reshape(3, 4, 2), b.reshape(2, 5, 2)  # (*in axes, r), (r, *out axes)
    np.testing.assert_allclose(delta_singular_values(a_heads, b_heads), [4.0, 1.0], atol=1e-12)


@pytest.mark.parametrize(
    ("sigmas", "rank90", "rank99"),
    [
        ([3.0, 1.0], 1, 2),  # energies 9, 1: exactly 90% in the top one
        ([1.0, 1.0, 1.0, 1.0], 4, 4),  # flat: every direction needed
        ([10.0, 0.0, 0.0], 1, 1),  # rank one padded with zeros
        ([2.0, 1.0, 1.0, 0.5], 3, 4),  # energies 4, 1, 1, 0.25 of 6.25: 80%, 96%, 100%
    ],
)
def test_effective_rank_from_known_energies(sigmas, rank90, rank99):
    assert effective_rank(np.array(sigmas), 0.9) == rank90
    assert effective_rank(np.array(sigmas), 0.99) == rank99


def test_effective_rank_of_an_update_with_known_rank():
    a, b = factors_with_spectrum([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # rank 3 stored at r = 6
    assert effective_rank(delta_singular_values(a, b), 0.99) == 3
    assert effective_rank(np.zeros(4)) == 0
    np.testing.assert_allclose(energy_fractions([3.0, 1.0]), [0.9, 1.0])


def test_subspace_similarity_is_one_for_the_same_subspace_and_zero_for_orthogonal_ones():
    basis = orthonormal(16, 8, seed=3)
    a = basis[:, :4] @ np.diag([4.0, 3.0, 2.0, 1.0]) @ orthonormal(4, 4, seed=4)  # spans basis[:, :4]
    a_same_span = basis[:, :4] @ orthonormal(4, 4, seed=5)  # another basis of that span
    a_orthogonal = basis[:, 4:8]
    u, u_same, u_orth = input_subspace(a), input_subspace(a_same_span), input_subspace(a_orthogonal)
    assert subspace_similarity(u, u_same, 4, 4) == pytest.approx(1.0)
    assert subspace_similarity(u, u_orth, 4, 4) == pytest.approx(0.0, abs=1e-12)
    # A subspace inside a larger one: phi normalises by the smaller size.
    assert subspace_similarity(input_subspace(basis[:, :2]), input_subspace(basis), 2, 8) == pytest.approx(1.0)
    # Half of a 2-d subspace shared: phi = 1/2.
    half = input_subspace(np.stack([basis[:, 0], basis[:, 5]], axis=1))
    assert subspace_similarity(half, input_subspace(basis[:, :2]), 2, 2) == pytest.approx(0.5)


def test_similarity_grid_matches_pairwise_phi_and_random_baseline():
    u_i, u_j = input_subspace(np.random.default_rng(0).normal(size=(64, 4))), orthonormal(64, 8, seed=1)
    grid = similarity_grid(u_i, u_j)
    assert grid.shape == (4, 8)
    for i, j in [(1, 1), (2, 5), (4, 8)]:
        assert grid[i - 1, j - 1] == pytest.approx(subspace_similarity(u_i, u_j, i, j))
    assert random_similarity(4, 8, 64) == 8 / 64
    # Random subspaces of R^d land near the random expectation (many draws, loose bound).
    draws = [subspace_similarity(orthonormal(64, 4, s), orthonormal(64, 8, s + 100), 4, 8) for s in range(200)]
    assert np.mean(draws) == pytest.approx(random_similarity(4, 8, 64), rel=0.15)


def test_delta_subspace_orders_directions_by_what_b_amplifies():
    basis = orthonormal(10, 3, seed=7)
    a = basis  # three input directions
    b = np.diag([0.1, 5.0, 1.0]) @ orthonormal(6, 3, seed=8).T  # B uses the second most
    u = delta_input_subspace(a, b)
    assert abs(u[:, 0] @ basis[:, 1]) == pytest.approx(1.0)
    assert abs(u[:, 1] @ basis[:, 2]) == pytest.approx(1.0)


def test_pareto_front():
    costs = [10, 20, 30, 40, 25]
    values = [0.80, 0.85, 0.84, 0.90, 0.85]  # 30 is beaten by 20; 25 ties 20's value at a higher cost
    assert pareto_front(costs, values) == [0, 1, 3]
    assert pareto_front(costs, [1 - v for v in values], higher_is_better=False) == [0, 1, 3]
    assert pareto_front([1, 2], [float("nan"), 0.5]) == [1]
