"""The schema tables docs/config.md must hold, computed from the config dataclasses.

Each table in docs/config.md follows a marker line ``<!-- schema: NAME -->`` and
has the columns key, type, default, meaning; this module renders the first three
from the dataclass named NAME (the meaning is the docs' own prose), so the test
can compare them cell by cell.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from typing import Any, Literal

import peftjax
from peftjax import config as config_lib
from peftjax.methods.base import MethodConfig
from peftjax.rank_search.config import DyLoraSearch, PilotSearch, SweepConfig, TargetSet
from peftjax.schema import FrozenDict, Section
from peftjax.strategies import registered_strategies

SECTIONS = {
    "ExperimentConfig": config_lib.ExperimentConfig,
    "ModelSpec": config_lib.ModelSpec,
    "DataConfig": config_lib.DataConfig,
    "OptimConfig": config_lib.OptimConfig,
    "ScheduleConfig": config_lib.ScheduleConfig,
    "TrainLoopConfig": config_lib.TrainLoopConfig,
    "SweepConfig": SweepConfig,
    "DyLoraSearch": DyLoraSearch,
    "PilotSearch": PilotSearch,
    "methods": MethodConfig,  # the fields every method has
}


def schema_classes() -> dict[str, type]:
    """Every table docs/config.md must have: the sections, one per method type
    (``method: lora``, its own fields) and one per strategy (``strategy: layer_freeze``)."""
    classes = dict(SECTIONS)
    classes.update({f"method: {name}": cls for name, cls in sorted(peftjax.registered_methods().items())})
    classes.update({f"strategy: {name}": cls for name, cls in sorted(registered_strategies().items())})
    # The ones peftjax ships: other tests in the same process register their own (a crashing strategy, plugins).
    return {name: cls for name, cls in classes.items() if cls.__module__.startswith("peftjax.")}


def render_type(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    simple = {int: "int", float: "float", bool: "bool", str: "str", type(None): "null", FrozenDict: "mapping",
              TargetSet: "target set", Any: "any"}
    if hint in simple:
        return simple[hint]
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(render_type(a) for a in args)
    if origin in (tuple, collections.abc.Sequence):
        return f"list of {render_type(args[0])}"
    if origin is collections.abc.Mapping:
        return f"mapping of {render_type(args[0])} to {render_type(args[1])}"
    if isinstance(hint, type) and (issubclass(hint, Section) or dataclasses.is_dataclass(hint)):
        return "section"
    raise AssertionError(f"no rendering for the type hint {hint!r}")


def render_value(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(render_value(v) for v in value) + "]"
    if isinstance(value, (dict, FrozenDict)):
        return "{" + ", ".join(f"{k}: {render_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, TargetSet):
        return value.name
    if isinstance(value, Section) or dataclasses.is_dataclass(value):
        return "(its defaults)"
    return str(value)


def render_default(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        return render_value(field.default)
    if field.default_factory is not dataclasses.MISSING:
        return render_value(field.default_factory())
    return "required"


def expected_rows(name: str, cls: type) -> list[tuple[str, str, str]]:
    """(key, type, default) of each field the table for ``name`` documents."""
    hints = typing.get_type_hints(cls)
    shared = {f.name for f in dataclasses.fields(MethodConfig)} if name.startswith("method: ") else set()
    return [
        (f.name, render_type(hints[f.name]), render_default(f))
        for f in dataclasses.fields(cls)
        if f.init and f.name not in shared
    ]


def documented_tables(text: str) -> dict[str, list[tuple[str, str, str]]]:
    """``{marker name: [(key, type, default), ...]}`` from the markdown."""
    tables: dict[str, list[tuple[str, str, str]]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("<!-- schema:"):
            current = line.removeprefix("<!-- schema:").removesuffix("-->").strip()
            tables[current] = []
        elif current is not None and line.startswith("| `"):
            cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
            tables[current].append((cells[0], cells[1], cells[2]))
        elif current is not None and tables[current] and not line.startswith("|"):
            current = None
    return tables


if __name__ == "__main__":  # prints the table skeletons: python tests/docs/schema_tables.py
    for marker, cls in schema_classes().items():
        print(f"<!-- schema: {marker} -->\n| key | type | default | meaning |\n| --- | --- | --- | --- |")
        for key, kind, default in expected_rows(marker, cls):
            print(f"| `{key}` | {kind} | `{default}` | |")
        print()
