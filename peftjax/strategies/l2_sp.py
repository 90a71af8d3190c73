"""L2-SP (Li, Grandvalet and Davoine 2018): regularise towards the pretrained
weights, not towards zero.

    Omega(w) = alpha / 2 * ||w_S - w0_S||^2 + beta / 2 * ||w_new||^2

w_S are the pretrained parameters that the methods train, w0_S their values
at the start of the run (the Starting Point), and w_new the parameters the
run adds (the head, adapters). Weight decay pulls fine-tuned weights to
zero, which for pretrained weights means forgetting; L2-SP pulls them back
to where pre-training left them. Set ``optim.weight_decay: 0`` beside it.

w0 is the model's own starting arrays, held as ``FixedBuffer`` s beside the
frozen parameters: nothing is copied at set-up, the anchor of a parameter
that stays frozen is the frozen parameter's own buffer, and only what
trains costs a second copy (its trainable one). Frozen parameters add
exactly zero. The term is logged as ``l2_sp_loss`` with ``l2_sp_drift``
(||w_S - w0_S||^2) and ``l2_sp_new`` (||w_new||^2).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.core.labels import param_labels
from peftjax.core.layer_groups import layer_groups
from peftjax.methods.base import FROZEN
from peftjax.schema import require
from peftjax.strategies.anchors import Anchors, params_by_path
from peftjax.strategies.base import StepContext, Strategy, register_strategy
from peftjax.variables import AdapterParam


def new_parameters(model: nnx.Module) -> set[str]:
    """Dotted paths of the parameters a fine-tuning run adds: the head's and the adapters'."""
    heads = [path + "." for group in layer_groups(model) if group.kind == "head" for path in group.paths]
    return {path for path, variable in params_by_path(model).items()
            if isinstance(variable, AdapterParam) or any(path.startswith(head) for head in heads)}


class StartingPoint(Anchors):
    """The anchors w0 and the paths of the new parameters (static)."""

    def __init__(self, anchors, new_paths: tuple[str, ...]):
        super().__init__(anchors)
        self.new_paths = new_paths


@register_strategy("l2_sp")
@dataclasses.dataclass(frozen=True, kw_only=True)
class L2SpConfig(Strategy):
    """alpha/2 ||w - w0||^2 on trained pretrained weights, beta/2 ||w||^2 on new ones.

    Attributes:
      alpha: the pull towards the starting point.
      beta: the weight decay of the new parameters (head, adapters).
    """

    alpha: float = 0.01
    beta: float = 0.01

    def _validate(self) -> None:
        require(self.alpha >= 0, "alpha", f"must not be negative, got {self.alpha}")
        require(self.beta >= 0, "beta", f"must not be negative, got {self.beta}")

    def setup(self, model: nnx.Module, *, rngs: nnx.Rngs) -> nnx.Module:
        trained = {path for path, label in param_labels(model).items() if label != FROZEN}
        new = new_parameters(model)
        params = params_by_path(model)
        anchors = {path: params[path].get_value() for path in sorted(trained - new)}
        return StartingPoint(anchors, tuple(sorted(trained & new)))

    def loss(self, ctx: StepContext) -> tuple[jax.Array, dict[str, jax.Array]]:
        start = ctx.module(self)
        drift = start.distance(ctx.model)
        params = params_by_path(ctx.model)
        new = sum((jnp.sum(jnp.square(params[p][...].astype(jnp.float32))) for p in start.new_paths),
                  jnp.zeros((), jnp.float32))
        return self.alpha / 2 * drift + self.beta / 2 * new, {"drift": drift, "new": new}
