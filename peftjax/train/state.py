"""The train state and the jitted step: gradients over the trainable part only.

``TrainState.create`` splits the model once into

* ``trainable``: the parameters the optimizer labels trainable,
* ``frozen``: every other parameter, the running statistics of frozen
  batch norms and the strategies' ``FixedBuffer`` arrays, never changed by a
  step,
* ``rest``: other non-parameter state (RNG counters, the running statistics
  of batch norms that train), which a forward pass may advance,

plus the optimizer state over ``trainable`` alone. Frozen batch norms (all
parameters labelled frozen, see ``peftjax.core.batch_stats``) normalise with
their running statistics in the step's graph even in training mode. The step
rebuilds the module inside ``jax.jit`` (traced once, no graph traversal per step) and takes
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

from peftjax.core.batch_stats import is_fixed_statistic, training_view
from peftjax.core.labels import PeftOptimizer, make_optimizer
from peftjax.core.paths import dotted
from peftjax.train.sharding import parameter_specs, place, put
from peftjax.variables import FixedBuffer

LossFn = Callable[[nnx.Module, Any], jax.Array | tuple[jax.Array, dict]]


class _Static:
    """Graph definition, optimizer and the filter of the state a step returns
    (``rest``), hashed by identity: a jit cache lookup per step costs a pointer
    comparison, not a walk of the graph definition."""

    def __init__(self, graphdef: nnx.GraphDef, tx: optax.GradientTransformation, rest_filter: Any = None):
        self.graphdef, self.tx = graphdef, tx
        self.rest_filter = nnx.Not(nnx.Param) if rest_filter is None else rest_filter


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
        ``model`` is left as it was (frozen batch norms are switched to their
        running statistics in a view of it).
        """
        if not isinstance(optimizer, PeftOptimizer):
            optimizer = make_optimizer(model, optimizer)
        trainable_paths = optimizer.trainable_paths

        def is_trainable(path, value) -> bool:
            return isinstance(value, nnx.Param) and dotted(path) in trainable_paths

        fixed = nnx.Any(nnx.Param, FixedBuffer, is_fixed_statistic(optimizer.fixed_batch_norms))
        view = training_view(model, optimizer.fixed_batch_norms)
        graphdef, trainable, frozen, rest = nnx.split(view, is_trainable, fixed, ...)
        trainable = jax.tree.map(jnp.copy, trainable)
        rest = jax.tree.map(jnp.copy, rest)
        return cls(
            step=jnp.zeros((), jnp.int32),
            trainable=trainable,
            opt_state=optimizer.init(trainable),
            rest=rest,
            frozen=frozen,
            static=_Static(graphdef, optimizer, nnx.Not(fixed)),
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

    def relabel(self, optimizer: optax.GradientTransformation) -> TrainState:
        """This state split again where ``optimizer`` draws the line: the next
        stage of a label schedule (gradual unfreezing, say).

        Parameters keep their values. Optimizer state is carried leaf by leaf
        where the new state has a leaf of the same path, shape and dtype: the
        moments of a parameter that trains under the same label before and
        after, the counters of such a label, the state of wrappers around the
        partition. A parameter that starts training gets fresh state, created
        here and not before; one that stops training loses its state and from
        now on stays as it is. Placed on the same mesh as this state.
        """
        fresh = TrainState.create(self.model(), optimizer)
        flat, _ = jax.tree_util.tree_flatten_with_path(self.opt_state)
        old = {jax.tree_util.keystr(path): leaf for path, leaf in flat}

        def carried(path, leaf):
            found = old.get(jax.tree_util.keystr(path))
            same = found is not None and found.shape == leaf.shape and found.dtype == leaf.dtype
            return found if same else leaf

        relabelled = fresh.replace(step=self.step, opt_state=jax.tree_util.tree_map_with_path(carried, fresh.opt_state))
        sharding = getattr(self.step, "sharding", None)
        return relabelled.on_mesh(sharding.mesh) if isinstance(sharding, jax.sharding.NamedSharding) else relabelled

    def on_mesh(self, mesh: jax.sharding.Mesh) -> TrainState:
        """This state laid out on ``mesh`` (see ``peftjax.train.sharding``); the
        optimizer state is re-initialised from the placed parameters so that its
        buffers sit where they do, then filled with this state's values."""
        specs = parameter_specs(self.model(), mesh)
        trainable = place(self.trainable, specs, mesh)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

        def on_mesh(fresh, old):
            # Moments inherit their parameter's layout; counters XLA left on one device are replicated.
            placed = isinstance(fresh.sharding, jax.sharding.NamedSharding) and fresh.sharding.mesh == mesh
            return put(old, fresh.sharding if placed else replicated)

        restored = jax.tree.map(on_mesh, jax.jit(self.tx.init)(trainable), self.opt_state)
        return self.replace(
            trainable=trainable,
            frozen=place(self.frozen, specs, mesh),
            rest=place(self.rest, {}, mesh),
            opt_state=restored,
            step=put(self.step, replicated),
        )


class TrainStep:
    """``step(state, batch) -> (state, metrics)``, compiled once per model graph.

    The state passed in is consumed (its trainable and optimizer buffers are
    donated): keep using the returned one. ``step.lower(state, batch)`` lowers
    the same computation, e.g. for XLA's cost analysis:
    ``step.lower(state, batch).compile().cost_analysis()``.

    With ``grad_accum=k`` the batch is split into k micro-batches (example i
    goes to micro-batch i mod k, so each stays spread over a data-parallel
    mesh); their gradients are averaged in a ``lax.scan`` before one update,
    which equals one step on the whole batch for a loss that is a mean.

    ``compiler_options`` go to XLA for this step alone (``jax.jit``'s
    ``compiler_options``), e.g. ``{"xla_backend_optimization_level": 1}`` to
    trade a little run time for a faster compile on the CPU.
    """

    def __init__(self, loss_fn: LossFn, *, grad_accum: int = 1, compiler_options: dict[str, Any] | None = None):
        if not isinstance(grad_accum, int) or grad_accum < 1:
            raise ValueError(f"grad_accum={grad_accum!r}: must be a positive integer")
        self.loss_fn = loss_fn
        self.grad_accum = grad_accum
        self._jitted = jax.jit(self._update, static_argnums=0, donate_argnums=1, compiler_options=compiler_options)

    def _loss_and_grads(self, static: _Static, trainable, frozen, rest, batch):
        def loss_of(trainable, rest):
            # Fresh Variables for this trace: the forward pass may advance RNG counters.
            model = nnx.merge(static.graphdef, trainable, frozen, jax.tree.map(lambda x: x, rest))
            out = self.loss_fn(model, batch)
            loss, aux = out if isinstance(out, tuple) else (out, {})
            return loss, (aux, nnx.state(model, static.rest_filter))

        (loss, (aux, rest)), grads = jax.value_and_grad(loss_of, has_aux=True)(trainable, rest)
        return loss, aux, rest, grads

    def _accumulated(self, static: _Static, trainable, frozen, rest, batch):
        k = self.grad_accum
        if k == 1:
            return self._loss_and_grads(static, trainable, frozen, rest, batch)

        def split(x):
            if x.shape[0] % k:
                raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={k}")
            return x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)

        def micro_step(carry, micro_batch):
            loss_sum, aux_sum, grad_sum, rest = carry
            loss, aux, rest, grads = self._loss_and_grads(static, trainable, frozen, rest, micro_batch)
            add = lambda a, b: a + b / k  # noqa: E731
            return (loss_sum + loss / k, jax.tree.map(add, aux_sum, aux), jax.tree.map(add, grad_sum, grads), rest), None

        micro_batches = jax.tree.map(split, batch)
        first = jax.tree.map(lambda x: x[0], micro_batches)
        aux_shape = jax.eval_shape(lambda: self._loss_and_grads(static, trainable, frozen, rest, first)[1])
        zeros = lambda tree: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), tree)  # noqa: E731
        init = (jnp.zeros((), jnp.float32), zeros(aux_shape), zeros(trainable), rest)
        (loss, aux, grads, rest), _ = jax.lax.scan(micro_step, init, micro_batches)
        return loss, aux, rest, grads

    def _update(self, static: _Static, carry, frozen: nnx.State, batch):
        step, trainable, opt_state, rest = carry
        loss, aux, rest, grads = self._accumulated(static, trainable, frozen, rest, batch)
        # value=: for transformations that watch the loss (optax.contrib.reduce_on_plateau).
        updates, opt_state = static.tx.update(grads, opt_state, trainable, value=loss)
        trainable = optax.apply_updates(trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
        return (step + 1, trainable, opt_state, rest), metrics

    @staticmethod
    def _args(state: TrainState, batch):
        return state.static, (state.step, state.trainable, state.opt_state, state.rest), state.frozen, batch

    def __call__(self, state: TrainState, batch) -> tuple[TrainState, dict[str, jax.Array]]:
        state = _on_batch_mesh(state, batch)
        (step, trainable, opt_state, rest), metrics = self._jitted(*self._args(state, batch))
        return state.replace(step=step, trainable=trainable, opt_state=opt_state, rest=rest), metrics

    def lower(self, state: TrainState, batch) -> jax.stages.Lowered:
        return self._jitted.lower(*self._args(state, batch))


def _on_batch_mesh(state: TrainState, batch) -> TrainState:
    """``state`` laid out on the mesh the batch is sharded over, if it is not yet.

    The step's outputs come back on the batch's mesh; a state left on its default
    device would therefore reach the second step with other shardings than the
    first and compile the step a second time. Placing it up front (once: the
    returned state is already placed) keeps one program."""
    def mesh_of(array):
        sharding = getattr(array, "sharding", None)
        return sharding.mesh if isinstance(sharding, jax.sharding.NamedSharding) else None

    batch_meshes = {mesh_of(leaf) for leaf in jax.tree.leaves(batch)}
    if len(batch_meshes) != 1 or None in batch_meshes or mesh_of(state.step) in batch_meshes:
        return state
    return state.on_mesh(batch_meshes.pop())


def make_train_step(
    loss_fn: LossFn, *, grad_accum: int = 1, compiler_options: dict[str, Any] | None = None
) -> TrainStep:
    """Compile ``loss_fn(model, batch) -> loss | (loss, aux)`` into a train step
    (``grad_accum`` micro-batches per update, ``compiler_options`` for XLA)."""
    return TrainStep(loss_fn, grad_accum=grad_accum, compiler_options=compiler_options)
