"""Domain-adversarial training (DANN; Ganin & Lempitsky 2015, "Unsupervised Domain
Adaptation by Backpropagation"; Ganin et al. 2016, JMLR).

A domain classifier learns to tell source features from target features; a
gradient reversal layer between it and the model sends the classifier's
gradient back to the model negated and scaled by ``lambda_p``, so the same
loss that trains the classifier trains the model to make the domains
indistinguishable:

    E = L_task(source) + L_domain(D(R(f(source))), D(R(f(target))))
    R(x) = x forward,   dR/dx = -lambda_p I backward
    lambda_p = weight * (2 / (1 + exp(-gamma p)) - 1),   p = progress in [0, 1]

``f`` is the pooled feature of the model (``StepContext.features``). The
schedule starts the reversal at 0, while the features are still noise to the
classifier, and brings it to ``weight``. The classifier is the strategy's
module (``training_strategies.dann``): it trains under the label ``dann``
at the run's rate, and its step counter gives ``p``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from peftjax.methods.base import LabelRule
from peftjax.schema import require
from peftjax.strategies.base import StepContext, register_strategy
from peftjax.strategies.target_domain import TARGET, TargetDomainStrategy
from peftjax.train.session import MAIN
from peftjax.train.tasks import pooled_width


@jax.custom_vjp
def reverse_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
    """The identity forward; ``-scale * g`` backward (no gradient to ``scale``)."""
    return x


def _reverse_forward(x, scale):
    return x, scale


def _reverse_backward(scale, g):
    return (-scale * g).astype(g.dtype), jnp.zeros_like(scale)


reverse_gradient.defvjp(_reverse_forward, _reverse_backward)


def reversal_schedule(progress: jax.Array, gamma: float = 10.0) -> jax.Array:
    """Ganin & Lempitsky's ``2 / (1 + exp(-gamma p)) - 1``: 0 at p = 0, near 1 at p = 1."""
    return 2.0 / (1.0 + jnp.exp(-gamma * progress)) - 1.0


class StepCount(nnx.Variable):
    """Loss-term calls so far (one per micro-batch), carried from step to step."""


class DomainClassifier(nnx.Module):
    """Features -> hidden -> ReLU -> one logit: target (1) or source (0)."""

    def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(features, hidden, rngs=rngs)
        self.output = nnx.Linear(hidden, 1, rngs=rngs)
        self.calls = StepCount(jnp.zeros((), jnp.int32))

    def __call__(self, features_nd: jax.Array) -> jax.Array:
        return self.output(jax.nn.relu(self.hidden(features_nd)))[:, 0]


@register_strategy("dann")
@dataclasses.dataclass(frozen=True, kw_only=True)
class DannConfig(TargetDomainStrategy):
    """Domain-adversarial training against an unlabelled ``target`` stream.

    Attributes:
      target: the target domain's data (a data section; its labels are not used).
      weight: the reversal's final scale, lambda at the end of the run.
      gamma: how fast lambda rises (10 in the paper).
      hidden: width of the domain classifier's hidden layer.
    """

    weight: float = 1.0
    gamma: float = 10.0
    hidden: int = 256

    def _validate(self) -> None:
        super()._validate()
        require(self.weight > 0, "weight", f"must be positive, got {self.weight}")
        require(self.gamma > 0, "gamma", f"must be positive, got {self.gamma}")
        require(self.hidden >= 1, "hidden", f"must be at least 1, got {self.hidden}")

    def setup(self, model: nnx.Module, *, rngs: nnx.Rngs) -> nnx.Module:
        return DomainClassifier(pooled_width(model), self.hidden, rngs=rngs)

    def label_rules(self, model: nnx.Module, stage: int) -> list[LabelRule]:
        return [(rf"training_strategies\.{self.strategy}\..*", self.strategy)]

    def loss(self, ctx: StepContext) -> tuple[jax.Array, dict[str, jax.Array]]:
        classifier = ctx.module(self)
        calls = ctx.info.total_steps * ctx.info.config.train.grad_accum
        progress = jnp.minimum(classifier.calls[...] / calls, 1.0)
        classifier.calls[...] += 1
        scale = self.weight * reversal_schedule(progress, self.gamma)
        source, target = ctx.features(MAIN), ctx.features(TARGET)
        logits = classifier(reverse_gradient(jnp.concatenate([source, target]), scale))
        domains = jnp.concatenate([jnp.zeros(len(source)), jnp.ones(len(target))])
        term = optax.sigmoid_binary_cross_entropy(logits, domains).mean()
        accuracy = ((logits > 0) == (domains > 0)).mean()
        return term, {"lambda": scale, "domain_accuracy": accuracy}
