"""K LoRA ranks trained at once: one jitted program, one copy of the base.

A rank search trains the same model with LoRA at ranks r_1..r_K. Run one at a
time, each run pays its own compilation, its own per-step dispatch and its own
reads of the frozen base weights. Here the K adapters are padded to the largest
rank R and stacked on a leading *member* axis; the train step is the ordinary
single-run update (``TrainStep._update``: loss, gradients over the trainable
part, optimizer update) under ``jax.vmap`` with

* the trainable adapters, their optimizer state and the non-parameter state
  (RNG counters, each member's scale and rank mask) mapped over axis 0;
* the frozen base and the batch broadcast (``in_axes=None``): stored once,
  never copied K times.

Each member is *exactly* a rank-r LoRA:

* ``MaskedLoraLinear`` multiplies A's and B's rank slots by a 0/1 mask, so the
  padded slots contribute nothing and get zero gradients (hence zero Adam
  moments, zero updates, zero weight decay: they stay zero);
* its scale alpha/r (or alpha/sqrt(r)) is a variable, since it differs per
  member and a static Python attribute would be one value for all;
* its initial A is the one a separate ``peftjax.apply(LoraConfig(rank=r))``
  draws (the rank-r adapter is applied, read and deleted again, then padded),
  so batched and separate runs start from the same point;
* its learning rate is data too: the optimizer runs at peak 1 and the update
  is multiplied by the member's rate. That is the same update, up to float
  rounding, whenever the rate enters as a factor that no state depends on:
  true of every optimizer ``runner.build_optimizer`` makes (adam, adamw, sgd
  and lion scale by the scheduled rate last; adafactor as built there has no
  weight decay after its rate), not of an optimizer whose state or decay
  sees the rate (adafactor with ``weight_decay_rate``, say);
* an optimizer that reduces over a whole array must count only the member's
  own entries. Adam, AdamW, SGD and Lion act entry by entry, and a global-norm
  clip sums squares, to which zeros add nothing. Adafactor's block RMS
  (``clip_by_block_rms``, ``scale_by_param_block_rms``) is a *mean* over the
  array, which the zero padding shrinks by sqrt(r/R): ``member_adafactor`` is
  ``optax.adafactor`` with those two means taken over the member's r rank slots
  (``MemberRank`` holds r). Its factored second moment, used for arrays with
  two axes of at least 128, would average over the padding too; a batched
  Adafactor sweep with such ranks is refused (``rank_search.config``).

``tests/rank_search/test_batched.py`` checks that K=4 members trained for 20
steps equal four separate ``TrainState``/``make_train_step`` runs within 1e-5,
that K=2 members equal their separate runs under every optimizer of
``OptimConfig`` with clipping, and that the compiled step's argument bytes grow
with K by exactly the per-member state, never by the base.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from peftjax.core.counting import ParamCount, count_params
from peftjax.core.inject import apply, delete_adapter, iter_wrappers
from peftjax.core.labels import PeftOptimizer, make_optimizer
from peftjax.core.paths import dotted
from peftjax.errors import PeftError
from peftjax.methods.base import AdapterWrapper
from peftjax.methods.lora import LoraA, LoraB, LoraConfig, LoraLinear
from peftjax.train.state import TrainState, TrainStep, _Static
from peftjax.variables import AdapterBuffer

ADAPTER_NAME = "default"


class LoraScale(AdapterBuffer):
    """A member's LoRA scale s (alpha/r): data, because members differ."""


class RankMask(AdapterBuffer):
    """1.0 on a member's r rank slots, 0.0 on the padding up to the largest rank."""


class MaskedLoraLinear(LoraLinear):
    """A rank-R LoraLinear that computes a rank-r LoRA (r <= R) given its mask.

    Built from an applied ``LoraLinear`` (taking over its base, factors and
    dropout), so selection, labels and counting stay those of ``LoraConfig``.
    """

    def __init__(self, wrapper: LoraLinear):  # noqa: D107 - the class docstring says it
        AdapterWrapper.__init__(self, wrapper.base, adapter_name=wrapper.adapter_name)
        self.active, self.merged = wrapper.active, wrapper.merged
        self.layout = wrapper.layout
        self.lora_a = LoraA(wrapper.lora_a[...])
        self.lora_b = LoraB(wrapper.lora_b[...])
        self.dropout = wrapper.dropout
        self.scale = LoraScale(jnp.asarray(wrapper.scale, jnp.float32))
        self.rank_mask = RankMask(jnp.ones((wrapper.lora_a.shape[-1],), jnp.float32))

    @property
    def rank(self) -> int:
        """The member's rank r (the number of live slots); concrete values only."""
        return int(np.asarray(self.rank_mask[...]).sum())

    def _masked_factors(self, dtype) -> tuple[jax.Array, jax.Array]:
        mask = self.rank_mask[...].astype(dtype)
        a = self.lora_a[...].astype(dtype) * mask  # rank is A's last axis
        b = self.lora_b[...].astype(dtype) * mask.reshape(-1, *(1,) * (self.lora_b.ndim - 1))  # and B's first
        return a, b

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if not self.adds_output:
            return y
        dtype = self.base_layer.dtype or x.dtype
        a, b = self._masked_factors(dtype)
        h = x if self.dropout is None else self.dropout(x)
        h = self.layout.project_down(h.astype(dtype), a)
        return y + self.scale[...].astype(y.dtype) * self.layout.project_up(h, b).astype(y.dtype)

    def delta_kernel(self) -> jax.Array:
        """s * A B in the base kernel's layout, in float32 (padding masked out)."""
        a, b = self._masked_factors(jnp.float32)
        return self.scale[...] * self.layout.kernel_from_factors(a, b)

    def factors(self) -> tuple[np.ndarray, np.ndarray, float]:
        """The member's own (A, B, s): A (in..., r), B (r, out...), unpadded, as numpy."""
        rank = self.rank
        a = np.asarray(jax.device_get(self.lora_a[...]))[..., :rank]
        b = np.asarray(jax.device_get(self.lora_b[...]))[:rank]
        return a, b, float(np.asarray(self.scale[...]))


def _replace_module(model: nnx.Module, path: tuple, new: nnx.Module) -> None:
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = new
    else:
        setattr(parent, path[-1], new)


def mask_lora_wrappers(model: nnx.Module, adapter_name: str = ADAPTER_NAME) -> list[str]:
    """Swap every ``LoraLinear`` of ``adapter_name`` for a ``MaskedLoraLinear``;
    returns the swapped modules' dotted paths."""
    swapped = []
    for path, module in list(nnx.iter_modules(model)):
        if type(module) is LoraLinear and module.adapter_name == adapter_name:
            _replace_module(model, path, MaskedLoraLinear(module))
            swapped.append(dotted(path))
    if not swapped:
        raise PeftError(f"no LoRA wrapper of adapter {adapter_name!r} to mask; apply a LoraConfig first")
    return swapped


def member_factors(model: nnx.Module) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """``{module path: (A, B, s)}`` of a (possibly masked) LoRA model, unpadded."""
    found = {}
    for path, wrapper in iter_wrappers(model):
        if isinstance(wrapper, MaskedLoraLinear):
            found[path] = wrapper.factors()
        elif isinstance(wrapper, LoraLinear):
            a = np.asarray(jax.device_get(wrapper.lora_a[...]))
            found[path] = (a, np.asarray(jax.device_get(wrapper.lora_b[...])), float(wrapper.scale))
    return found


# ----------------------------------------------------------------------------
# Per-member learning rates.
# ----------------------------------------------------------------------------


class MemberLearningRate(NamedTuple):
    """Optimizer state holding one member's peak learning rate (mapped over K)."""

    learning_rate: jax.Array


def scale_by_member_learning_rate() -> optax.GradientTransformation:
    """Multiply updates by the learning rate held in the state (set per member)."""

    def init(params) -> MemberLearningRate:
        del params
        return MemberLearningRate(jnp.ones((), jnp.float32))

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * state.learning_rate.astype(u.dtype), updates), state

    return optax.GradientTransformation(init, update)


def with_member_learning_rate(optimizer: PeftOptimizer) -> PeftOptimizer:
    """``optimizer`` (built at peak rate 1) followed by the member's rate, keeping its labels."""
    return optimizer.carrying(optax.chain(optimizer, scale_by_member_learning_rate()))


# ----------------------------------------------------------------------------
# Block RMS over a member's own entries (Adafactor).
# ----------------------------------------------------------------------------

# The rank axis of a MaskedLoraLinear's factors, by attribute name: A is (in..., R), B is (R, out...).
_RANK_AXES = {"lora_a": -1, "lora_b": 0}
# optax.adafactor's defaults, which runner.build_optimizer uses.
_ADAFACTOR_CLIP = 1.0
_ADAFACTOR_MIN_SCALE = 1e-3
ADAFACTOR_MIN_DIM_TO_FACTOR = 128


class MemberRank(NamedTuple):
    """A member's rank r, for transformations that count only its own entries.
    Infinite (every entry is the member's own) until ``build_batched_state`` sets it."""

    member_rank: jax.Array


def _own_entries(path, leaf: jax.Array, rank: jax.Array) -> jax.Array:
    """How many of ``leaf``'s entries are the member's: all, or r of the R rank slots."""
    names = [key.key for key in path if isinstance(key, jax.tree_util.DictKey)]
    axis = _RANK_AXES.get(names[-1]) if names else None
    if axis is None:
        return jnp.asarray(leaf.size, jnp.float32)
    slots = leaf.shape[axis]
    return jnp.minimum(rank, slots) * (leaf.size // slots)


def _own_rms(path, x: jax.Array, rank: jax.Array) -> jax.Array:
    """sqrt(sum(x^2) / own entries): the padding is zero, so only the count differs from a mean."""
    return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))) / _own_entries(path, x, rank))


def _member_rank_transform(update_leaf) -> optax.GradientTransformation:
    def init(params) -> MemberRank:
        del params
        return MemberRank(jnp.asarray(jnp.inf, jnp.float32))

    def update(updates, state, params=None):
        return update_leaf(updates, params, state.member_rank), state

    return optax.GradientTransformation(init, update)


def clip_by_member_block_rms(threshold: float) -> optax.GradientTransformation:
    """``optax.clip_by_block_rms`` with each array's RMS over the member's own entries."""

    def clip(updates, params, rank):
        del params
        return jax.tree_util.tree_map_with_path(
            lambda p, u: u / jnp.maximum(1.0, _own_rms(p, u, rank) / threshold).astype(u.dtype), updates)

    return _member_rank_transform(clip)


def scale_by_member_param_block_rms(min_scale: float = _ADAFACTOR_MIN_SCALE) -> optax.GradientTransformation:
    """``optax.scale_by_param_block_rms`` with each parameter's RMS over the member's own entries."""

    def scale(updates, params, rank):
        return jax.tree_util.tree_map_with_path(
            lambda p, u, w: u * jnp.maximum(_own_rms(p, w, rank), min_scale).astype(u.dtype), updates, params)

    return _member_rank_transform(scale)


def member_adafactor(learning_rate) -> optax.GradientTransformation:
    """``optax.adafactor(learning_rate)`` (its defaults, as ``runner.build_optimizer``
    builds it) with both block RMS taken over a member's own entries."""
    return optax.chain(
        optax.scale_by_factored_rms(min_dim_size_to_factor=ADAFACTOR_MIN_DIM_TO_FACTOR),
        clip_by_member_block_rms(_ADAFACTOR_CLIP),
        optax.scale_by_learning_rate(learning_rate, flip_sign=False),
        scale_by_member_param_block_rms(),
        optax.scale(-1.0),
    )


def set_member_rank(opt_state, rank: int):
    """``opt_state`` with every ``MemberRank`` set to ``rank`` (unchanged for optimizers without one)."""
    if not optax.tree_utils.tree_get_all_with_path(opt_state, "member_rank"):
        return opt_state
    return optax.tree_utils.tree_set(opt_state, member_rank=jnp.asarray(rank, jnp.float32))


# ----------------------------------------------------------------------------
# The stacked state.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Member:
    """One configuration in a batched program: a rank and a peak learning rate."""

    rank: int
    learning_rate: float


@struct.dataclass
class BatchedLoraState(TrainState):
    """K train states sharing one frozen base.

    ``step``, ``trainable``, ``opt_state`` and ``rest`` have a leading axis of
    size K; ``frozen`` is the base, once. ``member(i)`` is member i as an
    ordinary ``TrainState`` (its model is the padded, masked one, which
    computes exactly the rank-r LoRA).
    """

    members: tuple[Member, ...] = struct.field(pytree_node=False)

    @property
    def size(self) -> int:
        return len(self.members)

    def member(self, index: int) -> TrainState:
        take = functools.partial(jax.tree.map, lambda x: x[index])
        return TrainState(
            step=self.step[index],
            trainable=take(self.trainable),
            opt_state=take(self.opt_state),
            rest=take(self.rest),
            frozen=self.frozen,
            static=self.static,
        )

    def per_member_bytes(self) -> int:
        """Bytes of one member's own state: adapters (+ trained head), optimizer
        state, RNG counters, scale, mask and step counter."""
        leaves = jax.tree.leaves((self.step, self.trainable, self.opt_state, self.rest))
        return sum(_nbytes(leaf) for leaf in leaves) // self.size

    def frozen_bytes(self) -> int:
        return sum(_nbytes(leaf) for leaf in jax.tree.leaves(self.frozen))

    def on_mesh(self, mesh: Mesh) -> BatchedLoraState:
        """Every buffer replicated over ``mesh``: the placement the step's outputs
        get, so that the second step finds the first one's program (a state left on
        its default device would compile the step twice)."""
        placement = NamedSharding(mesh, PartitionSpec())
        put = functools.partial(jax.device_put, device=placement)
        return self.replace(step=put(self.step), trainable=put(self.trainable), opt_state=put(self.opt_state),
                            rest=put(self.rest), frozen=put(self.frozen))


def _nbytes(leaf) -> int:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(leaf).nbytes
    return leaf.nbytes


def _by_path(state) -> dict[str, jax.Array]:
    return {jax.tree_util.keystr(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}


def _pad_to(value: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Zero padding at the end of each axis (only the rank axis differs)."""
    if value.shape == shape:
        return jnp.copy(value)
    if len(value.shape) != len(shape) or any(v > s for v, s in zip(value.shape, shape)):
        raise PeftError(f"cannot pad an array of shape {value.shape} to {shape}")
    return jnp.pad(value, [(0, s - v) for v, s in zip(value.shape, shape)])


def _filled(template, source: dict[str, jax.Array]):
    """``template`` with every leaf that ``source`` has (by path) replaced by
    ``source``'s value, zero-padded to the template's shape."""

    def fill(path, leaf):
        found = source.get(jax.tree_util.keystr(path))
        return jnp.copy(leaf) if found is None else _pad_to(found, leaf.shape)

    return jax.tree_util.tree_map_with_path(fill, template)


def build_batched_state(
    model: nnx.Module,
    template: LoraConfig,
    members: Sequence[Member],
    make_tx: Callable[[float], optax.GradientTransformation],
    *,
    adapter_name: str = ADAPTER_NAME,
    reuse_static: _Static | None = None,
) -> tuple[BatchedLoraState, list[ParamCount]]:
    """Stack ``members`` (ranks and rates of ``template``) over one base ``model``.

    ``model`` is the base without adapters (it may carry a trained head through
    ``template.also_train``); ``make_tx(peak_lr)`` builds the optimizer (with
    its schedule) for a peak learning rate. Each member's starting point is
    what ``apply(model, replace(template, rank=r))`` draws. Returns the state
    and each member's parameter counts (as its own rank-r model counts them).
    ``model`` is left with the padded, masked adapter applied.

    ``reuse_static``: an earlier state's ``static`` (graph definition and
    optimizer), used when this state's graph is the same, so that a
    ``BatchedTrainStep`` finds its compiled program instead of compiling again
    (another seed of the same sweep: same members, optimizer config and steps).
    The caller vouches that ``make_tx`` builds the same optimizer as before.
    """
    if not members:
        raise PeftError("a batched program needs at least one member")
    padded_rank = max(m.rank for m in members)
    own: list[tuple[dict, dict]] = []
    counts = []
    for member in members:
        apply(model, dataclasses.replace(template, rank=member.rank), adapter_name=adapter_name)
        optimizer = make_optimizer(model, make_tx(member.learning_rate))
        state = TrainState.create(model, optimizer)
        own.append((_by_path(state.trainable), _by_path(state.rest)))
        counts.append(count_params(model, optimizer.labels))
        delete_adapter(model, adapter_name)

    # The padded adapter's own draws are overwritten by the members' below; seed 0 keeps its
    # recorded config (part of the graph definition) the same for every seed of a sweep.
    apply(model, dataclasses.replace(template, rank=padded_rank, seed=0), adapter_name=adapter_name)
    swapped = set(mask_lora_wrappers(model, adapter_name))
    optimizer = with_member_learning_rate(make_optimizer(model, make_tx(1.0)))
    base = TrainState.create(model, optimizer)
    masked = [w for p, w in iter_wrappers(model) if p in swapped]

    trainables, rests, opt_states = [], [], []
    for member, (own_trainable, own_rest) in zip(members, own):
        for wrapper in masked:
            wrapper.scale[...] = jnp.asarray(dataclasses.replace(template, rank=member.rank).scale, jnp.float32)
            wrapper.rank_mask[...] = (jnp.arange(padded_rank) < member.rank).astype(jnp.float32)
        rest_template = nnx.state(model, base.static.rest_filter)
        trainable = _filled(base.trainable, own_trainable)
        trainables.append(trainable)
        rests.append(_filled(rest_template, own_rest))
        inner, _ = optimizer.init(trainable)
        inner = set_member_rank(inner, member.rank)
        opt_states.append((inner, MemberLearningRate(jnp.asarray(member.learning_rate, jnp.float32))))
    for wrapper in masked:  # the model itself stays a full-rank member with scale of rank R
        wrapper.scale[...] = jnp.asarray(dataclasses.replace(template, rank=padded_rank).scale, jnp.float32)
        wrapper.rank_mask[...] = jnp.ones((padded_rank,), jnp.float32)

    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
    state = BatchedLoraState(
        step=jnp.zeros((len(members),), jnp.int32),
        trainable=stack(trainables),
        opt_state=stack(opt_states),
        rest=stack(rests),
        frozen=base.frozen,
        static=reuse_static if reuse_static is not None and reuse_static.graphdef == base.graphdef else base.static,
        members=tuple(members),
    )
    return state, counts


# ----------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------


class BatchedTrainStep(TrainStep):
    """``step(state, batch) -> (state, metrics)`` for a ``BatchedLoraState``.

    The single-run update of ``TrainStep`` (gradient accumulation included)
    under ``jax.vmap``: member state on axis 0, frozen base and batch
    broadcast. Metrics come back with a leading axis of size K. Everything
    else (compiling, donating the member buffers, ``lower``) is ``TrainStep``'s.
    """

    def _update(self, static: _Static, carry, frozen: nnx.State, batch):
        member_update = functools.partial(super()._update, static)
        return jax.vmap(member_update, in_axes=(0, None, None))(carry, frozen, batch)
