"""Config sections: frozen, keyword-only dataclasses that check themselves.

A section subclasses :class:`Section`; its fields' type hints are the schema.
On construction, whether from YAML, from a dict or in Python, every field is
checked against its hint and brought to one canonical form (lists become
tuples, ``"1e-3"`` becomes a number, mappings become nested sections and
:class:`FrozenDict`), then the section's own ``_validate`` runs its
cross-field checks. Problems are :class:`ConfigError`\\ s naming the full dotted
key (``train.batch_size``), what was expected and what was found; an unknown
key comes with a did-you-mean, across sections when the key belongs to
another one (``train.learning_rate`` -> ``optim.learning_rate``).

The experiment schema (:mod:`peftjax.config`) and the training strategies'
configs (:mod:`peftjax.strategies`) are built on this module; it also reads
config files and applies ``key.sub=value`` overrides to their trees.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import math
import pathlib
import types
import typing
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

import yaml

from peftjax.errors import ConfigError

logger = logging.getLogger("peftjax")


class UnknownKeyError(ConfigError):
    """An unknown key, with a did-you-mean that is prefixed along with the key."""

    def __init__(self, key: str, suggestion: str | None, valid: Sequence[str] = ()) -> None:
        self.suggestion = suggestion
        self.valid = tuple(valid)
        if suggestion:
            detail = f"unknown key; did you mean {suggestion!r}?"
        else:
            detail = f"unknown key; valid keys here: {', '.join(self.valid)}"
        super().__init__(detail, key)

    def prefixed(self, prefix: str) -> ConfigError:
        suggestion = f"{prefix}{self.suggestion}" if self.suggestion else None
        return UnknownKeyError(f"{prefix}{self.key}", suggestion, self.valid)


# --------------------------------------------------------------------------
# Frozen mappings: method specs and free-form options stay hashable.
# --------------------------------------------------------------------------


def freeze(value: Any) -> Any:
    """Deep-converts dicts to FrozenDict and lists to tuples so the result hashes."""
    if isinstance(value, FrozenDict):
        return value
    if isinstance(value, Mapping):
        return FrozenDict(value)
    if isinstance(value, (list, tuple)):
        return tuple(freeze(item) for item in value)
    return value


def thaw(value: Any) -> Any:
    """Inverse of :func:`freeze`: plain dicts and lists, as YAML and JSON write them."""
    if isinstance(value, Mapping):
        return {str(key): thaw(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(item) for item in value]
    return value


class FrozenDict(Mapping[str, Any]):
    """An immutable, hashable mapping with string keys (nested values frozen too).

    Used for method specs and free-form options: the config tree must stay
    hashable and immutable, yet these mappings' keys are owned by code that this
    module does not know (the method registry, the model constructors).
    """

    __slots__ = ("_items", "_hash")

    def __init__(self, mapping: Mapping[str, Any] | Iterable[tuple[str, Any]] = (), /, **fields: Any) -> None:
        items = dict(mapping)
        items.update(fields)
        for key in items:
            if not isinstance(key, str):
                raise ConfigError(f"mapping keys must be strings, got {key!r} ({type(key).__name__})")
        self._items = {key: freeze(value) for key, value in items.items()}
        self._hash: int | None = None

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._items.items()))
        return self._hash

    def __repr__(self) -> str:
        return f"FrozenDict({self._items!r})"

    def replace(self, **changes: Any) -> FrozenDict:
        """A copy with some keys set (a FrozenDict cannot change in place)."""
        return FrozenDict({**self._items, **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts and lists, for YAML, JSON and ``config_from_dict``."""
        return thaw(self._items)


# --------------------------------------------------------------------------
# Type checking and coercion of field values.
# --------------------------------------------------------------------------

_SECTION_HINTS: dict[type, dict[str, Any]] = {}


def _field_hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a section's fields (cached; annotations are strings here)."""
    if cls not in _SECTION_HINTS:
        _SECTION_HINTS[cls] = typing.get_type_hints(cls)
    return _SECTION_HINTS[cls]


def _describe(hint: Any) -> str:
    """A type hint in words, for error messages read by people who wrote YAML."""
    origin = typing.get_origin(hint)
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is bool:
        return "true or false"
    if hint is str:
        return "a string"
    if hint is FrozenDict:
        return "a mapping"
    if dataclasses.is_dataclass(hint):
        return f"a mapping (section {hint.__name__})"
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if arg is type(None) else _describe(arg) for arg in typing.get_args(hint))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return str(hint)


def type_error(hint: Any, value: Any) -> ConfigError:
    detail = f"expected {_describe(hint)}, got {value!r} ({type(value).__name__})"
    if isinstance(value, bool) and hint is not bool:
        detail += "; YAML reads yes/no/on/off/true/false as booleans, quote the value to keep it a string"
    return ConfigError(detail)


def _coerce(value: Any, hint: Any) -> Any:
    """Checks ``value`` against ``hint`` and converts it to its canonical form.

    Conversions are the ones YAML makes necessary and nothing more: lists become
    tuples, ints become floats where a float is expected, ``"1e-3"`` (which YAML
    1.1 reads as a string) becomes a float, integral floats become ints, a single
    item becomes a one-item tuple, and mappings become sections.
    """
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None:
            if type(None) in options:
                return None
            raise type_error(hint, value)
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option)
            except ConfigError as error:
                errors.append(error)
        if len(errors) == 1:
            raise errors[0]
        raise type_error(hint, value)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices and not isinstance(value, bool):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        hint_text = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"expected {_describe(hint)}, got {value!r}{hint_text}")
    if origin is tuple:
        item_hint = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)):
            items = value
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool) or isinstance(value, Mapping):
            items = (value,)  # `text_columns: sentence` means ("sentence",)
        else:
            raise type_error(hint, value)
        result = []
        for index, item in enumerate(items):
            try:
                result.append(_coerce(item, item_hint))
            except ConfigError as error:
                raise error.prefixed(f"{index}.") from None
        return tuple(result)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return _section_from_mapping(hint, value)
        raise type_error(hint, value)
    if hint is FrozenDict:
        if isinstance(value, Mapping):
            return FrozenDict(value)
        raise type_error(hint, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise type_error(hint, value)
    if hint is int:
        if isinstance(value, bool):
            raise type_error(hint, value)
        if isinstance(value, int):
            return value
        number = _as_number(value)
        if number is not None and math.isfinite(number) and number == int(number):
            return int(number)
        raise type_error(hint, value)
    if hint is float:
        if isinstance(value, bool):
            raise type_error(hint, value)
        number = _as_number(value)
        if number is not None:
            return number
        raise type_error(hint, value)
    if hint is str:
        if isinstance(value, str):
            return value
        raise type_error(hint, value)
    if hint is Any:
        return freeze(value)
    raise TypeError(f"config schema uses an unsupported type hint {hint!r}")  # a bug here, not user input


def _as_number(value: Any) -> float | None:
    """A float from an int, a float or a numeric string such as ``"1e-3"``; else None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _section_from_mapping(cls: type, mapping: Mapping[str, Any]) -> Any:
    """Builds section ``cls`` from a mapping, rejecting keys the section does not have."""
    names = [field.name for field in dataclasses.fields(cls) if field.init]
    for key in mapping:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            raise UnknownKeyError(str(key), close[0] if close else None, names)
    missing = [
        field.name
        for field in dataclasses.fields(cls)
        if field.init
        and field.name not in mapping
        and field.default is dataclasses.MISSING
        and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"missing required key ({cls.__name__} needs it)", missing[0])
    return cls(**mapping)


class Section:
    """Base of every config section: coerce and validate on construction.

    Coercion lives in ``__post_init__`` rather than in the loader, so a section
    built directly in Python (``TrainLoopConfig(batch_size="8")``) is checked
    exactly like one read from YAML.
    """

    def __post_init__(self) -> None:
        hints = _field_hints(type(self))
        for field in dataclasses.fields(self):
            try:
                value = _coerce(getattr(self, field.name), hints[field.name])
            except ConfigError as error:
                raise error.prefixed(f"{field.name}.") if error.key else ConfigError(error.detail, field.name) from None
            object.__setattr__(self, field.name, value)
        self._validate()

    def _validate(self) -> None:
        """Cross-field checks; raise ConfigError with the field name as key."""

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults included, as plain dicts/lists/scalars."""
        result = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            result[field.name] = value.to_dict() if isinstance(value, (Section, FrozenDict)) else thaw(value)
        return result

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Builds the section from ``to_dict``'s output (or YAML), validating it."""
        if not isinstance(data, Mapping):
            raise type_error(cls, data)
        try:
            return _section_from_mapping(cls, data)
        except UnknownKeyError as error:
            raise _suggest_across_sections(cls, error) from None


def require(condition: bool, key: str, detail: str) -> None:
    if not condition:
        raise ConfigError(detail, key)


def _dotted_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key of a section tree (``train.batch_size``, ...)."""
    keys = []
    hints = _field_hints(cls)
    for field in dataclasses.fields(cls):
        hint = hints[field.name]
        if dataclasses.is_dataclass(hint):
            keys.extend(_dotted_keys(hint, f"{prefix}{field.name}."))
        else:
            keys.append(f"{prefix}{field.name}")
    return keys


def _suggest_across_sections(cls: type, error: UnknownKeyError) -> ConfigError:
    """Adds a did-you-mean from other sections (``train.learning_rate`` -> ``optim.learning_rate``)."""
    if error.suggestion or not error.key:
        return error
    full_keys = _dotted_keys(cls)
    leaf = error.key.rsplit(".", 1)[-1]
    by_leaf = {key.rsplit(".", 1)[-1]: key for key in full_keys}
    close_keys = difflib.get_close_matches(error.key, full_keys, n=1, cutoff=0.75)
    close_leaves = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    # A shortened name ("warmup") matches the first field it begins ("schedule.warmup_steps").
    extensions = [key for key in full_keys if len(leaf) >= 4 and key.rsplit(".", 1)[-1].startswith(leaf)]
    suggestion = close_keys[0] if close_keys else (by_leaf[close_leaves[0]] if close_leaves else None)
    suggestion = suggestion or (extensions[0] if extensions else None)
    return UnknownKeyError(error.key, suggestion, error.valid) if suggestion else error


class ConfigDumper(yaml.SafeDumper):
    """Block style for sections, flow style for short lists of scalars (``[query, value]``)."""

    def represent_list(self, data: list[Any]) -> yaml.Node:
        scalars = all(not isinstance(item, (list, dict)) for item in data)
        return self.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=scalars)


ConfigDumper.add_representer(list, ConfigDumper.represent_list)


# --------------------------------------------------------------------------
# Files and dotted overrides.
# --------------------------------------------------------------------------


def parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    """Splits ``"methods.0.rank=4"`` into ``(("methods", "0", "rank"), 4)``.

    The value is read as a YAML scalar (or flow collection), so ``16`` is an
    int, ``3e-4`` a number, ``null`` None, ``[query, value]`` a list and
    ``"8"`` (quoted) a string.
    """
    key, sep, raw_value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like key.sub=value (for example train.batch_size=16)")
    parts = tuple(key.split("."))
    if any(not part for part in parts):
        raise ConfigError(f"override {text!r} has an empty part in its key {key!r}")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: its value is not valid YAML ({error})") from None
    return parts, value


def _set_dotted(tree: dict[str, Any], parts: Sequence[str], value: Any, override: str) -> None:
    """Sets ``tree[a][b][c] = value``; integer parts index lists (methods.0.rank)."""
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            if not part.isdigit():
                raise ConfigError(f"is a list; index it with a number (override {override!r})", where)
            index = int(part)
            if index > len(node):
                raise ConfigError(
                    f"index out of range: {len(node)} item(s); {'.'.join(parts[:depth])}.{len(node)} "
                    f"appends one (override {override!r})",
                    where,
                )
            if index == len(node):
                node.append({})
            if last:
                node[index] = value
            else:
                if node[index] is None:
                    node[index] = {}
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                elif not isinstance(child, (dict, list)):
                    raise ConfigError(f"is {child!r}, not a section, so {'.'.join(parts)} cannot be set", where)
                node = child
        else:
            raise ConfigError(f"is not a section (override {override!r})", ".".join(parts[:depth]))


def _node(tree: Any, parts: Sequence[str]) -> Any:
    """``tree[a][b]...`` for dotted ``parts`` (list indices as digits), or None if absent."""
    for part in parts:
        if isinstance(tree, list) and part.isdigit() and int(part) < len(tree):
            tree = tree[int(part)]
        elif isinstance(tree, dict) and part in tree:
            tree = tree[part]
        else:
            return None
    return tree


def _restart_retyped_entries(before: dict[str, Any], tree: dict[str, Any], keys: list[tuple[str, ...]]) -> None:
    """An override that changes an entry's ``type`` (``methods.0.type=full``) starts that
    entry afresh: the fields it had belong to the old type, so they are dropped, with a
    notice, and only the fields overrides set on it stay."""
    for key in keys:
        if key[-1] != "type":
            continue
        entry, old = _node(tree, key[:-1]), _node(before, key[:-1])
        if not isinstance(entry, dict) or not isinstance(old, dict) or old.get("type") in (None, entry.get("type")):
            continue
        kept = {k[len(key) - 1] for k in keys if len(k) >= len(key) and k[: len(key) - 1] == key[:-1]}
        dropped = {name: entry.pop(name) for name in list(entry) if name not in kept}
        if dropped:
            where = ".".join(key[:-1])
            again = " ".join(f"{where}.{name}={json.dumps(value)}" for name, value in dropped.items())
            logger.warning(
                "%s.type=%s replaces the %s entry, so its fields %s are dropped (they were %s's); to keep those "
                "the new type also takes, override them too: %s", where, entry["type"], old["type"], list(dropped),
                old["type"], again,
            )


def apply_overrides_to_tree(tree: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    before, tree = thaw(tree), thaw(tree)
    keys = []
    for override in overrides:
        parts, value = parse_override(override)
        _set_dotted(tree, parts, value, override)
        keys.append(parts)
    _restart_retyped_entries(before, tree, keys)
    return tree


def read_tree(path: pathlib.Path) -> dict[str, Any]:
    """Parses a YAML or JSON file; syntax errors name the file and line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path.resolve()}") from None
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {error.start}); save it as UTF-8") from None
    if path.suffix.lower() == ".json":
        try:
            tree = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}:{error.lineno}:{error.colno}: malformed JSON: {error.msg}") from None
    else:
        try:
            tree = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            problem = getattr(error, "problem", None) or str(error)
            context = getattr(error, "context", None)
            detail = f"{problem} ({context})" if context else problem
            raise ConfigError(f"{where}: malformed YAML: {detail}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    return tree
