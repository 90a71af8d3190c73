"""Transfer-learning diagnostics and decisions: how far apart two datasets are
(:mod:`~peftjax.transfer.similarity`), whether pretraining helps
(:mod:`~peftjax.transfer.negative_transfer`), learning curves over a few labels
per class (:mod:`~peftjax.transfer.few_shot`) and a recommended strategy for a
dataset (:mod:`~peftjax.transfer.advise`). The domain-adaptation training
strategies (``dann``, ``mmd``, ``pseudo_label``, ``importance_weighting``) are in
:mod:`peftjax.strategies` and share :mod:`~peftjax.transfer.divergence`."""
