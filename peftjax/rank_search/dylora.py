"""DyLoRA (Valipour et al. 2023): every rank up to r_max from one training run.

One LoRA of rank r_max is trained on nested truncations: each optimizer step
draws b uniformly from ``min_rank``..``max_rank`` and trains the rank-b LoRA
made of the first b rank slots, A[..., :b] and B[:b], with a rank-b LoRA's
scale (alpha / b, or alpha / sqrt(b) with rsLoRA). Every prefix is thereby
trained as a LoRA of its own rank, and after training rank r is read off the
one adapter by keeping its first r slots.

The truncation is ``MaskedLoraLinear``'s rank mask (``peftjax.rank_search.batched``),
set inside the jitted step from b: b is data, so one compiled program serves
every b. A DyLoRA run is a ``BatchedLoraState`` whose members (usually one) are
at ``max_rank``; the step draws b per member from its seed and step count.
Slots past b get zero gradients at that step (the mask multiplies them out);
an optimizer with momentum still moves them by their earlier moments, as in
the paper's ``b``-sampling without freezing.

``set_rank(model, r, template)`` truncates a trained model to rank r for
evaluation (the mask and scale are variables, so evaluating every rank reuses
one compiled evaluation program).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.core.inject import iter_wrappers
from peftjax.errors import PeftError
from peftjax.methods.lora import LoraConfig
from peftjax.rank_search.batched import BatchedTrainStep, LoraScale, MaskedLoraLinear, RankMask
from peftjax.train.state import LossFn, _Static


def lora_scale(template: LoraConfig, rank):
    """A rank-``rank`` LoRA's scale under ``template`` (``rank`` may be traced)."""
    return template.alpha / (jnp.sqrt(rank) if template.rslora else rank)


def _truncate(variable: nnx.Variable, rank: jax.Array, template: LoraConfig):
    if isinstance(variable, RankMask):
        slots = variable.shape[-1]
        return variable.replace((jnp.arange(slots) < rank).astype(variable.dtype))
    if isinstance(variable, LoraScale):
        return variable.replace(jnp.asarray(lora_scale(template, rank.astype(jnp.float32)), variable.dtype))
    return variable


def truncated(rest: nnx.State, rank: jax.Array, template: LoraConfig) -> nnx.State:
    """``rest`` (one member's non-parameter state) with every rank mask keeping the
    first ``rank`` slots and every LoRA scale that of rank ``rank``."""
    return jax.tree.map(lambda v: _truncate(v, rank, template), rest,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))


def set_rank(model: nnx.Module, rank: int, template: LoraConfig) -> None:
    """Truncate every ``MaskedLoraLinear`` of ``model`` to its first ``rank`` slots, with
    a rank-``rank`` LoRA's scale: the model then computes that rank-``rank`` LoRA."""
    wrappers = [w for _, w in iter_wrappers(model) if isinstance(w, MaskedLoraLinear)]
    if not wrappers:
        raise PeftError("no masked LoRA wrapper to truncate; build the model with build_batched_state")
    for wrapper in wrappers:
        slots = wrapper.rank_mask.shape[-1]
        if not 1 <= rank <= slots:
            raise PeftError(f"rank {rank} is outside 1..{slots}, the ranks this adapter was trained for")
        wrapper.rank_mask[...] = (jnp.arange(slots) < rank).astype(wrapper.rank_mask.dtype)
        wrapper.scale[...] = jnp.asarray(lora_scale(template, float(rank)), wrapper.scale.dtype)


class DyLoraTrainStep(BatchedTrainStep):
    """The batched step with each member truncated, before its update, to a rank b drawn
    uniformly from ``min_rank``..``max_rank`` (from ``seed`` and the member's step count);
    the metrics hold each member's b under ``"rank"``."""

    def __init__(self, loss_fn: LossFn, template: LoraConfig, *, max_rank: int, min_rank: int = 1, seed: int = 0,
                 grad_accum: int = 1):
        if not isinstance(max_rank, int) or max_rank < 1:
            raise PeftError(f"DyLoRA's max_rank must be a positive integer, got {max_rank!r}")
        if not isinstance(min_rank, int) or not 1 <= min_rank <= max_rank:
            raise PeftError(f"DyLoRA's min_rank must be an integer from 1 to max_rank={max_rank}, got {min_rank!r}")
        super().__init__(loss_fn, grad_accum=grad_accum)
        self.template, self.max_rank, self.min_rank, self.seed = template, max_rank, min_rank, seed

    def sampled_rank(self, step: jax.Array) -> jax.Array:
        """b for a member at ``step`` (its count of steps taken so far)."""
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        return jax.random.randint(key, (), self.min_rank, self.max_rank + 1)

    def _update(self, static: _Static, carry, frozen: nnx.State, batch):
        step, trainable, opt_state, rest = carry
        ranks = jax.vmap(self.sampled_rank)(step)
        rest = jax.vmap(lambda r, b: truncated(r, b, self.template))(rest, ranks)
        carry, metrics = super()._update(static, (step, trainable, opt_state, rest), frozen, batch)
        return carry, {**metrics, "rank": ranks}

