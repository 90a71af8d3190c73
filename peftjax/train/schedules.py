"""Learning-rate schedules that optax does not have."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def slanted_triangular(peak: float, total_steps: int, *, cut_frac: float = 0.1, ratio: float = 32.0) -> optax.Schedule:
    """ULMFiT's slanted triangular learning rate (Howard & Ruder 2018, eq. 3).

    With T = ``total_steps`` and cut = floor(T * ``cut_frac``) (at least 1), the
    rate at step t (0-based) is ``peak * (1 + p * (ratio - 1)) / ratio`` where
    p = t / cut while t < cut, then 1 - (t - cut) / (cut * (1 / cut_frac - 1)):
    a short linear rise from ``peak / ratio`` to ``peak``, then a long linear
    fall back to ``peak / ratio`` at t = T.
    """
    cut = max(int(total_steps * cut_frac), 1)
    fall = cut * (1.0 / cut_frac - 1.0)

    def schedule(count):
        t = jnp.asarray(count, jnp.float32)
        p = jnp.where(t < cut, t / cut, 1.0 - (t - cut) / fall)
        return peak * (1.0 + p * (ratio - 1.0)) / ratio

    return schedule
