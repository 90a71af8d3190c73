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
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from peftjax.core.batch_stats import adapter_statistics, record_updated
from peftjax.core.inject import applied_methods, apply
from peftjax.core.labels import param_labels
from peftjax.core.paths import dotted
from peftjax.errors import AdapterError
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
    return {name: _on_host(v.get_value()) for name, v in adapter_variables(model).items()}


def _on_host(value) -> np.ndarray:
    """A whole array in host memory, gathered from every process when it spans several."""
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(value, tiled=True))
    return np.asarray(jax.device_get(value))


def save_adapter(model: nnx.Module, path: str | os.PathLike) -> Path:
    """Write the model's adapters to the folder ``path`` atomically: the folder
    appears complete or not at all (written beside it, then renamed). A write
    that fails raises ``AdapterError`` and leaves an earlier adapter at
    ``path`` as it was. With several processes, every one must call it (the
    arrays are gathered from all), process 0 writes, and all return when the
    folder is there."""
    methods = applied_methods(model)
    if not methods:
        raise AdapterError("the model has no adapters to save: apply a method first (peftjax.apply)")
    path = Path(path)
    config = {
        "format_version": FORMAT_VERSION,
        "methods": [{"adapter_name": name, **config.to_dict()} for name, config in methods],
    }
    weights = adapter_state(model)
    if jax.process_index() != 0:
        _wait_for_process_0(f"save_adapter {path}")
        return path
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        save_file(weights, str(staging / WEIGHTS_FILE))
        (staging / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        _replace_folder(staging, path)
    except OSError as err:
        raise AdapterError(f"cannot write the adapter to {path} ({err.strerror or err}); an earlier adapter there "
                           "is left as it was. Free disk space or choose a writable folder.") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        _wait_for_process_0(f"save_adapter {path}")
    return path


def _wait_for_process_0(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _replace_folder(new: Path, path: Path) -> None:
    """``new`` renamed to ``path``; an old ``path`` is moved aside first and
    deleted last, so a failure leaves one complete folder at ``path``."""
    if not path.exists():
        new.rename(path)
        return
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    path.rename(old)
    try:
        new.rename(path)
    except OSError:
        old.rename(path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _read(path: Path):
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise AdapterError(f"{file} not found: an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE} (peftjax.save_adapter)")
    try:
        config = json.loads(config_file.read_text())
        methods = []
        for entry in config["methods"]:
            entry = dict(entry)
            methods.append((entry.pop("adapter_name"), config_from_dict(entry)))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise AdapterError(f"{config_file} is not a peftjax adapter config: {err}") from None
    try:
        arrays = load_file(str(weights_file))
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{weights_file} cannot be read ({err}); re-save the adapter") from None
    return methods, arrays


def _attach(model: nnx.Module, methods) -> nnx.Module:
    for name, config in methods:
        apply(model, config, adapter_name=name, stack=True)
    return model


def load_adapter(model: nnx.Module, path: str | os.PathLike) -> nnx.Module:
    """Apply the saved methods to ``model`` (a freshly loaded base) and fill in
    the saved parameters and running statistics. Everything is checked on an
    abstract copy first, so a mismatched file raises and leaves ``model`` as it
    was. Batch norms whose statistics the file holds are recorded as changed,
    so that saving ``model`` again keeps them."""
    methods, arrays = _read(Path(path))
    abstract = nnx.eval_shape(lambda m: _attach(m, methods), model)
    expected = {k: tuple(v.get_value().shape) for k, v in adapter_variables(abstract).items()}
    # Statistics beyond the required ones: those a train state updated in frozen batch norms.
    statistics = {dotted(p): tuple(v.get_value().shape) for p, v in nnx.iter_graph(abstract) if isinstance(v, nnx.BatchStat)}
    expected.update({k: shape for k, shape in statistics.items() if k in arrays})
    missing, unexpected = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
    wrong = [f"{k}: file {arrays[k].shape}, model {expected[k]}" for k in expected.keys() & arrays.keys()
             if tuple(arrays[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise AdapterError(
            f"adapter at {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {wrong[:5]}. Load it onto the base model it was trained on."
        )
    _attach(model, methods)
    for p, variable in nnx.iter_graph(model):
        name = dotted(p)
        if name in arrays:
            variable[...] = jax.numpy.asarray(arrays[name], dtype=variable.dtype)
    record_updated(model, {name.rpartition(".")[0] for name in arrays if name in statistics})
    return model

