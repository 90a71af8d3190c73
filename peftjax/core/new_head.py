"""Parameters a checkpoint did not hold (a new head) train by default.

When ``peftjax.models.from_pretrained`` builds a model with a head its
checkpoint lacks (a classifier on a bare encoder, a head resized for another
number of labels), those parameters start random. A PEFT method that froze them
would train adapters against a random projection, so they train along with the
method by default, as the head HF PEFT's ``task_type`` puts in ``modules_to_save``
does. The loader records them on the model (a static attribute, like the applied
methods); :func:`label_rule` turns the record into a label rule placed after the
methods' rules, and ``freeze_new_head`` records them as frozen instead.

An adapter file holds the new head whenever it trains, and ``load_adapter``
fills it in.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from flax import nnx

from peftjax.methods.base import LabelRule

NEW_HEAD_ATTR = "peftjax_new_head"
# The label of a new head's parameters: it trains, and make_optimizer's
# ``lr_multipliers={"new_head": ...}`` or ``transforms`` can give it its own rate.
NEW_HEAD = "new_head"


@dataclasses.dataclass(frozen=True)
class NewHead:
    """The dotted paths of the parameters a checkpoint lacked, and whether they train."""

    paths: tuple[str, ...]
    trains: bool = True


def mark_new_head(model: nnx.Module, paths: Iterable[str], *, trains: bool = True) -> nnx.Module:
    """Record ``paths`` (dotted parameter paths) as newly initialised on ``model``."""
    paths = tuple(paths)
    if paths:
        setattr(model, NEW_HEAD_ATTR, NewHead(paths, trains))
    return model


def new_head(model: nnx.Module) -> NewHead | None:
    """What the loader recorded on ``model``, or None when it lacked nothing."""
    return getattr(model, NEW_HEAD_ATTR, None)


def label_rule(model: nnx.Module) -> list[LabelRule]:
    """``[(the new head's exact paths, "new_head")]`` when it trains, else ``[]``."""
    head = new_head(model)
    if head is None or not head.trains:
        return []
    return [("|".join(re.escape(path) for path in head.paths), NEW_HEAD)]
