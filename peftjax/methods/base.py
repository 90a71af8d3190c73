"""The extension API: what a PEFT method is, and the registry that finds it.

A method is one file that defines

* a config: a frozen, keyword-only dataclass subclassing ``MethodConfig``,
  registered with ``@register_method("name")``; it validates itself on
  construction and round-trips through ``to_dict`` / ``config_from_dict``;
* for methods that change a layer's computation, a wrapper: an
  ``AdapterWrapper`` subclass built by the config's ``wrap``; its parameters
  are ``AdapterParam`` subclasses, so they train and everything else stays
  frozen without naming anything.

The engine (:func:`peftjax.apply`) selects target modules, checks them against
``target_types``, builds every wrapper before changing the model, and records
the config on the model so labels, counting, merging and saving find it.
``peftjax/methods/lora.py`` is the example to copy.

A method that has an HF PEFT counterpart also declares how it maps to HF
PEFT's files, in its own file: ``hf_peft_type`` and ``to_hf`` / ``from_hf`` on
the config, ``hf_tensors`` on the wrapper (see ``HfTensor``), tensors that
belong to no one module and config fields HF PEFT takes from the model in
``hf_model_tensors`` / ``hf_model_fields`` (VeRA's shared matrices, prompt
learning's ``prompt_embeddings``), and, if HF PEFT has default target modules
for it, ``default_targets``. The format itself is ``peftjax.core.hf_peft``'s.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import numpy as np
from flax import nnx

from peftjax.core.paths import ALL_LINEAR, Targets, validate_targets
from peftjax.core.registry import registrar
from peftjax.errors import PeftError
from peftjax.plugins import load_entry_points

# Label of parameters that do not train; make_optimizer maps it to optax.set_to_zero().
FROZEN = "frozen"
# A label rule: (matcher, label); matcher is a path regex (full match) or a Variable type.
LabelRule = tuple[str | type, str]

_REGISTRY: dict[str, type[MethodConfig]] = {}


# Class decorator that registers a ``MethodConfig`` under ``name``: ``@register_method(name)``.
register_method = registrar(_REGISTRY, "method", lambda: MethodConfig)


def registered_methods() -> dict[str, type[MethodConfig]]:
    """Registered method names and their config classes."""
    return dict(_REGISTRY)


def model_type_of(model: nnx.Module) -> str | None:
    """The Hugging Face ``model_type`` of ``model`` (its ``config.model_type``), if it has one."""
    return getattr(getattr(model, "config", None), "model_type", None)


@dataclasses.dataclass(frozen=True)
class HfTensor:
    """How one of a wrapper's variables is stored in an HF PEFT file.

    The torch tensor is the variable transposed by ``axes`` (torch axis i is
    our axis ``axes[i]``) and then reshaped to ``shape``, which may only add or
    drop axes of size 1: A (in, r) is ``lora_A.weight`` (r, in) with
    ``axes=(1, 0)``; an IA3 vector (out,) is ``ia3_l`` (out, 1).
    """

    attribute: str
    axes: tuple[int, ...]
    shape: tuple[int, ...]

    def to_torch(self, value: np.ndarray) -> np.ndarray:
        return np.transpose(value, self.axes).reshape(self.shape)

    def from_torch(self, value: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
        """``value`` in our layout, given our variable's shape ``ours``."""
        transposed = tuple(ours[a] for a in self.axes)
        return np.transpose(value.reshape(transposed), np.argsort(self.axes))


@dataclasses.dataclass(frozen=True)
class Slot:
    """One tensor of an adapter file: its ``shape`` in the file, ``read()``, its
    value from the model, and ``write(array)``, which sets the model's variables
    from the file's value. A slot may stand for one variable or several (prefix
    tuning's ``prompt_embeddings`` holds every layer's prefixes)."""

    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
    write: Callable[[np.ndarray], None]
    variables: tuple[nnx.Variable, ...] = ()  # what ``write`` sets

    @classmethod
    def of(
        cls,
        variable: nnx.Variable,
        shape: tuple[int, ...],
        to_file: Callable[[np.ndarray], np.ndarray] = np.asarray,
        from_file: Callable[[np.ndarray], np.ndarray] = np.asarray,
    ) -> Slot:
        """The slot of one variable, stored as ``to_file`` of its value."""

        def write(array: np.ndarray) -> None:
            variable[...] = jax.numpy.asarray(from_file(array), dtype=variable.dtype)

        return cls(shape, lambda: to_file(np.asarray(jax.device_get(variable.get_value()))), write, (variable,))


def config_from_dict(data: Mapping[str, Any]) -> MethodConfig:
    """Build a method config from ``{"type": name, **fields}`` (YAML/JSON form)."""
    data = dict(data)
    name = data.pop("type", None)
    if name not in _REGISTRY:
        load_entry_points()  # an installed plugin's method
    if name not in _REGISTRY:
        close = difflib.get_close_matches(str(name), _REGISTRY, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise PeftError(f"unknown method type {name!r}.{hint} Registered methods: {sorted(_REGISTRY)}")
    cls = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - fields)
    if unknown:
        close = {k: difflib.get_close_matches(k, fields, n=1) for k in unknown}
        hints = "".join(f" {k!r}: did you mean {c[0]!r}?" for k, c in close.items() if c)
        raise PeftError(f"{cls.__name__} has no field(s) {unknown}.{hints} Its fields: {sorted(fields)}")
    return cls(**data)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Fields every method shares.

    Attributes:
      targets: modules to wrap: a regex matching the whole dotted path, a list
        of names (a path matches when equal to a name or ending in ``.name``),
        or ``"all-linear"`` (every linear layer but the output head).
      exclude: modules never to wrap, same rules as ``targets``.
      also_train: parameter path regexes that train along with the adapter
        (a new classification head, say).
      seed: seeds the adapter's random initialisation.
    """

    method: ClassVar[str] = ""
    # Module types the method may wrap; empty for methods that only relabel parameters.
    target_types: ClassVar[tuple[type, ...]] = ()
    # HF PEFT's default target modules per ``model_type`` (its TRANSFORMERS_MODELS_TO_*_TARGET_MODULES_MAPPING):
    # with them, ``targets`` may be left out and ``for_model`` fills it in from the model's config.
    default_targets: ClassVar[Mapping[str, Targets]] = {}
    # The HF PEFT ``peft_type`` whose adapter_config.json ``from_hf`` reads (None: no HF form).
    hf_peft_type: ClassVar[str | None] = None
    # Whether HF PEFT counts the method as prompt learning: its state lives on the PeftModel, not in
    # the model's modules, and it applies through a task class (see peftjax.core.hf_peft).
    hf_prompt_learning: ClassVar[bool] = False

    targets: Targets | None = None
    exclude: Targets = ()
    also_train: tuple[str, ...] = ()
    seed: int = 0

    def __post_init__(self):
        if self.target_types and self.targets is None and not self.default_targets:
            raise PeftError(f"{type(self).__name__}.targets is required: module names, a regex, or 'all-linear'")
        self.check(self.exclude != ALL_LINEAR, "exclude", "must name modules or be a regex, not 'all-linear'")
        try:
            if self.targets is not None:
                self._set("targets", validate_targets(self.targets, f"{type(self).__name__}.targets"))
            # A regex stays a string, not a tuple of its letters.
            exclude = self.exclude if isinstance(self.exclude, str) or self.exclude else ()
            self._set("exclude", exclude and validate_targets(exclude, f"{type(self).__name__}.exclude"))
            self._set("also_train", tuple(self.also_train))
        except ValueError as err:
            raise PeftError(str(err)) from None

    def _set(self, name: str, value: Any) -> None:
        """Normalise a field during validation (the dataclass is frozen)."""
        object.__setattr__(self, name, value)

    def check(self, condition: bool, field: str, requirement: str) -> None:
        """Raise a ``PeftError`` naming the field, its value and what it must be."""
        if not condition:
            raise PeftError(f"{type(self).__name__}.{field}={getattr(self, field)!r}: {requirement}")

    def for_model(self, model: nnx.Module) -> MethodConfig:
        """This config with ``targets`` filled in from ``default_targets`` for
        ``model``'s ``config.model_type`` when it was left out (what ``apply`` records)."""
        if self.targets is not None or not self.target_types:
            return self
        return dataclasses.replace(self, targets=self.architecture_default(model, self.default_targets, "targets"))

    def architecture_default(self, model: nnx.Module, table: Mapping[str, Any], field: str) -> Any:
        """``table``'s entry for ``model``'s ``config.model_type``; the error asks for ``field``."""
        model_type = model_type_of(model)
        if model_type not in table:
            raise PeftError(
                f"{type(self).__name__}.{field} has no default for {type(model).__name__} (model_type "
                f"{model_type!r}); defaults exist for {sorted(table)}. Give {field} (module names or a regex)."
            )
        return table[model_type]

    def to_hf(self, names) -> dict[str, Any]:
        """The method's own fields of an HF PEFT ``adapter_config.json``, ``peft_type``
        included; ``names.to_hf`` writes a module selector of its own (IA3's feedforward)."""
        raise PeftError(f"{type(self).__name__} has no HF PEFT form; save it in peftjax's format (format='peftjax')")

    @classmethod
    def from_hf(cls, fields: dict[str, Any], names, **common: Any) -> MethodConfig:
        """The config an HF PEFT ``adapter_config.json`` describes. ``fields`` are
        the method's own: ``from_hf`` pops those it reads, and the caller refuses
        any left that is set; ``names.from_hf`` reads a module selector of its
        own. ``common`` holds ``targets``, ``exclude`` and ``also_train``."""
        raise PeftError(f"{cls.__name__} cannot read HF PEFT configs")

    def hf_model_tensors(self, model: nnx.Module, adapter_name: str) -> dict[str, Slot]:
        """The adapter's tensors in an HF PEFT file that belong to no one module,
        by file key (``"base_model.vera_A"``, ``"prompt_embeddings"``); works on
        abstract models (only shapes are read there)."""
        return {}

    @classmethod
    def hf_model_fields(cls, model: nnx.Module) -> dict[str, Any]:
        """Fields of the HF PEFT config that HF PEFT takes from the base model
        (prompt learning's ``num_layers``, ``token_dim``, ``num_attention_heads``);
        written on export and checked against ``model`` on import."""
        return {}

    def check_own_format(self, model: nnx.Module, adapter_name: str) -> None:
        """Raise a ``PeftError`` if peftjax's adapter format, which holds the
        trained parameters only, would not restore this adapter on ``model``."""

    def wrap(self, module: nnx.Module, *, adapter_name: str, rngs: nnx.Rngs) -> AdapterWrapper:
        """Build the wrapper that replaces ``module`` (methods with target types)."""
        raise PeftError(f"{type(self).__name__} does not wrap modules")

    def wrap_all(
        self, modules: Sequence[nnx.Module], *, model: nnx.Module, adapter_name: str, rngs: nnx.Rngs
    ) -> list[AdapterWrapper]:
        """Build the wrappers of every selected module, in order: what the engine calls.

        The default wraps each module with ``wrap``. Override this instead when
        building a wrapper needs the whole model (sizes from ``model.config``,
        prompt tuning's start from the token embeddings) or state that all of
        one adapter's wrappers share (prefix tuning's reparameterisation).
        As for ``wrap``, ``model`` must not be changed.
        """
        return [self.wrap(module, adapter_name=adapter_name, rngs=rngs) for module in modules]

    def label_rules(self, model: nnx.Module) -> list[LabelRule]:
        """Rules this method adds in front of the defaults (see peftjax.core.labels);
        ``model`` lets a method select by module type (LN tuning) or head names."""
        return [(pattern, "trainable") for pattern in self.also_train]

    def lr_multipliers(self) -> dict[str, float]:
        """Per-label learning-rate multipliers this method asks for (LoRA+)."""
        return {}

    def wrap_optimizer(self, tx, model: nnx.Module, adapter_name: str, labels: Mapping[str, str]):
        """The optimizer of the whole trainable tree, ``tx`` (an optax transformation,
        labels already applied), wrapped with what the method does during training
        (AdaLoRA's rank allocator); ``labels`` maps parameter paths to labels. By default ``tx``."""
        return tx

    def to_dict(self) -> dict[str, Any]:
        data = {"type": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            data[f.name] = list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, Mapping) else value
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


class AdapterWrapper(nnx.Module):
    """A module that replaces a target and calls it as ``self.base``.

    Subclasses implement ``__call__`` and, when the method can fold into the
    base kernel, ``_merge`` and ``_unmerge``. ``active`` and ``merged`` are
    static attributes: changing them retraces a jitted function once.
    """

    def __init__(self, base: nnx.Module, *, adapter_name: str):
        self.base = base
        self.adapter_name = adapter_name
        self.active = True
        self.merged = False

    @property
    def adds_output(self) -> bool:
        """Whether the adapter's own computation runs in ``__call__``."""
        return self.active and not self.merged

    @property
    def base_layer(self) -> nnx.Module:
        """The original layer under any stack of wrappers."""
        layer = self.base
        while isinstance(layer, AdapterWrapper):
            layer = layer.base
        return layer

    def hf_tensors(self) -> dict[str, HfTensor]:
        """This wrapper's tensors in an HF PEFT file, by name under the module's
        path (``"lora_A.weight"``): what ``peftjax.core.hf_peft`` writes and reads."""
        raise PeftError(f"{type(self).__name__} has no HF PEFT form")

    @classmethod
    def mergeable(cls) -> bool:
        return cls._merge is not AdapterWrapper._merge

    def merge(self) -> None:
        if not self.merged:
            self._merge()
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._unmerge()
            self.merged = False

    def _merge(self) -> None:
        raise PeftError(f"{type(self).__name__} cannot be merged into its base layer")

    def _unmerge(self) -> None:
        raise PeftError(f"{type(self).__name__} cannot be unmerged")
