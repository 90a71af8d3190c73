"""Adapter files: the trainable state alone, loadable onto a fresh base model.

A saved adapter is a folder holding ``adapter_config.json`` (the applied
methods, in order, with their adapter names) and ``adapter_model.safetensors``
(every parameter the default labels train, by dotted path, and the running
statistics of the batch norms whose statistics changed: those that train, and
those a train state recorded as updated, see ``peftjax.core.batch_stats``).
Base weights are never written: a LoRA adapter of bert-base is a few hundred
kilobytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from peftjax.core.batch_stats import adapter_statistics, record_updated
from peftjax.core.inject import applied_methods, apply
from peftjax.core.labels import param_labels
from peftjax.core.new_head import new_head
from peftjax.core.paths import dotted
from peftjax.errors import PeftError
from peftjax.methods.base import FROZEN, config_from_dict

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1


def adapter_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """``{dotted path: variable}`` of what an adapter file holds (see the module docstring)."""
    # Inactive adapters too: load_adapter re-creates every saved adapter and needs all their parameters.
    labels = param_labels(model, freeze_inactive=False)
    params = {
        dotted(p): v for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param) and labels[dotted(p)] != FROZEN
    }
    return {**params, **adapter_statistics(model, labels)}


def adapter_state(model: nnx.Module) -> dict[str, np.ndarray]:
    """``{dotted path: array}`` of every parameter the default labels train (inactive adapters' included)
    and of the running statistics that changed."""
    return {name: np.asarray(jax.device_get(v.get_value())) for name, v in adapter_variables(model).items()}


def save_adapter(model: nnx.Module, path: str | os.PathLike) -> Path:
    """Write the model's adapters to the folder ``path`` atomically: the folder
    appears complete or not at all (written beside it, then renamed)."""
    methods = applied_methods(model)
    if not methods:
        raise PeftError("the model has no adapters to save: apply a method first (peftjax.apply)")
    path = Path(path)
    config = {
        "format_version": FORMAT_VERSION,
        "methods": [{"adapter_name": name, **config.to_dict()} for name, config in methods],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(adapter_state(model), str(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _read(path: Path):
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise PeftError(f"{file} not found: an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE} (peftjax.save_adapter)")
    try:
        config = json.loads(config_file.read_text())
        methods = []
        for entry in config["methods"]:
            entry = dict(entry)
            methods.append((entry.pop("adapter_name"), config_from_dict(entry)))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise PeftError(f"{config_file} is not a peftjax adapter config: {err}") from None
    try:
        arrays = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise PeftError(f"{weights_file} cannot be read ({err}); re-save the adapter") from None
    return methods, arrays


def _attach(model: nnx.Module, methods) -> nnx.Module:
    for name, config in methods:
        apply(model, config, adapter_name=name, stack=True)
    return model


def saved_names(path: str | os.PathLike) -> set[str]:
    """The dotted paths an adapter folder's weights file holds."""
    with safe_open(str(Path(path) / WEIGHTS_FILE), framework="np") as handle:
        return set(handle.keys())


def _misfit_hint(model: nnx.Module, missing: list[str], unexpected: list[str]) -> str:
    """Why an adapter may not fit: a head trained or not, a model with another head."""
    head = new_head(model)
    if head is not None and head.trains and set(head.paths) & set(missing):
        return (" The model's new head is not in the file: the adapter was trained with the head frozen. "
                "Load the base with freeze_new_head=True (model.freeze_new_head: true) and the same seed.")
    params = {dotted(p) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param)}
    roots = sorted({name.split(".", 1)[0] for name in unexpected})
    if unexpected and not {name.split(".", 1)[0] for name in params} & set(roots):
        return (f" The file's paths start with {roots} and this {type(model).__name__}'s do not: the adapter was "
                "trained on another model, or on this one with a task head; load the base with the task it was "
                "trained with (task='classification', 'causal_lm', ...; num_labels=N).")
    return " Load it onto the base model it was trained on."


def load_adapter(model: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Apply the saved methods to ``model`` (a freshly loaded base) and fill in
    the saved parameters and running statistics. Everything is checked on an
    abstract copy first, so a mismatched file raises and leaves ``model`` as it
    was. Batch norms whose statistics the file holds are recorded as changed,
    so that saving ``model`` again keeps them. A new head (see
    ``peftjax.core.new_head``) the file holds is filled in whether it trains
    on ``model`` or not."""
    methods, arrays = _read(Path(path))
    abstract = nnx.eval_shape(lambda m: _attach(m, methods), model)
    expected = {k: tuple(v.get_value().shape) for k, v in adapter_variables(abstract).items()}
    # Beyond the required ones: the statistics a train state updated in frozen batch norms, and a frozen new head.
    head = new_head(model)
    head_paths = set(head.paths) if head is not None else set()
    optional = {dotted(p): tuple(v.get_value().shape) for p, v in nnx.iter_graph(abstract)
                if isinstance(v, nnx.BatchStat) or (isinstance(v, nnx.Param) and dotted(p) in head_paths)}
    expected.update({k: shape for k, shape in optional.items() if k in arrays})
    missing, unexpected = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    wrong = [f"{k}: file {arrays[k].shape}, model {expected[k]}" for k in expected.keys() & arrays.keys()
             if tuple(arrays[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise PeftError(
            f"adapter at {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {wrong[:5]}." + _misfit_hint(model, missing, unexpected)
        )
    _attach(model, methods)
    for p, variable in nnx.iter_graph(model):
        name = dotted(p)
        if name in arrays:
            variable[...] = jax.numpy.asarray(arrays[name], dtype=variable.dtype)
    statistics = {dotted(p) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.BatchStat)}
    record_updated(model, {name.rpartition(".")[0] for name in arrays if name in statistics})
    return model


