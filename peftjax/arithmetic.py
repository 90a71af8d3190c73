"""Adapter arithmetic: combine named LoRA adapters into a new one.

The combinations are HF PEFT's (``LoraModel.add_weighted_adapter``), with
weights w_i on adapters with factors A_i, B_i and scales s_i:

* ``svd``: Delta = sum_i w_i s_i A_i B_i, truncated to ``svd_rank`` (default:
  the largest rank) by an SVD; the singular values go to B, as HF PEFT puts them.
* ``cat``: A = [w_1 s_1 A_1, w_2 s_2 A_2, ...], B = [B_1; B_2; ...] (rank: the
  sum of the ranks), exactly sum_i w_i s_i A_i B_i.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``:
  the task-arithmetic merges applied to the A's and the B's separately (same
  ranks required), with weights sqrt(|w_i s_i|) on both and the sign of
  w_i s_i on A's. ``ties`` keeps each tensor's ``density`` largest entries by
  magnitude, elects a sign per entry (the sign of the sum of the kept entries,
  or with ``majority_sign="frequency"`` of the count of signs) and averages the
  weighted entries that agree with it; ``dare_*`` keeps each entry with
  probability ``density`` and divides the kept by ``density`` (DARE's rescaling,
  which keeps the expected value), then sums (``dare_linear``) or elects signs
  and averages as TIES does (``dare_ties``); ``magnitude_prune`` prunes as TIES
  does and sums.

The new adapter is LoRA with alpha = rank (scale 1: the scales are in the
factors) on every module any of the adapters wraps, and starts inactive, as
in HF PEFT: ``peftjax.set_active_adapters(model, name)`` selects it. (HF PEFT
keeps the first adapter's ``use_rslora``, which scales the result by sqrt(r)
when it is set; here the scale is always 1.) The arithmetic runs in float32
numpy on the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from peftjax.core.adapter_io import load_adapter
from peftjax.core.inject import applied_methods, apply, delete_adapter, iter_wrappers, set_active_adapters
from peftjax.errors import PeftError
from peftjax.methods.lora import LoraConfig, LoraLinear

Combination = Literal["svd", "cat", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"]
_PER_FACTOR = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_PRUNING = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def magnitude_prune(tensor: np.ndarray, density: float) -> np.ndarray:
    """``tensor`` with all but its ``int(density * size)`` largest-magnitude entries zeroed."""
    if density >= 1:
        return tensor
    keep = int(density * tensor.size)
    mask = np.zeros(tensor.size, bool)
    mask[np.argsort(-np.abs(tensor), axis=None, kind="stable")[:keep]] = True
    return tensor * mask.reshape(tensor.shape)


def dare_prune(tensor: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE: each entry kept with probability ``density``, the kept divided by ``density``."""
    if density >= 1:
        return tensor
    return tensor * (rng.random(tensor.shape) < density) / np.float32(density)


def _merge(tensors: list[np.ndarray], weights: np.ndarray, combination: str, density, majority_sign, rng):
    """One task-arithmetic merge of same-shaped ``tensors`` (what HF PEFT's merge_utils compute)."""
    if combination in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune(t, density) for t in tensors]
    elif combination in ("dare_linear", "dare_ties"):
        tensors = [dare_prune(t, density, rng) for t in tensors]
    stacked = np.stack(tensors)
    weighted = stacked * weights.reshape(-1, *(1,) * (stacked.ndim - 1))
    if combination not in ("ties", "dare_ties"):
        return weighted.sum(0)
    signs = np.sign(stacked)
    votes = stacked.sum(0) if majority_sign == "total" else signs.sum(0)
    agrees = signs == np.where(votes >= 0, 1, -1)
    return (weighted * agrees).sum(0) / np.maximum(agrees.sum(0), 1)


def _combine(factors, weights, combination, rank, density, majority_sign, rng) -> tuple[np.ndarray, np.ndarray]:
    """New (A, B) at one module from its adapters' [(A, B, s)] and weights."""
    if combination == "cat":
        a = np.concatenate([w * s * a for (a, _, s), w in zip(factors, weights)], axis=-1)
        b = np.concatenate([b for _, b, _ in factors], axis=0)
        pad = rank - a.shape[-1]  # a module some adapters do not wrap
        return np.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, pad)]), np.pad(b, [(0, pad)] + [(0, 0)] * (b.ndim - 1))
    if combination in _PER_FACTOR:
        roots = [math.copysign(math.sqrt(abs(w * s)), w * s) for (_, _, s), w in zip(factors, weights)]
        signed, options = np.array(roots, np.float32), (combination, density, majority_sign, rng)
        a = _merge([a for a, _, _ in factors], signed, *options)
        return a, _merge([b for _, b, _ in factors], abs(signed), *options)
    # svd (and its pruned variants in HF PEFT, not offered here): on the summed update.
    in_shape, out_shape = factors[0][0].shape[:-1], factors[0][1].shape[1:]
    deltas = [s * a.reshape(-1, a.shape[-1]) @ b.reshape(b.shape[0], -1) for a, b, s in factors]
    delta = _merge(deltas, np.asarray(weights, np.float32), "linear", density, majority_sign, rng)
    u, sigma, vh = np.linalg.svd(delta.T, full_matrices=False)  # torch's (out, in) orientation, as HF PEFT
    kept = min(rank, sigma.size)  # a rank above the matrix's own is padded with zeros
    a = np.zeros((delta.shape[0], rank), np.float32)
    b = np.zeros((rank, delta.shape[1]), np.float32)
    a[:, :kept], b[:kept] = vh[:kept].T, (u[:, :kept] * sigma[:kept]).T
    return a.reshape(*in_shape, rank), b.reshape(rank, *out_shape)


def _module_path(wrapper_path: str) -> str:
    """The adapted module's path: a wrapper stacked under others sits at ``module.base[.base...]``."""
    while wrapper_path.endswith(".base"):
        wrapper_path = wrapper_path[: -len(".base")]
    return wrapper_path


def combine_adapters(
    model: nnx.Module,
    weights: Mapping[str, float],
    *,
    into: str,
    combination: Combination = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign: Literal["total", "frequency"] = "total",
    seed: int = 0,
) -> nnx.Module:
    """Add LoRA adapter ``into``, the ``combination`` of the named LoRA adapters
    with ``weights`` ({adapter name: weight}; see the module docstring).

    ``density`` (in [0, 1]) is required by the pruning combinations; ``seed``
    draws DARE's masks. Raises ``PeftError``, leaving the model unchanged, for
    unknown or non-LoRA adapters, a taken name, or ranks that do not fit.
    """
    configs = dict(applied_methods(model))
    if not weights:
        raise PeftError("combine_adapters needs at least one adapter in weights")
    unknown = [name for name in weights if name not in configs]
    if unknown:
        raise PeftError(f"no adapter named {unknown} on this model; adapters: {list(configs)}")
    if into in configs:
        raise PeftError(f"adapter name {into!r} is already used on this model; pick another")
    not_lora = {n: type(configs[n]).__name__ for n in weights if type(configs[n]) is not LoraConfig}
    if not_lora:
        raise PeftError(f"combine_adapters combines plain LoRA adapters; {not_lora} are not")
    head = [n for n in weights if configs[n].also_train]
    if head:
        raise PeftError(f"adapters {head} also train base parameters (also_train), which have no combined form")
    if combination not in (*_PER_FACTOR, "svd", "cat"):
        raise PeftError(f"combination={combination!r}: choose one of {['svd', 'cat', *_PER_FACTOR]}")
    if combination in _PRUNING and (density is None or not 0 <= density <= 1):
        raise PeftError(f"combination={combination!r} needs density in [0, 1] (the share of entries kept): {density}")
    if majority_sign not in ("total", "frequency"):
        raise PeftError(f"majority_sign={majority_sign!r}: choose 'total' or 'frequency'")
    combination = "linear" if len(weights) == 1 else combination  # as HF PEFT: one adapter is only scaled
    ranks = [configs[n].rank for n in weights]
    if combination in _PER_FACTOR and len(set(ranks)) > 1:
        raise PeftError(f"combination={combination!r} needs equal ranks; the adapters have {dict(zip(weights, ranks))}")
    rank = sum(ranks) if combination == "cat" else svd_rank or max(ranks)

    modules: dict[str, list] = {}
    for path, wrapper in iter_wrappers(model):
        if wrapper.adapter_name in weights and isinstance(wrapper, LoraLinear):
            a, b = (np.asarray(jax.device_get(v[...]), np.float32) for v in (wrapper.lora_a, wrapper.lora_b))
            modules.setdefault(_module_path(path), []).append((wrapper.adapter_name, (a, b, np.float32(wrapper.scale))))
    rng = np.random.default_rng(seed)
    new = {}
    for where, found in modules.items():
        found.sort(key=lambda item: list(weights).index(item[0]))
        chosen = [weights[name] for name, _ in found]
        new[where] = _combine([f for _, f in found], chosen, combination, rank, density, majority_sign, rng)

    apply(model, LoraConfig(rank=rank, alpha=float(rank), targets=tuple(sorted(new))), adapter_name=into, stack=True)
    for path, wrapper in iter_wrappers(model):
        if wrapper.adapter_name == into:
            a, b = new[_module_path(path)]
            wrapper.lora_a[...] = jnp.asarray(a, wrapper.lora_a.dtype)
            wrapper.lora_b[...] = jnp.asarray(b, wrapper.lora_b.dtype)
            wrapper.active = False
    return model


def combine_saved(model: nnx.Module, weights: Mapping[str, float], *, into: str = "combined", **options) -> nnx.Module:
    """Load each saved adapter folder in ``weights`` ({folder: weight}, peftjax's
    or HF PEFT's format) onto ``model``, combine them (``options`` as for
    ``combine_adapters``), and keep only the result, active: the model then
    holds one adapter, ready for ``save_adapter``."""
    names = {f"adapter_{i}": weight for i, weight in enumerate(weights.values())}
    for name, folder in zip(names, weights):
        load_adapter(model, folder, adapter_name=name)
    combine_adapters(model, names, into=into, **options)
    for name in names:
        delete_adapter(model, name)
    return set_active_adapters(model, into)
