"""Reduce the learning rate on a plateau of an eval score, with
``optax.contrib.reduce_on_plateau``.

The textbook companion of early stopping: when the eval split has not
improved for ``patience`` evaluations, multiply the learning rate by
``factor`` (Keras' and PyTorch's ``ReduceLROnPlateau``). optax's
transformation keeps the scale, the best value and the counters in its
state, which sits in the optimizer state: every checkpoint has it and a
resumed run goes on with it. The step applies the scale to every update
(after the run's schedule); the state changes only at evaluations, where
``on_eval`` hands optax the eval score as its ``value``. ``accuracy`` is
watched as minus accuracy, since optax minimises. The current scale is
logged as ``reduce_on_plateau_scale`` at each evaluation.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from optax.contrib import ReduceLROnPlateauState

from peftjax.core.labels import PeftOptimizer
from peftjax.errors import PeftError
from peftjax.schema import require
from peftjax.strategies.base import Strategy, register_strategy
from peftjax.train.session import Run, RunInfo


def _is_plateau(node) -> bool:
    return isinstance(node, ReduceLROnPlateauState)


@register_strategy("reduce_on_plateau")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ReduceOnPlateauConfig(Strategy):
    """Multiply the learning rate by ``factor`` after ``patience`` evaluations without improvement.

    Attributes:
      factor: the cut, in (0, 1).
      patience: evaluations without improvement before a cut.
      monitor: the eval score watched: ``loss`` or ``accuracy``.
      rtol: the relative improvement that counts (optax's ``rtol``).
      cooldown: evaluations after a cut before counting again.
      min_scale: the smallest scale of the learning rate.
    """

    factor: float = 0.1
    patience: int = 2
    monitor: Literal["loss", "accuracy"] = "loss"
    rtol: float = 1e-4
    cooldown: int = 0
    min_scale: float = 0.0

    def _validate(self) -> None:
        require(0 < self.factor < 1, "factor", f"must be in (0, 1), got {self.factor}")
        require(self.patience >= 1, "patience", f"must be at least 1, got {self.patience}")
        require(0 < self.rtol <= 1, "rtol", f"must be in (0, 1], got {self.rtol}")
        require(self.cooldown >= 0, "cooldown", "must not be negative")
        require(0 <= self.min_scale <= 1, "min_scale", "must be in [0, 1]")

    def plateau(self) -> optax.GradientTransformationExtraArgs:
        return optax.contrib.reduce_on_plateau(factor=self.factor, patience=self.patience, rtol=self.rtol,
                                               cooldown=self.cooldown, min_scale=self.min_scale)

    @functools.cached_property
    def _moved(self) -> Callable:
        """The plateau state after an evaluation, compiled once (run eagerly, optax's update
        compiles its small programs again at every evaluation)."""
        plateau = self.plateau()
        return jax.jit(lambda state, value: plateau.update({}, state, value=value)[1])

    def optimizer(self, tx: PeftOptimizer, info: RunInfo) -> optax.GradientTransformation:
        plateau = self.plateau()

        def scale_only(updates, state, params=None, **extra):
            # The step applies the current scale; the state moves at evaluations (on_eval).
            return jax.tree.map(lambda u: state.scale.astype(u.dtype) * u, updates), state

        return optax.chain(tx, optax.GradientTransformationExtraArgs(plateau.init, scale_only))

    def on_start(self, run: Run) -> None:
        config = run.info.config
        if config.data.eval_split is None or config.train.eval_every == 0:
            raise PeftError("reduce_on_plateau watches evaluations: set data.eval_split and train.eval_every "
                            f"(now {config.data.eval_split!r} and {config.train.eval_every})")

    def on_eval(self, run: Run, scores: Mapping[str, float]) -> None:
        value = scores[self.monitor] * (1.0 if self.monitor == "loss" else -1.0)
        found = [node for node in jax.tree.leaves(run.state.opt_state, is_leaf=_is_plateau) if _is_plateau(node)]
        if len(found) != 1:
            raise PeftError(f"reduce_on_plateau: the optimizer state holds {len(found)} plateau states, expected 1")
        updated = self._moved(found[0], jnp.asarray(value, found[0].best_value.dtype))
        updated = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), updated, found[0])
        opt_state = jax.tree.map(lambda node: updated if _is_plateau(node) else node, run.state.opt_state,
                                 is_leaf=_is_plateau)
        run.state = run.state.replace(opt_state=opt_state)
        run.log({"reduce_on_plateau_scale": float(updated.scale)})
