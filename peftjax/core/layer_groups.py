"""Layer groups: a model's modules from input to output, found from its structure.

``layer_groups(model)`` gives, bottom first, ``embeddings`` (what turns the
inputs into the first hidden states), ``layer.0`` ... ``layer.{L-1}`` (the
repeated blocks), ``final`` (what sits between the last block and the head:
a final norm, a pooler) and ``head`` (the output heads), each with the
dotted paths of its modules and its ``kind`` (``embeddings``, ``block``,
``final`` or ``head``), for the reference models and any NNX model built like
them. Strategies turn groups into label rules (``LayerGroup.pattern``):
freezing the bottom layers, unfreezing one group at a time, a learning rate
per group. They address groups by name or by index (``select_groups``):
0, 1, ... from the bottom, -1, -2, ... from the top (-1 is the head).

How the groups are found:

* a model that declares its own (``model.layer_groups()``, ``(name, module
  path)`` pairs in order, as the ResNets do: ``stem``, ``stage1`` ...,
  ``head``) has those: the first is of kind ``embeddings``, one named
  ``head`` is the head, the others are blocks;
* otherwise the blocks are the longest ``nnx.List`` of modules in the model
  (``bert.encoder.layer``, ``model.layers``, ``vit.encoder.layer``);
* the embeddings are the outermost module that holds the table
  ``model.get_input_embeddings()`` returns and does not also hold the blocks
  (``bert.embeddings``; ``model.embed_tokens`` for Llama, whose ``model``
  holds both); a model without a token table (ViT) has its ``embeddings``
  module beside the blocks' container found by that name;
* the heads are the modules the model names in ``output_head_names`` that
  hold parameters (none for a Llama whose output is tied to its embeddings);
* ``final`` holds the modules with the remaining parameters of the model
  that holds the blocks (``bert.pooler``, ``model.norm``, ``vit.layernorm``):
  each is the child of the deepest module that holds both it and the blocks.
  The training strategies' own modules (``STRATEGY_MODULES``) are in no group.
"""

from __future__ import annotations

import collections
import dataclasses
import re
from collections.abc import Sequence

from flax import nnx

from peftjax.core.paths import dotted
from peftjax.errors import PeftError

# The attribute of the model's root module that holds the training strategies' own modules.
STRATEGY_MODULES = "training_strategies"


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """A named group of modules, by their dotted paths; ``kind`` is ``embeddings``,
    ``block``, ``final`` or ``head``."""

    name: str
    paths: tuple[str, ...]
    kind: str = "block"

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


def _final(model: nnx.Module, blocks: tuple, grouped: Sequence[str]) -> tuple[str, ...]:
    """The modules holding the parameters no other group holds, below the root (see the module docstring)."""
    found: dict[str, None] = {}
    for path, variable in nnx.iter_graph(model):
        if not isinstance(variable, nnx.Param) or any(dotted(path).startswith(g + ".") for g in grouped):
            continue
        module = path[:-1]
        shared = next(d for d in range(len(blocks), -1, -1) if _holds(blocks[:d], module))
        if shared < len(module) and module[0] != STRATEGY_MODULES:
            found[dotted(module[: shared + 1])] = None
    return tuple(found)


def _declared(model: nnx.Module) -> list[LayerGroup]:
    declared = list(model.layer_groups())
    return [
        LayerGroup(name, (path,), "head" if name == "head" else "embeddings" if index == 0 else "block")
        for index, (name, path) in enumerate(declared)
    ]


def layer_groups(model: nnx.Module) -> list[LayerGroup]:
    """``embeddings``, ``layer.0`` .. ``layer.{L-1}``, ``final``, ``head``, in that
    order (a group the model lacks is left out), or the model's own
    ``layer_groups()``; see the module docstring."""
    if callable(getattr(model, "layer_groups", None)):
        return _declared(model)
    modules = dict(nnx.iter_modules(model))
    blocks = _blocks(modules)
    count = 1 + max(path[len(blocks)] for path in modules if len(path) == len(blocks) + 1 and _holds(blocks, path))
    groups = []
    embeddings = _embeddings(model, modules, blocks)
    if embeddings is not None:
        groups.append(LayerGroup("embeddings", (dotted(embeddings),), "embeddings"))
    groups.extend(LayerGroup(f"layer.{i}", (dotted((*blocks, i)),), "block") for i in range(count))
    heads = tuple(
        name
        for name in getattr(model, "output_head_names", ())
        if isinstance(getattr(model, name, None), nnx.Module) and nnx.state(getattr(model, name), nnx.Param)
    )
    final = _final(model, blocks, [path for group in groups for path in group.paths] + list(heads))
    if final:
        groups.append(LayerGroup("final", final, "final"))
    if heads:
        groups.append(LayerGroup("head", heads, "head"))
    return groups


def select_groups(model: nnx.Module, selectors: Sequence[int | str], *, key: str) -> list[LayerGroup]:
    """The groups ``selectors`` name, in the model's order: a name, or an index,
    0 the bottom group and -1 the top one. ``key`` names the setting in errors."""
    groups = layer_groups(model)
    names = [group.name for group in groups]
    chosen = set()
    for selector in selectors:
        if isinstance(selector, int) and not isinstance(selector, bool):
            if not -len(groups) <= selector < len(groups):
                raise PeftError(f"{key}: group index {selector} is out of range; {type(model).__name__} has "
                                f"{len(groups)} layer groups {names}: use 0..{len(groups) - 1} from the bottom "
                                f"or -1..-{len(groups)} from the top")
            chosen.add(selector % len(groups))
        elif selector in names:
            chosen.add(names.index(selector))
        else:
            raise PeftError(f"{key}: {type(model).__name__} has no layer group {selector!r}; its groups are {names}")
    return [groups[index] for index in sorted(chosen)]
