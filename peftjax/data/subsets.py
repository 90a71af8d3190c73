"""Which rows of a file a split keeps: a seeded held-out test set, and K examples per class.

Both are pure functions of their seed, so a config names its split and its
few-shot sample exactly. K-shot samples are nested: with one seed, the 4 rows
of a class drawn for K=4 are among the 8 drawn for K=8, so a learning curve
over K adds examples rather than redrawing them.
"""

from __future__ import annotations

import numpy as np

from peftjax.data.errors import DataError


def holdout_rows(num_rows: int, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held_out)`` row indices, each in file order: ``count`` rows drawn
    without replacement by ``numpy.random.default_rng(seed)`` are held out."""
    if not 0 < count < num_rows:
        raise DataError(f"data.holdout_rows={count}: the file has {num_rows} rows; hold out between 1 and "
                        f"{num_rows - 1} so that both splits keep rows")
    order = np.random.default_rng(seed).permutation(num_rows)
    return np.sort(order[count:]), np.sort(order[:count])


def k_shot_rows(labels: np.ndarray, k: int, seed: int, *, names: tuple[str, ...] | None = None) -> np.ndarray:
    """Positions of ``k`` examples of every class in ``labels`` (class ids), in order.

    Each class's examples are shuffled by one ``numpy.random.default_rng(seed)``
    (classes in increasing order) and its first ``k`` kept, so the draw is
    deterministic, exact per class and nested in ``k``. A class with fewer than
    ``k`` examples is an error naming it.
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    short = [(int(c), int(n)) for c, n in zip(classes, counts) if n < k]
    if short:
        described = ", ".join(f"class {names[c]!r} has {n}" if names else f"class {c} has {n}" for c, n in short)
        raise DataError(f"data.shots_per_class={k} is more than a class has ({described} training rows); "
                        f"lower shots_per_class to at most {int(counts.min())}")
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:k] for c in classes]
    return np.sort(np.concatenate(chosen))
