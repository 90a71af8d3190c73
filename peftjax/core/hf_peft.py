"""HF PEFT's adapter format, mapped to and from peftjax's methods.

An HF PEFT adapter folder holds one adapter: ``adapter_config.json``, a
``PeftConfig``'s fields with ``peft_type`` naming the method, and
``adapter_model.safetensors``, whose keys are torch module paths under
``base_model.model.`` followed by the method's own tensor names
(``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``),
in torch's layout. peftjax's reference models use the checkpoints' module
paths, so a path maps to itself; what differs per method, its config fields
and its tensors, is declared in the method's own file
(``MethodConfig.to_hf`` / ``from_hf``, ``AdapterWrapper.hf_tensors``). This
module adds what every method shares: ``target_modules`` and
``exclude_modules`` (same matching rules as ``targets`` / ``exclude``),
``modules_to_save`` for ``also_train`` (whole layers, keyed as the base
checkpoint keys them), and the checks. File reading and writing are
``peftjax.core.adapter_io``'s.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from flax import nnx

from peftjax.core.inject import applied_methods, iter_wrappers
from peftjax.core.paths import ALL_LINEAR, dotted
from peftjax.errors import PeftError
from peftjax.methods.base import MethodConfig, registered_methods
from peftjax.models.loading import checkpoint_names, to_model_layout, to_torch_layout, to_torch_shape
from peftjax.variables import AdapterParam

PREFIX = "base_model.model."
# PeftConfig fields that say where an adapter came from or how it was used, not what it computes.
PROVENANCE = frozenset(
    {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
)
_COMMON = ("target_modules", "exclude_modules", "modules_to_save")


@dataclasses.dataclass(frozen=True)
class Slot:
    """One tensor of an HF PEFT file and the model variable it is."""

    variable: nnx.Variable
    shape: tuple[int, ...]  # torch's
    to_torch: Callable[[np.ndarray], np.ndarray]
    from_torch: Callable[[np.ndarray], np.ndarray]


def readers() -> dict[str, type[MethodConfig]]:
    """``peft_type`` -> the config class that reads it (the class that declares ``hf_peft_type``)."""
    return {c.hf_peft_type: c for c in registered_methods().values() if vars(c).get("hf_peft_type")}


def _only_adapter(model: nnx.Module) -> tuple[str, MethodConfig]:
    methods = applied_methods(model)
    if len(methods) != 1:
        names = [name for name, _ in methods]
        raise PeftError(
            f"an HF PEFT folder holds exactly one adapter; this model has {names or 'none'}. Delete the others "
            "(peftjax.delete_adapter) or save in peftjax's format (format='peftjax')"
        )
    return methods[0]


def _trained_base_params(model: nnx.Module, config: MethodConfig) -> dict[tuple, tuple[str, str]]:
    """``{path: (checkpoint key, layout)}`` of the base parameters ``also_train`` trains."""
    if not config.also_train:
        return {}
    wrapped = [p + "." for p, _ in iter_wrappers(model)]
    chosen = [
        path for path, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Param) and not isinstance(v, AdapterParam)
        and not any(dotted(path).startswith(w) for w in wrapped)
        and any(re.fullmatch(p, dotted(path)) for p in config.also_train)
    ]  # fmt: skip
    names, _ = checkpoint_names(model)
    unmapped = [dotted(p) for p in chosen if tuple(p) not in names]
    if unmapped:
        raise PeftError(f"also_train trains {unmapped[:5]}, which have no place in a transformers checkpoint")
    return {tuple(p): names[tuple(p)] for p in chosen}


def _modules_to_save(model: nnx.Module, trained: Mapping[tuple, Any]) -> list[str] | None:
    """The layers ``trained`` covers, each of which it must cover whole (HF PEFT saves modules)."""
    owners = sorted({path[:-1] for path in trained})
    for owner in owners:
        params = nnx.to_flat_state(nnx.state(_at(model, owner), nnx.Param))
        missing = [f"{dotted(owner)}.{dotted(p)}" for p, _ in params if (*owner, *p) not in trained]
        if missing:
            raise PeftError(
                f"also_train trains part of {dotted(owner)} but not {missing}; HF PEFT saves whole modules "
                "(modules_to_save), so train all of its parameters or none"
            )
    return [dotted(owner) for owner in owners] or None


def _at(model: nnx.Module, path: tuple) -> nnx.Module:
    return functools.reduce(lambda node, key: node[key] if isinstance(key, int) else getattr(node, key), path, model)


def slots(model: nnx.Module, adapter_name: str, config: MethodConfig) -> dict[str, Slot]:
    """Every tensor an HF PEFT file of this adapter holds, by key (works on abstract models)."""
    found = {}
    for path, wrapper in iter_wrappers(model):
        if wrapper.adapter_name != adapter_name:
            continue
        for name, tensor in wrapper.hf_tensors().items():
            variable = getattr(wrapper, tensor.attribute)
            ours = tuple(variable.shape)
            found[f"{PREFIX}{path}.{name}"] = Slot(
                variable, tensor.shape, tensor.to_torch, functools.partial(tensor.from_torch, ours=ours)
            )
    variables = dict(nnx.iter_graph(model))
    for path, (key, layout) in _trained_base_params(model, config).items():
        variable = variables[path]
        found[PREFIX + key] = Slot(
            variable,
            to_torch_shape(tuple(variable.shape), layout),
            functools.partial(to_torch_layout, layout=layout),
            functools.partial(to_model_layout, layout=layout),
        )
    return found


def _names(targets) -> Any:
    return targets if isinstance(targets, str) or targets is None else list(targets)


def to_hf(model: nnx.Module) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config.json, {key: torch-layout array})`` of the model's one adapter."""
    adapter_name, config = _only_adapter(model)
    fields = config.to_hf()
    targets = config.targets
    if targets == ALL_LINEAR:  # HF PEFT spells out which layers "all-linear" meant; so do we
        targets = sorted(path for path, w in iter_wrappers(model) if w.adapter_name == adapter_name)
    trained = _trained_base_params(model, config)
    common = {
        "target_modules": _names(targets),
        "exclude_modules": _names(config.exclude) or None,
        "modules_to_save": _modules_to_save(model, trained),
        "task_type": None,
        "inference_mode": True,
    }
    tensors = {
        key: np.ascontiguousarray(slot.to_torch(np.asarray(slot.variable.get_value())))
        for key, slot in slots(model, adapter_name, config).items()
    }
    return {**fields, **common}, tensors


def _is_set(value: Any) -> bool:
    return value not in (None, False, "none") and value != {} and value != []


def method_from_hf(config: Mapping[str, Any], *, source: str) -> MethodConfig:
    """The peftjax method an ``adapter_config.json`` describes; every field it
    sets must be one the method reads, or an error names it."""
    peft_type = config.get("peft_type")
    known = readers()
    if peft_type not in known:
        raise PeftError(
            f"{source}: peft_type {peft_type!r} has no peftjax counterpart that reads HF PEFT files; "
            f"supported: {sorted(known)}"
        )
    fields = {k: v for k, v in config.items() if k not in PROVENANCE and k not in _COMMON}
    targets = config.get("target_modules")
    if targets is None or targets == ALL_LINEAR:
        raise PeftError(
            f"{source}: target_modules={targets!r}; peftjax needs the modules spelled out (HF PEFT writes them "
            "out when it saves an adapter it created)"
        )
    exclude = config.get("exclude_modules") or ()
    if isinstance(exclude, str):
        raise PeftError(f"{source}: exclude_modules={exclude!r} is a regex; peftjax's exclude takes module names")
    modules_to_save = config.get("modules_to_save") or ()
    common = dict(
        targets=targets if isinstance(targets, str) else tuple(targets),
        exclude=tuple(exclude),
        also_train=tuple(rf"(.*\.)?{re.escape(name)}\..+" for name in modules_to_save),
    )
    try:
        method = known[peft_type].from_hf(fields, **common)
    except TypeError as err:
        raise PeftError(f"{source}: {err}") from None
    unread = {k: v for k, v in fields.items() if _is_set(v)}
    if unread:
        raise PeftError(
            f"{source}: {unread} set, which peftjax's {type(method).__name__} does not implement; "
            "it cannot load this adapter as it was trained"
        )
    return method
