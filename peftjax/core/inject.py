"""Model surgery: put method wrappers into an NNX module graph, merge, unmerge.

Every operation here validates first and changes the model only when nothing
can fail any more, so a model that raised is the model it was.
"""

from __future__ import annotations

from collections.abc import Iterator

from flax import nnx

from peftjax.core.kernels import SUPPORTED_LAYERS
from peftjax.core.paths import ALL_LINEAR, dotted, matches, suggest, unmatched
from peftjax.errors import PeftError
from peftjax.methods.base import AdapterWrapper, MethodConfig
from peftjax.points import InsertionPoint

# The attribute on the model's root module where applied methods are recorded,
# as a tuple of (adapter name, config) pairs: static, so it lives in the graphdef.
METHODS_ATTR = "peftjax_methods"
DEFAULT_ADAPTER = "default"
# Output heads that "all-linear" leaves alone when the model names none itself.
DEFAULT_OUTPUT_HEADS = ("lm_head", "classifier", "score", "head")


def applied_methods(model: nnx.Module) -> tuple[tuple[str, MethodConfig], ...]:
    """The (adapter name, config) pairs applied to ``model``, oldest first."""
    return getattr(model, METHODS_ATTR, ())


def iter_wrappers(model: nnx.Module) -> Iterator[tuple[str, AdapterWrapper]]:
    """Every wrapper in ``model`` with its dotted path, inner wrappers first."""
    found = [(dotted(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, AdapterWrapper)]
    yield from sorted(found, key=lambda item: -item[0].count("."))


def _candidates(model: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
    """Modules a config may target: all but the root and the insides of wrappers
    (a wrapper's base and its own sub-modules belong to the wrapper)."""
    modules = list(nnx.iter_modules(model))
    inside = {p for p, m in modules if isinstance(m, AdapterWrapper)}
    return [
        (p, m)
        for p, m in modules
        if p and not any(p[: len(w)] == w and len(p) > len(w) for w in inside)
    ]


def _layer(module: nnx.Module) -> nnx.Module:
    return module.base_layer if isinstance(module, AdapterWrapper) else module


def _select(model: nnx.Module, config: MethodConfig) -> list[tuple[tuple, nnx.Module]]:
    candidates = _candidates(model)
    if config.target_types and not any(isinstance(_layer(m), config.target_types) for _, m in candidates):
        names = [t.__name__ for t in config.target_types]
        kind = "insertion points" if all(issubclass(t, InsertionPoint) for t in config.target_types) else "modules"
        raise PeftError(
            f"{config.method} on a model without {' or '.join(names)} {kind}: {type(config).__name__} wraps only "
            f"those, and {type(model).__name__} has none"
            + (" (the models in peftjax.models place them in every layer; see peftjax.points)" if kind != "modules" else "")
        )
    if config.targets == ALL_LINEAR:
        heads = set(getattr(type(model), "output_head_names", DEFAULT_OUTPUT_HEADS))
        chosen = [
            (p, m)
            for p, m in candidates
            if isinstance(_layer(m), SUPPORTED_LAYERS)
            and not heads.intersection(str(k) for k in p)
        ]
    else:
        paths = [dotted(p) for p, _ in candidates]
        missed = unmatched(config.targets, paths)
        if missed and len(missed) < len(config.targets):  # a typo in one name would drop that module silently
            raise PeftError(
                f"{type(config).__name__}.targets: {missed} match no module of this {type(model).__name__} "
                f"(the other entries do). Every entry must name a module." + suggest(missed, paths)
            )
        chosen = [(p, m) for p, m in candidates if matches(dotted(p), config.targets)]
    chosen = [(p, m) for p, m in chosen if not (config.exclude and matches(dotted(p), config.exclude))]
    if not chosen:
        paths = [dotted(p) for p, _ in candidates]
        raise PeftError(
            f"{config!r} matched no module (targets={config.targets!r}, exclude={config.exclude!r})."
            + suggest(config.targets, paths)
        )
    return chosen


def _parent(model: nnx.Module, path: tuple) -> nnx.Module:
    node = model
    for key in path[:-1]:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    return node


def _assign(parent, key, value) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def apply(
    model: nnx.Module,
    config: MethodConfig,
    *,
    adapter_name: str = DEFAULT_ADAPTER,
    stack: bool = False,
) -> nnx.Module:
    """Apply a PEFT method to ``model`` in place and return ``model``.

    Selects target modules by dotted path (see ``MethodConfig.targets``; left
    out, the method's defaults for the model's architecture), wraps each in the
    method's wrapper, and records the config, defaults filled in, on the model.
    Wrapping a module that is already wrapped raises unless ``stack=True``.
    All checks run and every wrapper is built before the model changes.

    Raises:
      PeftError: the config matches nothing (the message suggests close names
        and shows some paths), a target's layer type is not supported, a target
        is already wrapped, or ``adapter_name`` is taken.
    """
    if not isinstance(model, nnx.Module):
        raise PeftError(f"apply() needs an nnx.Module, got {type(model).__name__}")
    if not isinstance(config, MethodConfig):
        raise PeftError(f"apply() needs a method config (e.g. peftjax.LoraConfig), got {type(config).__name__}")
    config = config.for_model(model)
    taken = [name for name, _ in applied_methods(model)]
    if adapter_name in taken:
        raise PeftError(f"adapter name {adapter_name!r} is already used on this model ({taken}); pick another")

    replacements = []
    if config.target_types:
        rngs = nnx.Rngs(params=config.seed, dropout=config.seed + 1)
        selected = _select(model, config)
        for path, module in selected:
            where = dotted(path)
            if isinstance(module, AdapterWrapper) and not stack:
                raise PeftError(
                    f"{where} is already wrapped by {type(module).__name__} (adapter "
                    f"{module.adapter_name!r}); pass stack=True to wrap it again"
                )
            layer = module.base_layer if isinstance(module, AdapterWrapper) else module
            if not isinstance(layer, config.target_types):
                raise PeftError(
                    f"{where} is a {type(layer).__name__}; {type(config).__name__} wraps "
                    f"{[t.__name__ for t in config.target_types]}. Narrow targets or add it to exclude."
                )
        wrappers = config.wrap_all([m for _, m in selected], model=model, adapter_name=adapter_name, rngs=rngs)
        if len(wrappers) != len(selected):
            raise PeftError(f"{type(config).__name__}.wrap_all built {len(wrappers)} wrappers for {len(selected)} modules")
        for (path, module), wrapper in zip(selected, wrappers):
            replacements.append((_parent(model, path), path[-1], module, wrapper))
    else:
        # A method that only relabels parameters (BitFit, LN tuning) raises here,
        # not at the first count or optimizer, when it selects nothing on this model.
        config.label_rules(model)

    done = []
    try:
        for parent, key, old, new in replacements:
            _assign(parent, key, new)
            done.append((parent, key, old))
        setattr(model, METHODS_ATTR, (*applied_methods(model), (adapter_name, config)))
    except Exception:
        for parent, key, old in reversed(done):
            _assign(parent, key, old)
        raise
    return model


def merge(model: nnx.Module, adapter_name: str | None = None) -> nnx.Module:
    """Fold adapters into their base kernels: zero inference overhead.

    With ``adapter_name=None``, every *active* adapter merges (the ones the
    forward pass runs, see ``set_active_adapters``); inactive adapters stay as
    they are. With a name, that adapter alone merges, and it must be active
    (an inactive adapter does not compute, so folding it in would change the
    output). Merging an adapter already merged changes nothing; ``unmerge``
    undoes it.

    Raises ``PeftError`` before changing anything if the name is unknown or
    inactive, or an adapter to merge has no merged form (prompt tuning,
    bottleneck adapters).
    """
    wrappers = [(p, w) for p, w in iter_wrappers(model) if w.active and not w.merged]
    if adapter_name is not None:
        _check_names(model, [adapter_name])
        inactive = [p for p, w in iter_wrappers(model) if w.adapter_name == adapter_name and not w.active]
        if inactive:
            raise PeftError(f"adapter {adapter_name!r} is inactive (e.g. at {inactive[0]}); "
                            f"set_active_adapters(model, {adapter_name!r}) first")
        wrappers = [(p, w) for p, w in wrappers if w.adapter_name == adapter_name]
    blocked = [f"{p} ({type(w).__name__})" for p, w in wrappers if not w.mergeable()]
    if blocked:
        raise PeftError(f"cannot merge: these adapters have no merged form: {blocked}. Disable them first.")
    for _, wrapper in wrappers:
        wrapper.merge()
    return model


def unmerge(model: nnx.Module, adapter_name: str | None = None) -> nnx.Module:
    """Undo :func:`merge`, restoring the base kernels (of adapter ``adapter_name`` alone, if given)."""
    if adapter_name is not None:
        _check_names(model, [adapter_name])
    for _, wrapper in reversed(list(iter_wrappers(model))):
        if adapter_name is None or wrapper.adapter_name == adapter_name:
            wrapper.unmerge()
    return model


def _adapter_names(model: nnx.Module) -> list[str]:
    return [name for name, _ in applied_methods(model)]


def _check_names(model: nnx.Module, names) -> None:
    unknown = sorted(set(names) - set(_adapter_names(model)))
    if unknown:
        raise PeftError(f"no adapter named {unknown} on this model; adapters: {_adapter_names(model)}")


def set_active_adapters(model: nnx.Module, names: str | list[str]) -> nnx.Module:
    """Make exactly the adapters in ``names`` compute; the others pass through.

    Inactive adapters' parameters are labelled frozen, so they do not train.
    A merged adapter cannot be switched off: unmerge first.
    """
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    wrappers = [w for _, w in iter_wrappers(model)]
    merged = sorted({w.adapter_name for w in wrappers if w.merged and w.adapter_name not in names})
    if merged:
        raise PeftError(f"adapters {merged} are merged into the base kernels; call peftjax.unmerge(model) first")
    for wrapper in wrappers:
        wrapper.active = wrapper.adapter_name in names
    return model


def disable_adapters(model: nnx.Module) -> nnx.Module:
    """Base-model forward: every adapter passes through (undo with set_active_adapters)."""
    return set_active_adapters(model, [])


def delete_adapter(model: nnx.Module, name: str) -> nnx.Module:
    """Remove adapter ``name``: each of its wrappers is replaced by what it wrapped."""
    _check_names(model, [name])
    doomed = [(p, w) for p, w in iter_wrappers(model) if w.adapter_name == name]
    merged = [p for p, w in doomed if w.merged]
    if merged:
        raise PeftError(f"adapter {name!r} is merged at {merged[:3]}; call peftjax.unmerge(model) first")
    paths = {dotted(p): p for p, m in nnx.iter_modules(model) if isinstance(m, AdapterWrapper)}
    for where, wrapper in doomed:
        path = paths[where]
        _assign(_parent(model, path), path[-1], wrapper.base)
    remaining = tuple((n, c) for n, c in applied_methods(model) if n != name)
    if remaining:
        setattr(model, METHODS_ATTR, remaining)
    else:  # the graph definition of the model before any apply: jit caches and TrainStates match it again
        delattr(model, METHODS_ATTR)
    return model
