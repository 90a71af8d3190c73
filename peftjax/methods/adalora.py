"""AdaLoRA (Zhang et al. 2023): LoRA in SVD form, with a rank budget pruned across modules.

Each adapted layer computes

    h = W x + s * B diag(E) A dropout(x),   s = alpha / (r + 1e-5)

with A (in -> r) and B (r -> out) the right and left "singular vectors" and E
the r "singular values"; r is ``init_rank`` and s stays at its initial value
when triplets are pruned (as HF PEFT's ``ranknum``). E starts at zero and A, B
at normal(0, 0.02), so the wrapped model starts unchanged.

Training (``AdaLoraConfig.wrap_optimizer``, the ``rank_allocator``
transformation around the labelled optimizer) adds what makes it AdaLoRA:

* the orthogonality regulariser ``orth_reg_weight * mean over A and B of
  ||A^T A - I||_F`` (``||B B^T - I||_F``), added to the loss's gradient;
* after each optimizer step t (counted from 0), the importance of every entry
  of A, E and B, I = |w * g| (parameter after the step, gradient of the step,
  regulariser included), smoothed by EMAs: sensitivity ``I_bar = beta1 I_bar
  + (1 - beta1) I`` and uncertainty ``U_bar = beta2 U_bar + (1 - beta2) |I -
  I_bar|``; a triplet's score is its E entry's ``I_bar U_bar`` plus the means
  of its A column's and its B row's;
* the cubic budget schedule: ``initial_steps`` steps at the initial budget
  (r per module), then ``b(t) = floor((b_0 - b_T) (1 - (t - t_i) / (T - t_f -
  t_i))^3 + b_T)`` down to ``target_rank`` per module, reached at ``T -
  final_steps``; every ``mask_interval`` steps the ``b_0 - b(t)`` triplets of
  lowest score (ties included) get E = 0;
* at step ``T - final_steps`` a last allocation at the target budget fixes the
  kept triplets, which hold for the remaining steps (E of the others stays 0).

These are HF PEFT's ``RankAllocator`` and ``AdaLoraModel.update_and_allocate``
called after each ``optimizer.step()`` with the step's index, its gradients and
an optimizer without clipping: ``tests/methods/test_adalora_parity.py`` trains
a tiny model both ways and compares the parameters, the EMAs, the budgets and
the masked triplets after every step. Gradient clipping in ``optim`` acts
inside the allocator, on the gradient with the regulariser's part; the
importance uses that gradient before clipping.

The kept ranks per module (``kept_ranks``) are the adapter's allocation; as a
LoRA ``rank_pattern`` (``as_lora_config``) they can be retrained as plain
LoRA. There is no HF PEFT file form here: save in peftjax's format.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from peftjax.core.inject import iter_wrappers
from peftjax.core.kernels import SUPPORTED_LAYERS
from peftjax.core.layouts import low_rank_layout
from peftjax.errors import PeftError
from peftjax.methods.base import FROZEN, AdapterWrapper, MethodConfig, register_method
from peftjax.methods.lora import LoraConfig
from peftjax.variables import AdapterParam

# HF PEFT's AdaLoRA initialisation: E = 0, A and B normal with this standard deviation.
INIT_STD = 0.02
# Added to the rank in the scale, as HF PEFT's ``ranknum + 1e-5``.
RANK_EPS = 1e-5


class AdaLoraA(AdapterParam):
    """Right singular vectors A, shaped (*input axes, r)."""


class AdaLoraE(AdapterParam):
    """Singular values E, shaped (r,)."""


class AdaLoraB(AdapterParam):
    """Left singular vectors B, shaped (r, *output axes)."""


@register_method("adalora")
@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaLoraConfig(MethodConfig):
    """AdaLoRA on linear, einsum and convolution layers (see the module docstring).

    Attributes:
      init_rank: r, each module's rank before pruning (HF PEFT's ``init_r``).
      target_rank: the average rank per module after pruning (``target_r``);
        the final budget is ``target_rank`` x the number of modules.
      total_steps: the optimizer steps of the run (``total_step``).
      initial_steps: steps at the full budget before pruning starts (``tinit``).
      final_steps: steps at the final allocation at the end (``tfinal``).
      mask_interval: steps between two allocations while the budget falls (``deltaT``).
      beta1, beta2: EMA factors of sensitivity and uncertainty.
      orth_reg_weight: weight of the orthogonality regulariser.
      alpha: scaling numerator; s = alpha / (init_rank + 1e-5).
      dropout: dropout rate on the adapter's input, in [0, 1).
    """

    target_types = SUPPORTED_LAYERS + (nnx.Conv,)
    default_targets = {  # HF PEFT's TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING
        **dict.fromkeys(("bert", "roberta"), ("query", "value")),
        **dict.fromkeys(("llama", "mistral", "qwen2"), ("q_proj", "v_proj")),
    }

    init_rank: int = 12
    target_rank: int = 8
    total_steps: int
    initial_steps: int = 0
    final_steps: int = 0
    mask_interval: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    alpha: float = 8.0
    dropout: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        positive = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
        self.check(positive(self.init_rank), "init_rank", "must be a positive integer")
        self.check(positive(self.target_rank), "target_rank", "must be a positive integer")
        self.check(
            self.target_rank <= self.init_rank, "target_rank",
            f"must be at most init_rank={self.init_rank}: pruning only removes triplets; raise init_rank or lower "
            "target_rank",
        )
        self.check(positive(self.total_steps), "total_steps", "must be a positive integer (the run's optimizer steps)")
        self.check(isinstance(self.initial_steps, int) and self.initial_steps >= 0, "initial_steps", "must be >= 0")
        self.check(isinstance(self.final_steps, int) and self.final_steps >= 0, "final_steps", "must be >= 0")
        self.check(
            self.initial_steps < self.total_steps - self.final_steps, "initial_steps",
            f"leaves no steps to prune in: initial_steps ({self.initial_steps}) must be below total_steps - "
            f"final_steps ({self.total_steps} - {self.final_steps}); lower initial_steps or final_steps",
        )
        self.check(positive(self.mask_interval), "mask_interval", "must be a positive integer")
        self.check(0 < self.beta1 < 1, "beta1", "must be in (0, 1)")
        self.check(0 < self.beta2 < 1, "beta2", "must be in (0, 1)")
        self.check(self.orth_reg_weight >= 0, "orth_reg_weight", "must be >= 0")
        self.check(self.alpha > 0, "alpha", "must be > 0")
        self.check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")

    @property
    def scale(self) -> float:
        return self.alpha / (self.init_rank + RANK_EPS)

    def wrap(self, module, *, adapter_name, rngs):
        return AdaLoraLinear(module, self, adapter_name=adapter_name, rngs=rngs)

    def wrap_optimizer(self, tx, model, adapter_name, labels):
        modules = [path for path, w in iter_wrappers(model)
                   if isinstance(w, AdaLoraLinear) and w.adapter_name == adapter_name
                   and labels.get(f"{path}.lora_e") not in (None, FROZEN)]
        return rank_allocator(tx, self, modules) if modules else tx  # an inactive or frozen adapter: no pruning

    def budget_schedule(self, modules: int) -> tuple[np.ndarray, np.ndarray]:
        """``(budget, allocate)`` per optimizer step t = 0..total_steps: the total rank
        allowed after step t, and whether triplets are masked to it then (HF PEFT's
        ``budget_schedule``, in Python floats as there)."""
        initial, target = self.init_rank * modules, self.target_rank * modules
        total, t_init, t_final = self.total_steps, self.initial_steps, self.final_steps
        budget, allocate = [], []
        for step in range(total + 1):
            if step <= t_init:
                budget.append(initial), allocate.append(False)
            elif step > total - t_final:
                budget.append(target), allocate.append(True)
            else:
                coefficient = 1 - (step - t_init) / (total - t_final - t_init)
                budget.append(int((initial - target) * coefficient**3 + target))
                allocate.append(step % self.mask_interval == 0)
        return np.asarray(budget, np.int32), np.asarray(allocate)


def _init_factors(layout, config: AdaLoraConfig, dtype, rngs: nnx.Rngs):
    a = INIT_STD * jax.random.normal(rngs.params(), layout.down_shape(config.init_rank), jnp.float32)
    b = INIT_STD * jax.random.normal(rngs.params(), layout.up_shape(config.init_rank), jnp.float32)
    return a.astype(dtype), jnp.zeros((config.init_rank,), dtype), b.astype(dtype)


class AdaLoraLinear(AdapterWrapper):
    """A linear, einsum or convolution layer plus s * B diag(E) A."""

    def __init__(self, base: nnx.Module, config: AdaLoraConfig, *, adapter_name: str, rngs: nnx.Rngs):
        super().__init__(base, adapter_name=adapter_name)
        if isinstance(self.base_layer, nnx.Embed):
            raise PeftError("AdaLoRA adapts linear, einsum and convolution layers, not embedding tables")
        self.layout = low_rank_layout(self.base_layer)
        self.scale = config.scale
        a, e, b = _init_factors(self.layout, config, self.base_layer.param_dtype, rngs)
        self.lora_a, self.lora_e, self.lora_b = AdaLoraA(a), AdaLoraE(e), AdaLoraB(b)
        self.dropout = nnx.Dropout(config.dropout, rngs=rngs) if config.dropout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.base(x)
        if not self.adds_output:
            return y
        dtype = self.base_layer.dtype or x.dtype
        h = x if self.dropout is None else self.dropout(x)
        a = self.lora_a[...].astype(dtype) * self.lora_e[...].astype(dtype)  # E scales A's rank axis (its last)
        h = self.layout.project_down(h.astype(dtype), a)
        return y + self.scale * self.layout.project_up(h, self.lora_b[...].astype(dtype)).astype(y.dtype)

    def delta_kernel(self) -> jax.Array:
        """s * (A diag(E)) B in the base kernel's layout, in float32."""
        a = self.lora_a[...].astype(jnp.float32) * self.lora_e[...].astype(jnp.float32)
        return self.scale * self.layout.kernel_from_factors(a, self.lora_b[...].astype(jnp.float32))

    def _merge(self) -> None:
        kernel = getattr(self.base_layer, self.layout.weight_name)
        kernel[...] = (kernel[...].astype(jnp.float32) + self.delta_kernel()).astype(kernel.dtype)

    def _unmerge(self) -> None:
        kernel = getattr(self.base_layer, self.layout.weight_name)
        kernel[...] = (kernel[...].astype(jnp.float32) - self.delta_kernel()).astype(kernel.dtype)


# ----------------------------------------------------------------------------
# The rank allocator: an optax transformation around the labelled optimizer.
# ----------------------------------------------------------------------------

_FACTORS = ("lora_a", "lora_e", "lora_b")


class RankAllocatorState(NamedTuple):
    """The allocator's state: step count, EMAs of importance per factor entry, kept triplets per module."""

    count: jax.Array
    sensitivity: dict[str, dict[str, jax.Array]]  # module -> factor -> I_bar
    uncertainty: dict[str, dict[str, jax.Array]]  # module -> factor -> U_bar
    keep: dict[str, jax.Array]  # module -> (r,) bool
    inner_state: Any


def _leaf_names(tree) -> list[str]:
    """Dotted names of ``tree``'s leaves (an ``nnx.State``'s arrays, without ``.value``)."""
    return [".".join(str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey))
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _as_matrix(factor: str, value: jax.Array) -> jax.Array:
    """A as (in, r), B as (r, out): the rank axis last for A, first for B."""
    return value.reshape(-1, value.shape[-1]) if factor == "lora_a" else value.reshape(value.shape[0], -1)


def orthogonality_penalty(factors: Mapping[str, Mapping[str, jax.Array]]) -> jax.Array:
    """Mean over every A and B of ||A^T A - I||_F and ||B B^T - I||_F (HF PEFT's regulariser)."""
    terms = []
    for module in factors.values():
        a, b = _as_matrix("lora_a", module["lora_a"]), _as_matrix("lora_b", module["lora_b"])
        for gram in (a.T @ a, b @ b.T):
            eye = jnp.eye(gram.shape[0], dtype=gram.dtype)
            terms.append(optax.safe_norm(gram - eye, 0.0))
    return sum(terms) / len(terms)


def triplet_scores(sensitivity, uncertainty) -> dict[str, jax.Array]:
    """Per module, each triplet's score: its E entry's I_bar U_bar plus the means of its
    A column's and its B row's."""
    scores = {}
    for module, emas in sensitivity.items():
        entry = {f: emas[f] * uncertainty[module][f] for f in _FACTORS}
        a, b = _as_matrix("lora_a", entry["lora_a"]), _as_matrix("lora_b", entry["lora_b"])
        scores[module] = entry["lora_e"] + a.mean(axis=0) + b.mean(axis=1)
    return scores


def rank_allocator(inner: optax.GradientTransformation, config: AdaLoraConfig, modules: list[str]):
    """``inner`` with AdaLoRA's regulariser, importance EMAs, budget schedule and masking
    of the ``modules``' triplets (see the module docstring)."""
    if not modules:
        raise PeftError("AdaLoRA's rank allocator found no AdaLoRA module; apply an AdaLoraConfig first")
    budgets, allocate = config.budget_schedule(len(modules))
    initial_budget = config.init_rank * len(modules)
    pruning_end = config.total_steps - config.final_steps
    inner = optax.with_extra_args_support(inner)

    def locate(tree) -> dict[str, dict[str, int]]:
        index = {name: i for i, name in enumerate(_leaf_names(tree))}
        try:
            return {m: {f: index[f"{m}.{f}"] for f in _FACTORS} for m in modules}
        except KeyError as err:
            raise PeftError(f"AdaLoRA factor {err.args[0]} is not trainable; do not freeze AdaLoRA's parameters")\
                from None

    def gather(leaves, where):
        return {m: {f: leaves[i] for f, i in fs.items()} for m, fs in where.items()}

    def init(params) -> RankAllocatorState:
        leaves = jax.tree.leaves(params)
        factors = gather(leaves, locate(params))
        zeros = lambda: jax.tree.map(jnp.zeros_like, factors)  # noqa: E731 - two buffers: the step donates both
        keep = {m: jnp.ones((config.init_rank,), bool) for m in modules}
        return RankAllocatorState(jnp.zeros((), jnp.int32), zeros(), zeros(), keep, inner.init(params))

    def update(grads, state: RankAllocatorState, params=None, **extra):
        if params is None:
            raise PeftError("AdaLoRA's rank allocator needs the parameters in update()")
        where = locate(params)
        treedef = jax.tree.structure(params)
        p_leaves, g_leaves = jax.tree.leaves(params), jax.tree.leaves(grads)
        factors = gather(p_leaves, where)
        if config.orth_reg_weight:
            penalty_grads = jax.grad(orthogonality_penalty)(factors)
            for m, fs in where.items():
                for f in ("lora_a", "lora_b"):
                    g_leaves[fs[f]] = g_leaves[fs[f]] + config.orth_reg_weight * penalty_grads[m][f]
        grads = jax.tree.unflatten(treedef, g_leaves)
        updates, inner_state = inner.update(grads, state.inner_state, params, **extra)
        u_leaves = jax.tree.leaves(updates)

        step = state.count
        new = {m: {f: p_leaves[i] + u_leaves[i] for f, i in fs.items()} for m, fs in where.items()}
        step_grads = gather(g_leaves, where)
        importance = jax.tree.map(lambda w, g: jnp.abs(w * g), new, step_grads)
        sensitivity = jax.tree.map(lambda s, i: config.beta1 * s + (1 - config.beta1) * i,
                                   state.sensitivity, importance)
        uncertainty = jax.tree.map(lambda u, i, s: config.beta2 * u + (1 - config.beta2) * jnp.abs(i - s),
                                   state.uncertainty, importance, sensitivity)
        pruning = step < pruning_end
        sensitivity = jax.tree.map(lambda n, o: jnp.where(pruning, n, o), sensitivity, state.sensitivity)
        uncertainty = jax.tree.map(lambda n, o: jnp.where(pruning, n, o), uncertainty, state.uncertainty)

        at = jnp.minimum(step, config.total_steps)
        budget, allocating = jnp.asarray(budgets)[at], jnp.asarray(allocate)[at]
        scores = triplet_scores(sensitivity, uncertainty)
        flat = jnp.concatenate([scores[m] for m in modules])
        pruned = jnp.clip(initial_budget - budget, 1, flat.size)
        threshold = jnp.sort(flat)[pruned - 1]
        allocated = {m: scores[m] > threshold for m in modules}
        reallocate = (pruning & allocating) | (step == pruning_end)
        keep = {m: jnp.where(reallocate, allocated[m], state.keep[m]) for m in modules}
        masking = reallocate | (step > pruning_end)
        for m, fs in where.items():
            i = fs["lora_e"]
            masked = masking & ~keep[m]
            u_leaves[i] = jnp.where(masked, -p_leaves[i], u_leaves[i])  # E after the step: exactly 0
        # The last allocation ends the importance estimates (HF PEFT resets them).
        ended = step == pruning_end
        sensitivity = jax.tree.map(lambda s: jnp.where(ended, 0.0, s), sensitivity)
        uncertainty = jax.tree.map(lambda u: jnp.where(ended, 0.0, u), uncertainty)
        state = RankAllocatorState(step + 1, sensitivity, uncertainty, keep, inner_state)
        return jax.tree.unflatten(treedef, u_leaves), state

    return optax.GradientTransformationExtraArgs(init, update)


# ----------------------------------------------------------------------------
# The allocation, read back.
# ----------------------------------------------------------------------------


def allocator_state(opt_state) -> RankAllocatorState:
    """The ``RankAllocatorState`` inside an optimizer state (one AdaLoRA adapter)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, RankAllocatorState))
             if isinstance(s, RankAllocatorState)]
    if len(found) != 1:
        raise PeftError(f"expected one AdaLoRA rank allocator in the optimizer state, found {len(found)}")
    return found[0]


def kept_ranks(opt_state) -> dict[str, int]:
    """``{module path: rank}``: how many triplets each module keeps now."""
    keep = allocator_state(opt_state).keep
    return {m: int(np.asarray(jax.device_get(k)).sum()) for m, k in keep.items()}


def hf_rank_pattern(opt_state, adapter_name: str = "default") -> dict[str, list[bool]]:
    """The kept triplets as HF PEFT's ``AdaLoraConfig.rank_pattern``: ``{"<module>.lora_E.<adapter>": [bool] * r}``."""
    keep = allocator_state(opt_state).keep
    return {f"{m}.lora_E.{adapter_name}": np.asarray(jax.device_get(k)).tolist() for m, k in keep.items()}


def as_lora_config(config: AdaLoraConfig, ranks: Mapping[str, int], **lora_fields: Any) -> LoraConfig:
    """A LoRA config that trains the allocation ``ranks`` (``{module path: rank}``) as plain
    LoRA: ``rank_pattern`` per module, modules left with no triplet excluded. ``lora_fields``
    (``alpha``, ``rslora``, ...) go to the ``LoraConfig``; ``rank`` defaults to ``target_rank``."""
    live = {m: r for m, r in ranks.items() if r > 0}
    if not live:
        raise PeftError("every module lost all its triplets; nothing to train as LoRA")
    fields = {"rank": config.target_rank, "alpha": config.alpha, "dropout": config.dropout, **lora_fields}
    return LoraConfig(
        targets=tuple(live), exclude=config.exclude, also_train=config.also_train, seed=config.seed,
        rank_pattern={re.escape(m): r for m, r in live.items()}, **fields,
    )


def trainable_after_pruning(model: nnx.Module, ranks: Mapping[str, int]) -> int:
    """Adapter parameters the kept triplets use: per module r_kept (fan_in + fan_out + 1)."""
    total = 0
    for path, wrapper in iter_wrappers(model):
        if isinstance(wrapper, AdaLoraLinear) and path in ranks:
            per_rank = math.prod(wrapper.lora_a.shape[:-1]) + math.prod(wrapper.lora_b.shape[1:]) + 1
            total += ranks[path] * per_rank
    return total
