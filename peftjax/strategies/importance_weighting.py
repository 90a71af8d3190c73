"""Importance weighting for covariate shift (Shimodaira 2000; the density ratio from a
domain classifier as in Bickel et al. 2007): the source loss is reweighted by

    w(x) = p_target(x) / p_source(x) = P(T|x) / P(S|x) * n_S / n_T

so that its expectation over the source is the loss's expectation over the
target. Before the first step a logistic regression separates the pooled
features of every source and target example under the initial model (the
pretrained encoder, with adapters that start as the identity); its odds give
``w``, clipped at ``clip`` (a few examples with huge weights would otherwise
be the whole loss) and scaled to mean 1 over the source. The main stream's
examples carry the weights from then on (the task loss is a weighted mean).
The weights are in the run's memory, so a resumed run uses the same ones.

Logged once: the weights' range, the share clipped, and the effective sample
size ``(sum w)^2 / sum w^2`` as a share of the source.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from peftjax.schema import require
from peftjax.strategies.base import register_strategy
from peftjax.strategies.target_domain import TARGET, TargetDomainStrategy
from peftjax.train.session import MAIN, Run
from peftjax.train.tasks import features_and_logits
from peftjax.transfer.divergence import density_ratios


@register_strategy("importance_weighting")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ImportanceWeightingConfig(TargetDomainStrategy):
    """Source examples weighted by target/source density ratios from a domain classifier.

    Attributes:
      target: the target domain's data (a data section; its labels are not used).
      clip: the largest ratio kept, before scaling to mean 1.
      strength: the inverse L2 penalty of the logistic regression (scikit-learn's C).
    """

    clip: float = 10.0
    strength: float = 1.0

    def _validate(self) -> None:
        super()._validate()
        require(self.clip > 0, "clip", f"must be positive, got {self.clip}")
        require(self.strength > 0, "strength", f"must be positive, got {self.strength}")

    def on_start(self, run: Run) -> None:
        super().on_start(run)
        memory = run.memory[self.strategy]
        if "weights" not in memory:
            memory["weights"] = self.weights(run).tolist()
        source = run.streams[MAIN]
        source.replace_examples(dataclasses.replace(source.loaded, weights=np.asarray(memory["weights"], np.float32)))

    def weights(self, run: Run) -> np.ndarray:
        """The source examples' weights under the run's current model, logged."""
        batch_size = run.info.config.train.eval_batch_size
        model = run.model()
        source, _ = features_and_logits(model, run.streams[MAIN].loaded, batch_size)
        target, _ = features_and_logits(model, run.streams[TARGET].loaded, batch_size)
        ratios = density_ratios(source, target, clip=self.clip, seed=run.info.config.train.seed,
                                strength=self.strength)
        weights = ratios / ratios.mean()
        run.log({f"{self.strategy}_min": float(weights.min()), f"{self.strategy}_max": float(weights.max()),
                 f"{self.strategy}_clipped": float((ratios >= self.clip).mean()),
                 f"{self.strategy}_effective_share": float(weights.sum() ** 2 / (weights**2).sum() / len(weights))})
        return weights
