"""Layer freezing: the embeddings and the bottom ``layers`` blocks do not train.

Lee et al. (2019, "What would Elsa do? Freezing layers during transformer
fine-tuning") report that fine-tuning only the upper layers of BERT keeps
most of its quality; the frozen layers cost no optimizer state and no weight
gradients. With a method applied, freezing a layer freezes its adapters too
(a frozen layer is one where nothing trains), whatever the method's own
rules say, because strategies' rules come first.

Layers are the blocks of the model's layer groups (``peftjax.layer_groups``:
a transformer's layers, a ResNet's stages); with ``layers: 0`` and
``embeddings: true`` this is freezing the embeddings (a ResNet's stem) alone.
"""

from __future__ import annotations

import dataclasses

from flax import nnx

from peftjax.core.layer_groups import layer_groups
from peftjax.errors import PeftError
from peftjax.methods.base import FROZEN, LabelRule
from peftjax.schema import require
from peftjax.strategies.base import Strategy, register_strategy


@register_strategy("layer_freeze")
@dataclasses.dataclass(frozen=True, kw_only=True)
class LayerFreezeConfig(Strategy):
    """Freeze the ``layers`` bottom blocks and, with ``embeddings``, the embeddings.

    Attributes:
      layers: how many blocks, from the input side, do not train (0 to the
        model's number of blocks).
      embeddings: whether the embeddings do not train either.
    """

    layers: int = 0
    embeddings: bool = True

    def _validate(self) -> None:
        require(self.layers >= 0, "layers", f"must not be negative, got {self.layers}")
        require(self.layers > 0 or self.embeddings, "layers", "freezes nothing with embeddings: false; set layers >= 1")

    def label_rules(self, model: nnx.Module, stage: int) -> list[LabelRule]:
        groups = layer_groups(model)
        blocks = [group for group in groups if group.kind == "block"]
        if self.layers > len(blocks):
            raise PeftError(f"layer_freeze.layers={self.layers}: {type(model).__name__} has {len(blocks)} layers")
        embeddings = [group for group in groups if group.kind == "embeddings"]
        if self.embeddings and not embeddings:
            raise PeftError(f"layer_freeze.embeddings: {type(model).__name__} has no embeddings group; "
                            "set embeddings: false")
        frozen = blocks[: self.layers] + (embeddings if self.embeddings else [])
        return [(group.pattern, FROZEN) for group in frozen]
