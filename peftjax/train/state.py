"""The train state and the jitted step: gradients over the trainable part only.

``TrainState.create`` splits the model once into

* ``trainable``: the parameters the optimizer labels trainable,
* ``frozen``: every other parameter, never changed by a step,
* ``rest``: non-parameter state (RNG counters, batch statistics), which a
  forward pass may advance,

plus the optimizer state over ``trainable`` alone. The step rebuilds the
module inside ``jax.jit`` (traced once, no graph traversal per step) and takes
``jax.value_and_grad`` with respect to ``trainable``: frozen kernels get no
weight gradients, so they cost no gradient FLOPs and no optimizer state. The
step donates the buffers it replaces (trainable, optimizer state, rest) and
never copies the frozen ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from peftjax.core.labels import PeftOptimizer, make_optimizer
from peftjax.core.paths import dotted

LossFn = Callable[[nnx.Module, Any], jax.Array | tuple[jax.Array, dict]]


class _Static:
    """Graph definition and optimizer, hashed by identity: a jit cache lookup
    per step costs a pointer comparison, not a walk of the graph definition."""

    def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation):
        self.graphdef, self.tx = graphdef, tx


@struct.dataclass
class TrainState:
    step: jax.Array
    trainable: nnx.State
    opt_state: optax.OptState
    rest: nnx.State
    frozen: nnx.State
    static: _Static = struct.field(pytree_node=False)

    @classmethod
    def create(cls, model: nnx.Module, optimizer: optax.GradientTransformation) -> TrainState:
        """Split ``model`` where ``optimizer`` draws the line and initialise it.

        ``optimizer`` is normally from ``peftjax.make_optimizer`` and carries
        its labels; a plain optax transformation is wrapped with the default
        labels of ``model``. The trainable arrays are copied so that donating
        them to the step never invalidates ``model``; frozen arrays are shared.
        """
        if not isinstance(optimizer, PeftOptimizer):
            optimizer = make_optimizer(model, optimizer)
        trainable_paths = optimizer.trainable_paths

        def is_trainable(path, value) -> bool:
            return isinstance(value, nnx.Param) and dotted(path) in trainable_paths

        graphdef, trainable, frozen, rest = nnx.split(model, is_trainable, nnx.Param, ...)
        trainable = jax.tree.map(jnp.copy, trainable)
        rest = jax.tree.map(jnp.copy, rest)
        return cls(
            step=jnp.zeros((), jnp.int32),
            trainable=trainable,
            opt_state=optimizer.init(trainable),
            rest=rest,
            frozen=frozen,
            static=_Static(graphdef, optimizer),
        )

    @property
    def graphdef(self) -> nnx.GraphDef:
        return self.static.graphdef

    @property
    def tx(self) -> optax.GradientTransformation:
        return self.static.tx

    def model(self) -> nnx.Module:
        """The module with this state's parameters."""
        return nnx.merge(self.graphdef, self.trainable, self.frozen, self.rest)


class TrainStep:
    """``step(state, batch) -> (state, metrics)``, compiled once per model graph.

    The state passed in is consumed (its trainable and optimizer buffers are
    donated): keep using the returned one.

    ``step.lower(state, batch)`` lowers the same computation, e.g. for XLA's
    cost analysis: ``step.lower(state, batch).compile().cost_analysis()``.
    """

    def __init__(self, loss_fn: LossFn):
        self.loss_fn = loss_fn
        self._jitted = jax.jit(self._update, static_argnums=0, donate_argnums=1)

    def _update(self, static: _Static, carry, frozen: nnx.State, batch):
        step, trainable, opt_state, rest = carry

        def loss_of(trainable):
            # Fresh Variables for this trace: the forward pass may advance RNG counters.
            model = nnx.merge(static.graphdef, trainable, frozen, jax.tree.map(lambda x: x, rest))
            out = self.loss_fn(model, batch)
            loss, aux = out if isinstance(out, tuple) else (out, {})
            return loss, (aux, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (aux, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable)
        updates, opt_state = static.tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return (step + 1, trainable, opt_state, rest), metrics

    @staticmethod
    def _args(state: TrainState, batch):
        return state.static, (state.step, state.trainable, state.opt_state, state.rest), state.frozen, batch

    def __call__(self, state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        (step, trainable, opt_state, rest), metrics = self._jitted(*self._args(state, batch))
        return state.replace(step=step, trainable=trainable, opt_state=opt_state, rest=rest), metrics

    def lower(self, state: TrainState, batch) -> jax.stages.Lowered:
        return self._jitted.lower(*self._args(state, batch))


def make_train_step(loss_fn: LossFn) -> TrainStep:
    """Compile ``loss_fn(model, batch) -> loss | (loss, aux)`` into a train step."""
    return TrainStep(loss_fn)
