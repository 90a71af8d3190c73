"""HF PEFT's adapter format, mapped to and from peftjax's methods.

An HF PEFT adapter folder holds one adapter: ``adapter_config.json``, a
``PeftConfig``'s fields with ``peft_type`` naming the method, and
``adapter_model.safetensors``, whose keys are torch module paths under
``base_model.model.`` followed by the method's own tensor names
(``base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight``),
in torch's layout. What differs per method, its config fields and its
tensors, is declared in the method's own file (``MethodConfig.to_hf`` /
``from_hf``, ``AdapterWrapper.hf_tensors``). This module adds what every
method shares: ``target_modules`` and ``exclude_modules``, ``modules_to_save``
for ``also_train`` (whole layers), the module names, and the checks.

Module names. peftjax's reference models use the checkpoints' module paths,
which are transformers' own for BERT/RoBERTa and Llama/Mistral/Qwen2. For ViT,
transformers 5 renames its modules in memory (``vit.layers.0.attention.q_proj``
for the checkpoint's ``vit.encoder.layer.0.attention.attention.query``), and
HF PEFT names modules as they are in memory; a model class that differs so
declares ``hf_module_renames`` (regex, replacement pairs, applied in order),
and then module selectors are written out as explicit paths both ways.
File reading and writing are ``peftjax.core.adapter_io``'s.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import nnx

from peftjax.core.inject import applied_methods, iter_wrappers
from peftjax.core.new_head import new_head
from peftjax.core.paths import ALL_LINEAR, Targets, dotted, matches
from peftjax.errors import PeftError
from peftjax.methods.base import AdapterWrapper, MethodConfig, Slot, registered_methods
from peftjax.models.layouts import checkpoint_names, to_model_layout, to_torch_layout, to_torch_shape
from peftjax.variables import AdapterParam

PREFIX = "base_model.model."
# Prompt learning's PeftModel holds the transformers model itself as base_model: one level less.
PROMPT_LEARNING_PREFIX = "base_model."
# Our model classes' hf_architecture_suffix -> the task_type that makes HF PEFT apply prompt learning.
TASK_TYPES = {"ForSequenceClassification": "SEQ_CLS", "ForTokenClassification": "TOKEN_CLS",
              "ForCausalLM": "CAUSAL_LM", "Model": "FEATURE_EXTRACTION"}
# PeftConfig fields that say where an adapter came from or how it was used, not what it computes.
PROVENANCE = frozenset(
    {"peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode"}
)
_COMMON = ("target_modules", "exclude_modules", "modules_to_save")


class ModuleNames:
    """A model's module paths as transformers names them, and HF PEFT's module
    selectors (names or a regex, as ``target_modules``) as peftjax targets."""

    def __init__(self, model: nnx.Module):
        self.renames = getattr(type(model), "hf_module_renames", ())
        inside = [p + "." for p, _ in iter_wrappers(model)]
        self.paths = [dotted(p) for p, _ in nnx.iter_modules(model) if p]
        self.paths = [p for p in self.paths if not any(p.startswith(w) for w in inside)]

    def path(self, ours: str) -> str:
        for pattern, replacement in self.renames:
            ours = re.sub(pattern, replacement, ours)
        return ours

    def to_hf(self, selector: Targets | None) -> Any:
        """``selector`` for HF PEFT: as it is, or the transformers paths it selects when names differ."""
        if selector is None or not self.renames:
            return selector if isinstance(selector, str) or selector is None else list(selector)
        return sorted(self.path(p) for p in self.paths if matches(p, selector))

    def from_hf(self, selector: str | list[str] | None) -> Targets | None:
        """An HF PEFT selector as peftjax targets: the same modules, chosen by their transformers
        paths. Names come sorted (HF PEFT writes a set, in no fixed order)."""
        if selector is None or not self.renames:
            return selector if isinstance(selector, str) or selector is None else tuple(sorted(selector))
        selector = selector if isinstance(selector, str) else list(selector)
        return tuple(p for p in self.paths if matches(self.path(p), selector))


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


def _trained_base_params(model: nnx.Module, config: MethodConfig) -> dict[tuple, tuple[str, str, str]]:
    """``{path: (owner module path, checkpoint leaf name, layout)}`` of the base parameters
    that train: those ``also_train`` chooses, and a new head that trains (``peftjax.core.new_head``)."""
    head = new_head(model)
    head_paths = set(head.paths) if head is not None and head.trains else set()
    if not config.also_train and not head_paths:
        return {}
    wrapped = [p + "." for p, _ in iter_wrappers(model)]
    chosen = [
        path for path, v in nnx.iter_graph(model)
        if isinstance(v, nnx.Param) and not isinstance(v, AdapterParam)
        and not any(dotted(path).startswith(w) for w in wrapped)
        and (dotted(path) in head_paths or any(re.fullmatch(p, dotted(path)) for p in config.also_train))
    ]  # fmt: skip
    names, _ = checkpoint_names(model)
    unmapped = [dotted(p) for p in chosen if tuple(p) not in names]
    if unmapped:
        raise PeftError(f"also_train trains {unmapped[:5]}, which have no place in a transformers checkpoint")
    return {tuple(p): (dotted(p[:-1]), names[tuple(p)][0].rsplit(".", 1)[1], names[tuple(p)][1]) for p in chosen}


def _modules_to_save(model: nnx.Module, trained: Mapping[tuple, Any], names: ModuleNames) -> list[str] | None:
    """The layers ``trained`` covers, each of which it must cover whole (HF PEFT saves modules)."""
    owners = sorted({path[:-1] for path in trained})
    for owner in owners:
        module = functools.reduce(lambda node, k: node[k] if isinstance(k, int) else getattr(node, k), owner, model)
        params = nnx.to_flat_state(nnx.state(module, nnx.Param))
        missing = [f"{dotted(owner)}.{dotted(p)}" for p, _ in params if (*owner, *p) not in trained]
        if missing:
            raise PeftError(
                f"also_train trains part of {dotted(owner)} but not {missing}; HF PEFT saves whole modules "
                "(modules_to_save), so train all of its parameters or none"
            )
    return [names.path(dotted(owner)) for owner in owners] or None


def _prefix(config: MethodConfig) -> str:
    return PROMPT_LEARNING_PREFIX if config.hf_prompt_learning else PREFIX


def slots(model: nnx.Module, adapter_name: str, config: MethodConfig) -> dict[str, Slot]:
    """Every tensor an HF PEFT file of this adapter holds, by key (works on abstract models)."""
    names, found = ModuleNames(model), {}
    for path, wrapper in iter_wrappers(model):
        if wrapper.adapter_name != adapter_name or config.hf_prompt_learning:  # prompt learning: the model's tensors
            continue
        for name, tensor in wrapper.hf_tensors().items():
            variable = getattr(wrapper, tensor.attribute)
            from_torch = functools.partial(tensor.from_torch, ours=tuple(variable.shape))
            found[f"{PREFIX}{names.path(path)}.{name}"] = Slot.of(variable, tensor.shape, tensor.to_torch, from_torch)
    found.update(config.hf_model_tensors(model, adapter_name))
    variables = dict(nnx.iter_graph(model))
    for path, (owner, leaf, layout) in _trained_base_params(model, config).items():
        variable = variables[path]
        found[f"{_prefix(config)}{names.path(owner)}.{leaf}"] = Slot.of(
            variable,
            to_torch_shape(tuple(variable.shape), layout),
            functools.partial(to_torch_layout, layout=layout),
            functools.partial(to_model_layout, layout=layout),
        )
    return found


def base_copies(abstract: nnx.Module, model: nnx.Module, adapter_name: str) -> dict[str, np.ndarray]:
    """Base tables HF PEFT also saves (its ``save_embedding_layers``, for resized
    vocabularies): the key of each embedding ``abstract``'s adapter targets, and
    ``model``'s own table there, which a file's copy must equal."""
    names = ModuleNames(abstract)
    modules = {dotted(p): m for p, m in nnx.iter_modules(model)}
    return {
        f"{PREFIX}{names.path(path)}.base_layer.weight": np.asarray(_layer(modules[path]).embedding.get_value())
        for path, wrapper in iter_wrappers(abstract)
        if wrapper.adapter_name == adapter_name and isinstance(wrapper.base_layer, nnx.Embed)
    }


def _layer(module: nnx.Module) -> nnx.Module:
    return module.base_layer if isinstance(module, AdapterWrapper) else module


def to_hf(model: nnx.Module) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(adapter_config.json, {key: torch-layout array})`` of the model's one adapter."""
    adapter_name, config = _only_adapter(model)
    names = ModuleNames(model)
    common = {
        "modules_to_save": _modules_to_save(model, _trained_base_params(model, config), names),
        "task_type": None,
        "inference_mode": True,
    }
    if config.hf_prompt_learning:  # no target modules; the task class applies the prompt
        suffix = getattr(type(model), "hf_architecture_suffix", None)
        if suffix not in TASK_TYPES:
            raise PeftError(f"{type(config).__name__} has no HF PEFT form on {type(model).__name__}: HF PEFT applies "
                            f"prompt learning through a task class, and it has none for this model")
        common.update(task_type=TASK_TYPES[suffix], **config.hf_model_fields(model))
    else:
        wrapped = sorted(path for path, w in iter_wrappers(model) if w.adapter_name == adapter_name)
        targets = [names.path(p) for p in wrapped] if config.targets == ALL_LINEAR else names.to_hf(config.targets)
        # "all-linear" spelled out, as HF PEFT saves it; exclude_modules only when set (HF's VeRA has no such field)
        common.update(target_modules=targets)
        if config.exclude:
            common.update(exclude_modules=names.to_hf(config.exclude))
    tensors = {
        key: np.ascontiguousarray(slot.read()) for key, slot in slots(model, adapter_name, config).items()
    }
    return {**config.to_hf(names), **common}, tensors


def _is_set(value: Any) -> bool:
    return value not in (None, False, "none") and value != {} and value != []


def method_from_hf(config: Mapping[str, Any], model: nnx.Module, *, source: str) -> MethodConfig:
    """The peftjax method an ``adapter_config.json`` describes, for ``model``; every
    field it sets must be one the method reads, or an error names it."""
    peft_type = config.get("peft_type")
    known = readers()
    if peft_type not in known:
        raise PeftError(
            f"{source}: peft_type {peft_type!r} has no peftjax counterpart that reads HF PEFT files; "
            f"supported: {sorted(known)}"
        )
    fields = {k: v for k, v in config.items() if k not in PROVENANCE and k not in _COMMON}
    reader, names = known[peft_type], ModuleNames(model)
    for field, ours in reader.hf_model_fields(model).items():
        theirs = fields.pop(field, None)
        if theirs is not None and theirs != ours:
            raise PeftError(
                f"{source}: {field}={theirs!r}, but this model has {ours!r}; load the adapter onto the base model "
                "it was trained on"
            )
    saved = names.from_hf(config.get("modules_to_save") or [])
    if reader.hf_prompt_learning:
        # HF PEFT's task classes list every head name they know ("classifier", "score"): keep the model's
        saved = [name for name in dict.fromkeys(saved) if any(p == name or p.endswith("." + name) for p in names.paths)]
        common = {}
    else:
        targets, exclude = config.get("target_modules"), config.get("exclude_modules") or ()
        if targets is None or targets == ALL_LINEAR:
            raise PeftError(
                f"{source}: target_modules={targets!r}; peftjax needs the modules spelled out (HF PEFT writes them "
                "out when it saves an adapter it created)"
            )
        if isinstance(exclude, str):
            raise PeftError(f"{source}: exclude_modules={exclude!r} is a regex; peftjax's exclude takes module names")
        common = dict(targets=names.from_hf(targets), exclude=tuple(names.from_hf(list(exclude))))
    common["also_train"] = tuple(rf"(.*\.)?{re.escape(name)}\..+" for name in saved)  # every parameter under each
    try:
        method = reader.from_hf(fields, names, **common)
    except (TypeError, PeftError) as err:  # a field of the wrong type, or a value peftjax refuses
        raise PeftError(f"{source}: {err}") from None
    unread = {k: v for k, v in fields.items() if _is_set(v)}
    if unread:
        raise PeftError(
            f"{source}: {unread} set, which peftjax's {type(method).__name__} does not implement; "
            "it cannot load this adapter as it was trained"
        )
    return method
