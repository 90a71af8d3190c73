"""What a learned low-rank update looks like: spectra, effective rank, subspaces, Pareto fronts.

All functions take plain numpy arrays (LoRA factors in peftjax's layout: A is
(*input axes, r), B is (r, *output axes), so the kernel update is s * A @ B
and the torch-layout update is its transpose, s * B^T A^T) and compute in
float64: the matrices are small.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def as_matrix_factors(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A as (d_in, r) and B as (r, d_out) in float64, whatever the kernel's axes."""
    rank = a.shape[-1]
    if b.shape[0] != rank:
        raise ValueError(f"A's last axis ({a.shape}) and B's first ({b.shape}) must both be the rank")
    return a.reshape(-1, rank).astype(np.float64), b.reshape(rank, -1).astype(np.float64)


def delta_singular_values(a: np.ndarray, b: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Singular values of Delta W = s * A @ B, largest first (r of them).

    Through the factors, never the d_in x d_out product: with A = Q_a R_a and
    B^T = Q_b R_b (thin QR), s A B = Q_a (s R_a R_b^T) Q_b^T, and the orthonormal
    Q's leave the r x r core's singular values unchanged.
    """
    a, b = as_matrix_factors(a, b)
    _, r_a = np.linalg.qr(a)
    _, r_b = np.linalg.qr(b.T)
    return np.linalg.svd(scale * r_a @ r_b.T, compute_uv=False)


def energy_fractions(singular_values: np.ndarray) -> np.ndarray:
    """Cumulative share of sum(sigma^2) held by the top 1, 2, ... values."""
    energy = np.square(np.asarray(singular_values, np.float64))
    total = energy.sum()
    if total == 0:
        return np.ones_like(energy)
    return np.cumsum(energy) / total


def effective_rank(singular_values: np.ndarray, energy: float = 0.9) -> int:
    """The fewest top singular values holding at least ``energy`` of sum(sigma^2)
    (0 for the zero matrix)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    values = np.asarray(singular_values, np.float64)
    if not values.size or not np.any(values):
        return 0
    fractions = energy_fractions(np.sort(values)[::-1])
    # A small tolerance so that an exact 90% share (e.g. sigma^2 = 9, 1) counts as reached.
    return int(np.searchsorted(fractions, energy - 1e-12) + 1)


def input_subspace(a: np.ndarray) -> np.ndarray:
    """Orthonormal basis of A's column space in input space, strongest direction first.

    In Hu et al. 2021 (section 7.2), A is (r, d) and this is "the right-singular
    unitary matrix" of A; peftjax stores A transposed, (d, r), so these are its
    left-singular vectors.
    """
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    u, _, _ = np.linalg.svd(a, full_matrices=False)
    return u


def subspace_similarity(u_i: np.ndarray, u_j: np.ndarray, top_i: int, top_j: int) -> float:
    """phi = ||U_i[:, :i']^T U_j[:, :j']||_F^2 / min(i', j'), in [0, 1].

    1 when the smaller subspace lies inside the larger one, 0 when they are
    orthogonal; random subspaces of R^d give about max(i', j') / d. ``u_i`` and
    ``u_j`` are orthonormal bases, strongest first (``input_subspace``).
    """
    if not (1 <= top_i <= u_i.shape[1] and 1 <= top_j <= u_j.shape[1]):
        raise ValueError(f"top_i={top_i}, top_j={top_j} must be within the bases' sizes {u_i.shape[1]}, {u_j.shape[1]}")
    overlap = u_i[:, :top_i].T @ u_j[:, :top_j]
    return float(np.sum(np.square(overlap)) / min(top_i, top_j))


def similarity_grid(u_i: np.ndarray, u_j: np.ndarray) -> np.ndarray:
    """phi(i', j') for every i' <= r_i, j' <= r_j (the paper's Figure 3 grid), from
    orthonormal bases strongest first (``input_subspace(A)`` gives the paper's phi)."""
    squared = np.square(u_i.T @ u_j)  # (r_i, r_j)
    cumulative = np.cumsum(np.cumsum(squared, axis=0), axis=1)
    sizes = np.minimum.outer(np.arange(1, u_i.shape[1] + 1), np.arange(1, u_j.shape[1] + 1))
    return cumulative / sizes


def random_similarity(top_i: int, top_j: int, dim: int) -> float:
    """Expected phi of two random subspaces of R^dim: max(i', j') / dim."""
    return max(top_i, top_j) / dim


def pareto_front(costs: Sequence[float], values: Sequence[float], *, higher_is_better: bool = True) -> list[int]:
    """Indices of the points no other point beats: none has a cost <= and a
    value >= (<= for lower-is-better) with one of the two strict. Sorted by cost."""
    costs = np.asarray(costs, np.float64)
    values = np.asarray(values, np.float64) * (1 if higher_is_better else -1)
    front = []
    for i in range(len(costs)):
        dominated = np.any(
            (costs <= costs[i]) & (values >= values[i]) & ((costs < costs[i]) | (values > values[i]))
        )
        if not dominated and np.isfinite(values[i]):
            front.append(i)
    return sorted(front, key=lambda i: (costs[i], -values[i]))


def delta_input_subspace(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Orthonormal input-space directions of Delta W = A @ B, strongest first:
    the directions the learned update actually reads (A's span weighted by B).
    Computed through the factors as in ``delta_singular_values``."""
    a, b = as_matrix_factors(a, b)
    q_a, r_a = np.linalg.qr(a)
    _, r_b = np.linalg.qr(b.T)
    u_core, _, _ = np.linalg.svd(r_a @ r_b.T)
    return q_a @ u_core
