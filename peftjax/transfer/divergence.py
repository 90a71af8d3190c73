"""How far apart two samples of features are, and how much more likely a point is under one.

* :func:`gaussian_mmd2`: the squared maximum mean discrepancy with a sum of
  Gaussian kernels (the multi-kernel MMD of Long et al. 2015, "Learning
  Transferable Features with Deep Adaptation Networks", with equal kernel
  weights), differentiable, for a loss term or a report.
* :func:`proxy_a_distance`: Ben-David et al.'s (2007) proxy for the
  A-distance, ``2 (1 - 2 err)`` where ``err`` is the held-out error of a
  linear classifier told to separate the two samples: 0 when it cannot, 2
  when it always can.
* :func:`density_ratios`: ``p_target(x) / p_source(x)`` at source points from a
  classifier of the domains (Bickel et al. 2007): by Bayes,
  ``p_T(x) / p_S(x) = P(T|x) / P(S|x) * n_S / n_T``.

The classifiers are scikit-learn's L2-regularised logistic regression on
standardised features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from peftjax.errors import PeftError

# Kernel widths, as multiples of the sample's mean squared distance: the
# five-kernel family that deep domain-adaptation code commonly uses for DAN.
MMD_SCALES = (0.125, 0.25, 0.5, 1.0, 2.0)


def gaussian_mmd2(x_nd: jax.Array, y_md: jax.Array, *, scales: tuple[float, ...] = MMD_SCALES,
                  bandwidth: jax.Array | float | None = None) -> jax.Array:
    """Squared MMD between the rows of ``x`` and of ``y`` (the biased V-statistic,
    so exactly 0 for identical samples), with the kernel
    ``k(a, b) = mean_s exp(-|a - b|^2 / (2 s h))``.

    ``h`` is ``bandwidth``, or by default the mean squared distance between
    all pairs of the pooled rows, with no gradient through it (the kernel
    widths follow the features' scale without being a thing to optimise).
    Computed in the inputs' precision promoted to float32 at least.
    """
    z = jnp.concatenate([x_nd, y_md]).astype(jnp.promote_types(x_nd.dtype, jnp.float32))
    squared = jnp.sum(z * z, axis=1)
    distances = jnp.maximum(squared[:, None] + squared[None, :] - 2.0 * z @ z.T, 0.0)
    if bandwidth is None:
        bandwidth = jax.lax.stop_gradient(distances.sum() / (z.shape[0] * (z.shape[0] - 1)))
    bandwidth = jnp.maximum(bandwidth, jnp.finfo(z.dtype).tiny)
    kernel = sum(jnp.exp(-distances / (2.0 * s * bandwidth)) for s in scales) / len(scales)
    n = x_nd.shape[0]
    return kernel[:n, :n].mean() + kernel[n:, n:].mean() - 2.0 * kernel[:n, n:].mean()


def _domain_classifier(seed: int, strength: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=strength, max_iter=2000, random_state=seed))


def _two_samples(source: np.ndarray, target: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise PeftError(f"{what} takes two (N, D) feature arrays of one width, got {source.shape} and {target.shape}")
    if min(len(source), len(target)) < 10:
        raise PeftError(f"{what} needs at least 10 examples on each side, got {len(source)} and {len(target)}")
    return source, target


def proxy_a_distance(source: np.ndarray, target: np.ndarray, *, seed: int = 0, folds: int = 5,
                     strength: float = 1.0) -> dict[str, float]:
    """``{"proxy_a_distance", "domain_error", "examples"}``: a logistic regression
    separates equal-sized samples of the two (the larger one subsampled by
    ``seed``); ``domain_error`` is its ``folds``-fold cross-validated error.
    Near 0 (it can be slightly negative by chance) for samples of one
    distribution; up to 2."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    source, target = _two_samples(source, target, "proxy_a_distance")
    rng = np.random.default_rng(seed)
    size = min(len(source), len(target))
    source = source[np.sort(rng.choice(len(source), size, replace=False))]
    target = target[np.sort(rng.choice(len(target), size, replace=False))]
    features = np.concatenate([source, target])
    domains = np.repeat([0, 1], size)
    splits = StratifiedKFold(folds, shuffle=True, random_state=seed)
    accuracy = cross_val_score(_domain_classifier(seed, strength), features, domains, cv=splits).mean()
    error = 1.0 - float(accuracy)
    return {"proxy_a_distance": 2.0 * (1.0 - 2.0 * error), "domain_error": error, "examples": int(size)}


def density_ratios(source: np.ndarray, target: np.ndarray, *, clip: float | None = None, seed: int = 0,
                   strength: float = 1.0) -> np.ndarray:
    """``p_target(x) / p_source(x)`` at each source row, from a logistic regression
    of the domains fitted on both samples, clipped at ``clip`` when given."""
    source, target = _two_samples(source, target, "density_ratios")
    classifier = _domain_classifier(seed, strength)
    classifier.fit(np.concatenate([source, target]), np.repeat([0, 1], [len(source), len(target)]))
    log_odds = classifier.decision_function(source)  # log P(T|x) / P(S|x)
    ratios = np.exp(log_odds) * len(source) / len(target)
    return np.minimum(ratios, clip) if clip is not None else ratios
