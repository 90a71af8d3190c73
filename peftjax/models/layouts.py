"""Where each parameter of a model sits in a transformers checkpoint, and in what layout.

A model's parameter paths equal the checkpoint's module names (the models
mirror transformers' attribute names), so the mapping is mechanical: the leaf
name becomes ``weight``/``bias`` and linear (and conv) kernels are transposed
from torch's (out, in) layout. Batch norms' running statistics
(``nnx.BatchStat``) are checkpoint entries too. ``peftjax.models.loading``
reads and writes checkpoints with it, ``peftjax.core.hf_peft`` HF PEFT adapter
files.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from peftjax.models.batch_norm import BatchNorm
from peftjax.points import InsertionPoint

# Leaf renames and layouts of the layers whose parameters checkpoints hold.
LAYER_LEAVES: Mapping[type, Mapping[str, tuple[str, str]]] = {
    nnx.Linear: {"kernel": ("weight", "linear"), "bias": ("bias", "same")},
    nnx.Conv: {"kernel": ("weight", "conv"), "bias": ("bias", "same")},
    nnx.Embed: {"embedding": ("weight", "same")},
    nnx.LayerNorm: {"scale": ("weight", "same"), "bias": ("bias", "same")},
    nnx.RMSNorm: {"scale": ("weight", "same")},
    nnx.BatchNorm: {
        "scale": ("weight", "same"),
        "bias": ("bias", "same"),
        "mean": ("running_mean", "same"),
        "var": ("running_var", "same"),
    },
    BatchNorm: {
        "scale": ("weight", "same"),
        "bias": ("bias", "same"),
        "mean": ("running_mean", "same"),
        "var": ("running_var", "same"),
        "num_batches_tracked": ("num_batches_tracked", "count"),
    },
}
# What a checkpoint holds: parameters and batch norms' running statistics.
CHECKPOINT_VARIABLES = (nnx.Param, nnx.BatchStat)


def to_model_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":  # torch (out, in, kh, kw) -> flax (kh, kw, in, out)
        return array.transpose(2, 3, 1, 0)
    return array


def to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(3, 2, 0, 1)
    if layout == "count":  # torch keeps counters as int64; JAX (without x64) as int32
        return array.astype(np.int64)
    return array


def contiguous(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy when needed; unlike ``np.ascontiguousarray`` it keeps
    scalars (a batch norm's counter) zero-dimensional."""
    return np.require(array, requirements="C")


def model_shape(torch_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "linear" and len(torch_shape) == 2:
        return torch_shape[::-1]
    if layout == "conv" and len(torch_shape) == 4:
        out, inp, kh, kw = torch_shape
        return (kh, kw, inp, out)
    return tuple(torch_shape)


def _is_reference_module(module: Any) -> bool:
    """Modules whose parameters belong in a transformers checkpoint.

    Layers listed in ``LAYER_LEAVES``, layer lists and the reference model
    classes themselves; anything else (insertion points, adapter wrappers)
    holds parameters no transformers model has.
    """
    if isinstance(module, InsertionPoint):
        return False
    if isinstance(module, (nnx.List, *LAYER_LEAVES)):
        return True
    return type(module).__module__.startswith("peftjax.models.")


def checkpoint_names(model: nnx.Module) -> tuple[dict[tuple, tuple[str, str]], list[str]]:
    """Maps each parameter (and running statistic) path to its checkpoint key and layout.

    Returns ``(names, skipped)``: ``names[path] = (hf_key, layout)`` for every
    parameter and batch-norm statistic of the reference architecture, and the
    dotted paths of those under other modules (adapters, points), which have
    no transformers counterpart.
    """
    modules = dict(nnx.iter_modules(model))
    names: dict[tuple, tuple[str, str]] = {}
    skipped: list[str] = []
    for path, _ in nnx.to_flat_state(nnx.state(model, CHECKPOINT_VARIABLES)):
        owner_path, leaf = path[:-1], path[-1]
        chain = [modules.get(owner_path[:i]) for i in range(len(owner_path) + 1)]
        if not all(m is not None and _is_reference_module(m) for m in chain):
            skipped.append(".".join(map(str, path)))
            continue
        owner = modules[owner_path]
        hf_leaf, layout = str(leaf), "same"
        # The nearest class in the owner's ancestry: a subclass with leaves of its own
        # (peftjax's BatchNorm) has its entry, one without (lean_backward.LayerNorm) its base's.
        leaves = next((LAYER_LEAVES[cls] for cls in type(owner).__mro__ if cls in LAYER_LEAVES), None)
        if leaves is not None:
            hf_leaf, layout = leaves[leaf]
        names[path] = (".".join(map(str, (*owner_path, hf_leaf))), layout)
    return names, skipped


def to_torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "linear" and len(shape) == 2:
        return shape[::-1]
    if layout == "conv" and len(shape) == 4:
        kh, kw, inp, out = shape
        return (out, inp, kh, kw)
    return tuple(shape)
