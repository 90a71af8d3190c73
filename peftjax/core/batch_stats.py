"""Batch norms under freezing: which running statistics train, decided by the labels.

A batch norm (``nnx.BatchNorm`` or a subclass) whose parameters are all
frozen is *frozen*: during training it normalises with its running
statistics, as in evaluation, and never updates them. This is Keras' rule for
a non-trainable ``BatchNormalization`` and the textbooks' advice for a frozen
backbone: a batch norm that keeps re-estimating its statistics on a small
target set shifts the features that the frozen layers above it were trained
on. ``update_frozen=True`` keeps PyTorch's behaviour instead (every batch norm
in training mode updates its statistics, e.g. to re-estimate them on a new
domain). A batch norm with a trainable parameter normalises with batch
statistics in training mode and updates its running statistics.

The decision is made where the labels are (``make_optimizer``) and applied
where the step's graph is built (``TrainState.create``): frozen batch norms
run with ``use_running_average=True`` there, and their statistics sit with
the frozen parameters, never returned by the step. The model a train state
gives back records which batch norms' statistics may have changed, so that
``save_adapter`` writes exactly those statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from flax import nnx

from peftjax.core.paths import dotted
from peftjax.methods.base import FROZEN

# The attribute on the model's root module that records the batch norms whose
# running statistics training may have changed: static, so it lives in the graphdef.
UPDATED_ATTR = "peftjax_updated_batch_norms"


def batch_norms(model: nnx.Module) -> dict[str, nnx.BatchNorm]:
    """Every batch norm of ``model`` by dotted module path."""
    return {dotted(p): m for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)}


def _trains(module_path: str, norm: nnx.BatchNorm, labels: Mapping[str, str]) -> bool:
    names = [f"{module_path}.{leaf}" for leaf in ("scale", "bias") if getattr(norm, leaf, None) is not None]
    return any(labels.get(name, FROZEN) != FROZEN for name in names)


def fixed_batch_norms(model: nnx.Module, labels: Mapping[str, str], *, update_frozen: bool = False) -> frozenset[str]:
    """Dotted paths of the batch norms whose running statistics stay fixed in training:
    those none of whose parameters ``labels`` train (a batch norm without affine
    parameters counts as frozen), or none when ``update_frozen``."""
    if update_frozen:
        return frozenset()
    return frozenset(path for path, norm in batch_norms(model).items() if not _trains(path, norm, labels))


def is_fixed_statistic(fixed: frozenset[str]):
    """An NNX filter selecting the running statistics of the batch norms in ``fixed``."""

    def matches(path, value) -> bool:
        return isinstance(value, nnx.BatchStat) and dotted(path[:-1]) in fixed

    return matches


def updated_batch_norms(model: nnx.Module) -> frozenset[str]:
    """The batch norms whose statistics ``model`` records as possibly changed."""
    return frozenset(getattr(model, UPDATED_ATTR, ()))


def record_updated(model: nnx.Module, paths: Iterable[str]) -> None:
    """Add ``paths`` to the batch norms ``model`` records as changed (a model
    that records none keeps its graph definition)."""
    recorded = updated_batch_norms(model) | set(paths)
    if recorded:
        setattr(model, UPDATED_ATTR, tuple(sorted(recorded)))


def training_view(model: nnx.Module, fixed: frozenset[str]) -> nnx.Module:
    """``model`` as the train step runs it: a view (sharing ``model``'s arrays, which
    is left as it was) where the batch norms in ``fixed`` use their running
    statistics, recording the others as changed. ``model`` itself when it has no
    batch norm."""
    norms = batch_norms(model)
    if not norms:
        return model
    view = nnx.view(
        model, only=lambda path, _: dotted(path) in fixed, use_running_average=True, raise_if_not_found=False
    )
    record_updated(view, set(norms) - fixed)
    return view


def adapter_statistics(model: nnx.Module, labels: Mapping[str, str]) -> dict[str, nnx.BatchStat]:
    """The running statistics an adapter file holds, by dotted path: those of the batch
    norms that ``labels`` train or that ``model`` records as changed."""
    recorded = updated_batch_norms(model)
    chosen = {path for path, norm in batch_norms(model).items() if path in recorded or _trains(path, norm, labels)}
    return {
        dotted(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.BatchStat) and dotted(p[:-1]) in chosen
    }
