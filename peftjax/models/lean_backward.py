"""The exact GELU, LayerNorm/RMSNorm and softmax attention, with backward passes that
keep only what they need.

Differentiated by JAX as written, each of these keeps intermediates of its forward
pass alive until the backward pass: the exact GELU its ``erfc`` and ``exp`` terms
beside its input, a norm its centred input and its normalised output, attention its
float32 scores and the mask beside the probabilities. On MiniLM (batch 32 x 64) that
was 261 MB of XLA's 549 MB of temporaries (``benchmarks/results/README.md``, (e)).
Here each is a ``jax.custom_vjp`` whose residuals are the least its derivative can be
computed from without a matrix product:

* GELU: its input; the derivative ``Phi(x) + x phi(x)`` is recomputed, elementwise
  (with erf, as PyTorch's GELU backward computes it).
* LayerNorm and RMSNorm: the input and the per-row mean and reciprocal standard
  deviation; the normalised input is recomputed, elementwise.
* attention: the queries, keys, values, the mask and the float32 probabilities (a
  probability costs a matrix product to recompute, so it is kept).

The forward values are the same operations as flax's ``nnx.LayerNorm``/``nnx.RMSNorm``,
``jax.nn.gelu(approximate=False)`` and ``common.explicit_attention``; the gradients
are the same function, reassociated (tested against JAX's own differentiation within
float32 rounding, ``tests/models/test_lean_backward.py``).
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

def _recompute(residuals, cotangent):
    """The residuals and the output's cotangent, behind one barrier. Without it XLA
    merges what the backward pass recomputes from the residuals with the forward pass's
    identical expressions (the GELU's ``erfc``, the centred input), or computes it as
    soon as the residuals exist; either way it is alive from the forward pass on, as if
    saved. Behind the barrier, nothing recomputed can start before the cotangent has
    arrived."""
    return jax.lax.optimization_barrier((residuals, cotangent))


# --------------------------------------------------------------------------
# GELU, exact (erf) form.
# --------------------------------------------------------------------------


@jax.custom_vjp
def gelu(x: Array) -> Array:
    """``x Phi(x)``, the erf form of GELU, as ``jax.nn.gelu(x, approximate=False)``."""
    return jax.nn.gelu(x, approximate=False)


def _gelu_forward(x: Array) -> tuple[Array, Array]:
    return gelu(x), x


def _gelu_backward(x: Array, g: Array) -> tuple[Array]:
    x, g = _recompute(x, g)
    # Phi(x) by erf, as PyTorch's GELU backward computes it: XLA has erf as one
    # operation, and expands erfc into some sixty (the forward pass keeps erfc, bitwise
    # jax.nn.gelu's). For x << 0 the two differ by the rounding of 1 + erf, 6e-8.
    cdf = 0.5 * (1 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))
    pdf = jnp.exp(-0.5 * x * x) * np.asarray(1 / math.sqrt(2 * math.pi), x.dtype)
    return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_forward, _gelu_backward)


# --------------------------------------------------------------------------
# LayerNorm and RMSNorm over the last axis.
# --------------------------------------------------------------------------


def _statistics(x: Array, epsilon: float, centred: bool) -> tuple[Array, Array]:
    """Per-row mean (0 for RMSNorm) and 1/sqrt(var + eps), in at least float32, as flax
    computes them with ``use_fast_variance=False``: the two-pass variance."""
    x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = x.mean(-1, keepdims=True) if centred else jnp.zeros((*x.shape[:-1], 1), x.dtype)
    variance = jnp.square(x - mean).mean(-1, keepdims=True)
    return mean, jax.lax.rsqrt(variance + epsilon)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def normalize(x: Array, scale: Array, bias: Array | None, epsilon: float, centred: bool) -> Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis (LayerNorm), or
    ``x / sqrt(mean(x^2) + eps) * scale`` (RMSNorm: ``centred=False``, ``bias=None``).

    ``x``, ``scale`` and ``bias`` share the compute dtype; statistics and arithmetic are
    in at least float32 and the result is cast back, as in flax's ``_normalize``.
    """
    return _normalize(x, scale, bias, *_statistics(x, epsilon, centred))


def _normalize(x: Array, scale: Array, bias: Array | None, mean: Array, rstd: Array) -> Array:
    y = (x - mean) * (rstd * scale)
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


def _normalize_forward(x, scale, bias, epsilon, centred):
    mean, rstd = _statistics(x, epsilon, centred)
    return _normalize(x, scale, bias, mean, rstd), (x, mean, rstd, scale, bias)


def _normalize_backward(epsilon, centred, residuals, g):
    (x, mean, rstd, scale, bias), g = _recompute(residuals, g)
    dtype, g = g.dtype, g.astype(rstd.dtype)
    x_hat = (x - mean) * rstd
    rows = tuple(range(g.ndim - 1))
    d_scale = jnp.sum(g * x_hat, axis=rows).astype(scale.dtype)
    d_bias = None if bias is None else jnp.sum(g, axis=rows).astype(bias.dtype)
    # d_x = rstd (g s - x_hat mean(g s x_hat) - mean(g s)), written around g rstd s as
    # JAX's own derivative is: XLA keeps that product and reads it in the row means and
    # in d_x. With g s instead, XLA fuses each layer's d_x into the next layer's and
    # recomputes the residual stream's whole gradient chain in every fusion.
    g_m = g * (rstd * scale)
    d_x = g_m - x_hat * jnp.mean(g_m * x_hat, -1, keepdims=True)
    if centred:
        d_x = d_x - jnp.mean(g_m, -1, keepdims=True)
    return d_x.astype(dtype), d_scale, d_bias


normalize.defvjp(_normalize_forward, _normalize_backward)


def _last_axis(norm: nnx.LayerNorm | nnx.RMSNorm) -> bool:
    return all(axes in (-1, (-1,)) for axes in (norm.reduction_axes, norm.feature_axes))


class LayerNorm(nnx.LayerNorm):
    """``nnx.LayerNorm`` (same parameters, same values) over the last axis, differentiated
    by ``normalize``'s lean backward pass. Built with a scale and a bias and the two-pass
    variance, as every reference model's LayerNorm is."""

    def __call__(self, x: Array, *, mask: Array | None = None) -> Array:
        if mask is not None or self.use_fast_variance or not _last_axis(self) or not (self.scale and self.bias):
            return super().__call__(x, mask=mask)
        x, scale, bias = self.promote_dtype((x, self.scale[...], self.bias[...]), dtype=self.dtype)
        return normalize(x, scale, bias, self.epsilon, True)


class RMSNorm(nnx.RMSNorm):
    """``nnx.RMSNorm`` (same parameter, same values) over the last axis, differentiated by
    ``normalize``'s lean backward pass."""

    def __call__(self, x: Array, mask: Array | None = None) -> Array:
        if mask is not None or not _last_axis(self) or not self.scale:
            return super().__call__(x, mask=mask)
        x, scale = self.promote_dtype((x, self.scale[...]), dtype=self.dtype)
        return normalize(x, scale, None, self.epsilon, False)


# --------------------------------------------------------------------------
# Softmax attention over grouped key/value heads.
# --------------------------------------------------------------------------


def attention_probs(q_btmgh: Array, k_bsmh: Array, mask_bts: Array) -> Array:
    """Float32 softmax of the scaled scores (batch, m, g, t, s); masked keys get no
    weight, and a fully masked row a uniform one (``finfo.min`` scores, never NaN)."""
    scores_bmgts = jnp.einsum("btmgh,bsmh->bmgts", q_btmgh, k_bsmh)
    scores_bmgts = scores_bmgts.astype(jnp.float32) * (q_btmgh.shape[-1] ** -0.5)
    scores_bmgts = jnp.where(mask_bts[:, None, None], scores_bmgts, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores_bmgts, axis=-1)


@jax.custom_vjp
def attention(q_btmgh: Array, k_bsmh: Array, v_bsmh: Array, mask_bts: Array) -> Array:
    """``softmax(q k^T / sqrt(h)) v`` over grouped heads, (batch, t, m, g, h); the values
    and gradients of ``attention_probs`` followed by the product with the values."""
    return _attention_forward(q_btmgh, k_bsmh, v_bsmh, mask_bts)[0]


def _attention_forward(q_btmgh, k_bsmh, v_bsmh, mask_bts):
    probs_bmgts = attention_probs(q_btmgh, k_bsmh, mask_bts)
    out_btmgh = jnp.einsum("bmgts,bsmh->btmgh", probs_bmgts.astype(v_bsmh.dtype), v_bsmh)
    return out_btmgh, (q_btmgh, k_bsmh, v_bsmh, mask_bts, probs_bmgts)


def _attention_backward(residuals, g_btmgh):
    q_btmgh, k_bsmh, v_bsmh, mask_bts, probs_bmgts = residuals
    dtype = v_bsmh.dtype
    d_v_bsmh = jnp.einsum("bmgts,btmgh->bsmh", probs_bmgts.astype(dtype), g_btmgh)
    d_probs_bmgts = jnp.einsum("btmgh,bsmh->bmgts", g_btmgh, v_bsmh).astype(jnp.float32)
    # The softmax's Jacobian; masked scores were replaced by a constant, so get none.
    row_bmgt1 = jnp.sum(probs_bmgts * d_probs_bmgts, axis=-1, keepdims=True)
    d_scores_bmgts = jnp.where(mask_bts[:, None, None], probs_bmgts * (d_probs_bmgts - row_bmgt1), 0.0)
    d_scores_bmgts = (d_scores_bmgts * (q_btmgh.shape[-1] ** -0.5)).astype(dtype)
    d_q_btmgh = jnp.einsum("bmgts,bsmh->btmgh", d_scores_bmgts, k_bsmh)
    d_k_bsmh = jnp.einsum("bmgts,btmgh->bsmh", d_scores_bmgts, q_btmgh)
    return d_q_btmgh, d_k_bsmh, d_v_bsmh, None


attention.defvjp(_attention_forward, _attention_backward)
