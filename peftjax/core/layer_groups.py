"""Layer groups: a model's modules from input to output, found from its structure.

``layer_groups(model)`` gives ``embeddings`` (what turns the inputs into the
first hidden states), ``layer.0`` ... ``layer.{L-1}`` (the repeated blocks,
bottom first) and ``head`` (the output heads), each with the dotted paths of
its modules, for the reference models and any NNX model built like them.
Parameters under none of them (a final norm, BERT's pooler) are in no group.
Strategies turn groups into label rules (``LayerGroup.pattern``): freezing the
bottom layers, unfreezing one group at a time, a learning rate per group.

How the groups are found:

* the blocks are the longest ``nnx.List`` of modules in the model
  (``bert.encoder.layer``, ``model.layers``, ``vit.encoder.layer``);
* the embeddings are the outermost module that holds the table
  ``model.get_input_embeddings()`` returns and does not also hold the blocks
  (``bert.embeddings``; ``model.embed_tokens`` for Llama, whose ``model``
  holds both); a model without a token table (ViT) has its ``embeddings``
  module beside the blocks' container found by that name;
* the heads are the modules the model names in ``output_head_names`` that
  hold parameters (none for a Llama whose output is tied to its embeddings).
"""

from __future__ import annotations

import collections
import dataclasses
import re

from flax import nnx

from peftjax.core.paths import dotted
from peftjax.errors import PeftError


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """A named group of modules, by their dotted paths."""

    name: str
    paths: tuple[str, ...]

    @property
    def pattern(self) -> str:
        """A label-rule regex matching every parameter under the group's modules."""
        return "(?:" + "|".join(re.escape(path) for path in self.paths) + r")\..+"


def _blocks(modules: dict[tuple, nnx.Module]) -> tuple:
    """The path of the longest ``nnx.List`` of modules; raises when there is none or a tie."""
    lengths = collections.Counter(path[:-1] for path in modules if path and isinstance(path[-1], int))
    if not lengths:
        raise PeftError(f"{type(modules[()]).__name__} has no list of layers; layer groups need one")
    ranked = lengths.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        tied = [dotted(path) for path, count in ranked if count == ranked[0][1]]
        raise PeftError(f"{type(modules[()]).__name__} has several lists of {ranked[0][1]} layers ({tied}); "
                        "layer groups need one longest list")
    return ranked[0][0]


def _holds(ancestor: tuple, path: tuple) -> bool:
    return path[: len(ancestor)] == ancestor


def _embeddings(model: nnx.Module, modules: dict[tuple, nnx.Module], blocks: tuple) -> tuple | None:
    get_table = getattr(model, "get_input_embeddings", None)
    table = get_table() if get_table is not None else None
    found = [path for path, module in modules.items() if module is table] if table is not None else []
    if found:
        path = found[0]
        while len(path) > 1 and not _holds(path[:-1], blocks):
            path = path[:-1]
        return path
    for depth in range(len(blocks) - 1, -1, -1):
        beside = (*blocks[:depth], "embeddings")
        if beside in modules:
            return beside
    return None


def layer_groups(model: nnx.Module) -> list[LayerGroup]:
    """``embeddings``, ``layer.0`` .. ``layer.{L-1}``, ``head``, in that order
    (a group the model lacks is left out); see the module docstring."""
    modules = dict(nnx.iter_modules(model))
    blocks = _blocks(modules)
    count = 1 + max(path[len(blocks)] for path in modules if len(path) == len(blocks) + 1 and _holds(blocks, path))
    groups = []
    embeddings = _embeddings(model, modules, blocks)
    if embeddings is not None:
        groups.append(LayerGroup("embeddings", (dotted(embeddings),)))
    groups.extend(LayerGroup(f"layer.{i}", (dotted((*blocks, i)),)) for i in range(count))
    heads = tuple(
        name
        for name in getattr(model, "output_head_names", ())
        if isinstance(getattr(model, name, None), nnx.Module) and nnx.state(getattr(model, name), nnx.Param)
    )
    if heads:
        groups.append(LayerGroup("head", heads))
    return groups
