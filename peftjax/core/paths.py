"""Dotted module paths and the rules that select modules and parameters by them.

A path is written the way Hugging Face names modules: attribute names and list
indices joined by dots (``bert.encoder.layer.0.attention.self.query``), so
target lists written for HF PEFT select the same modules here.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

ALL_LINEAR = "all-linear"

# Targets as users write them: a regex (full match), a list of names, or "all-linear".
Targets = str | Sequence[str]


def dotted(path: Iterable) -> str:
    """``('encoder', 'layer', 0, 'query')`` -> ``'encoder.layer.0.query'``."""
    return ".".join(str(getattr(key, "key", key)) for key in path)


def matches(path: str, targets: Targets) -> bool:
    """Whether ``path`` is selected by ``targets``.

    A string is a regular expression that must match the whole path; a
    sequence of names matches a path equal to a name or ending in ``.name``.
    ``"all-linear"`` is resolved by the injection engine, which knows layer
    types, and is rejected here.
    """
    if isinstance(targets, str):
        if targets == ALL_LINEAR:
            raise ValueError(f"{ALL_LINEAR!r} selects by layer type, not by path")
        return re.fullmatch(targets, path) is not None
    return any(path == name or path.endswith("." + name) for name in targets)


def unmatched(targets: Targets, paths: Sequence[str]) -> list[str]:
    """The entries of a list of names that match none of ``paths`` (always [] for a regex)."""
    if isinstance(targets, str):
        return []
    return [name for name in targets if not any(matches(path, (name,)) for path in paths)]


def validate_targets(targets: Targets, field: str) -> Targets:
    """Normalise ``targets`` to a string or a tuple and check it can be used.

    Raises ``ValueError`` naming ``field`` for an empty list, a non-string
    entry, or a regular expression that does not compile.
    """
    if isinstance(targets, str):
        if targets != ALL_LINEAR:
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(f"{field}={targets!r} is not a valid regular expression: {err}") from None
        return targets
    targets = tuple(targets)
    if not targets:
        raise ValueError(f"{field} is empty: give module names, a regex, or {ALL_LINEAR!r}")
    bad = [t for t in targets if not isinstance(t, str) or not t]
    if bad:
        raise ValueError(f"{field} must hold non-empty module names, got {bad!r}")
    return targets


def _suffixes(paths: Sequence[str], parts: int) -> list[str]:
    """The distinct last ``parts`` components of ``paths`` (``output.dense`` for 2)."""
    return sorted({".".join(p.split(".")[-parts:]) for p in paths if p.count(".") + 1 >= parts})


def suggest(wanted: Targets, paths: Sequence[str], limit: int = 8) -> str:
    """A short hint for a selection that matched nothing: close names and some paths."""
    names = sorted({p.rsplit(".", 1)[-1] for p in paths if not p.rsplit(".", 1)[-1].isdigit()})
    words = [wanted] if isinstance(wanted, str) else list(wanted)
    close = sorted({c for w in words for c in difflib.get_close_matches(w, _suffixes(paths, w.count(".") + 1), n=3)})
    if isinstance(wanted, str):
        hint = f" A regex must match the whole dotted path, e.g. {'.*' + wanted!r}, or give a list of names."
    else:
        hint = f" Did you mean {close}?" if close else ""
    shown = ", ".join(paths[:limit]) + (", ..." if len(paths) > limit else "")
    return f"{hint} Module names in this model: {names[:30]}. Some paths: {shown}"
