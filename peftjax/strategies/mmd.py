"""MMD alignment (the loss of Long et al. 2015, "Learning Transferable Features with
Deep Adaptation Networks", on the pooled features):

    E = L_task(source) + weight * MMD^2_k(f(source), f(target))

with ``k`` the multi-kernel Gaussian of ``peftjax.transfer.divergence.gaussian_mmd2``
(five widths around the batch's mean squared distance, equal weights; DAN
learns the kernel weights and aligns several layers, here one feature and
fixed weights). Each step compares one source batch with one target batch.
"""

from __future__ import annotations

import dataclasses

import jax

from peftjax.schema import require
from peftjax.strategies.base import StepContext, register_strategy
from peftjax.strategies.target_domain import TARGET, TargetDomainStrategy
from peftjax.train.session import MAIN
from peftjax.transfer.divergence import gaussian_mmd2


@register_strategy("mmd")
@dataclasses.dataclass(frozen=True, kw_only=True)
class MmdConfig(TargetDomainStrategy):
    """MMD between source and ``target`` features as a loss term.

    Attributes:
      target: the target domain's data (a data section; its labels are not used).
      weight: the term's factor.
    """

    weight: float = 1.0

    def _validate(self) -> None:
        super()._validate()
        require(self.weight > 0, "weight", f"must be positive, got {self.weight}")

    def loss(self, ctx: StepContext) -> tuple[jax.Array, dict[str, jax.Array]]:
        mmd2 = gaussian_mmd2(ctx.features(MAIN), ctx.features(TARGET))
        return self.weight * mmd2, {"mmd2": mmd2}
