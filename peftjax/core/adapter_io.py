"""Adapter files: the trainable state alone, loadable onto a fresh base model.

A saved adapter is a folder holding ``adapter_config.json`` and
``adapter_model.safetensors``, in one of two formats:

* peftjax's (the default): the config lists the applied methods, in order,
  with their adapter names, and the weights are every parameter the default
  labels train, by dotted path, and the running statistics of the batch norms
  whose statistics changed: those that train, and those a train state
  recorded as updated (see ``peftjax.core.batch_stats``);
* HF PEFT's (``format="peft"``): one adapter, which ``peft.PeftModel.
  from_pretrained`` loads onto the transformers model (see
  ``peftjax.core.hf_peft``).

``load_adapter`` reads either, telling them apart by ``peft_type``. Base
weights are never written: a LoRA adapter of bert-base is a few hundred
kilobytes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError
from safetensors.flax import load_file
from safetensors.numpy import save_file

from peftjax.core import hf_peft
from peftjax.core.batch_stats import adapter_statistics, record_updated
from peftjax.core.inject import DEFAULT_ADAPTER, applied_methods, apply
from peftjax.core.labels import param_labels
from peftjax.core.new_head import new_head
from peftjax.core.paths import dotted
from peftjax.errors import AdapterError, PeftError
from peftjax.methods.base import FROZEN, Slot, config_from_dict

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"  # what older PEFT versions wrote; never read
FORMAT_VERSION = 1


def adapter_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
    """``{dotted path: variable}`` of what a peftjax adapter file holds (see the module docstring)."""
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


def save_adapter(model: nnx.Module, path: str | os.PathLike, *, format: Literal["peftjax", "peft"] = "peftjax") -> Path:
    """Write the model's adapters to the folder ``path`` atomically: the folder
    appears complete or not at all (written beside it, then renamed). A write
    that fails raises ``AdapterError`` and leaves an earlier adapter at
    ``path`` as it was. With several processes, every one must call it (the
    arrays are gathered from all), process 0 writes, and all return when the
    folder is there.

    ``format="peft"`` writes HF PEFT's layout (one adapter; see
    ``peftjax.core.hf_peft``) for ``peft.PeftModel.from_pretrained``.
    """
    if not applied_methods(model):
        raise AdapterError("the model has no adapters to save: apply a method first (peftjax.apply)")
    if format == "peft":
        config, arrays = hf_peft.to_hf(model)
        metadata = {"format": "pt"}  # as torch-saved safetensors are marked
    elif format == "peftjax":
        for name, method in applied_methods(model):
            method.check_own_format(model, name)
        config = {
            "format_version": FORMAT_VERSION,
            "methods": [{"adapter_name": name, **c.to_dict()} for name, c in applied_methods(model)],
        }
        arrays, metadata = adapter_state(model), None
    else:
        raise AdapterError(f"format={format!r}: choose 'peftjax' or 'peft' (HF PEFT's layout)")
    path = Path(path)
    if jax.process_index() != 0:
        _wait_for_process_0(f"save_adapter {path}")
        return path
    staging = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        save_file(arrays, str(staging / WEIGHTS_FILE), metadata=metadata)
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


def _read(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not weights_file.is_file() and (path / PICKLE_FILE).is_file():
        raise AdapterError(
            f"{path} holds {PICKLE_FILE} but no {WEIGHTS_FILE}: peftjax reads safetensors only (a pickle can run "
            "code). Convert it once in PyTorch: peft.PeftModel.from_pretrained(base_model, DIR).save_pretrained(DIR)"
        )
    for file in (config_file, weights_file):
        if not file.is_file():
            raise AdapterError(f"{file} not found: an adapter folder holds {CONFIG_FILE} and {WEIGHTS_FILE} (peftjax.save_adapter)")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{config_file} is not valid JSON: {err}") from None
    try:
        arrays = {k: np.asarray(v) for k, v in load_file(str(weights_file)).items()}
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{weights_file} cannot be read ({err}); re-save the adapter") from None
    return config, arrays


def _methods(config: dict[str, Any], config_file: Path, adapter_name: str | None):
    """The (adapter name, method config) pairs a peftjax adapter config lists."""
    try:
        methods = []
        for entry in config["methods"]:
            entry = dict(entry)
            methods.append((entry.pop("adapter_name"), config_from_dict(entry)))
    except (KeyError, TypeError) as err:
        raise AdapterError(f"{config_file} is neither a peftjax nor an HF PEFT adapter config: {err}") from None
    if adapter_name is not None:
        if len(methods) != 1:
            raise AdapterError(f"adapter_name= renames a single adapter; {config_file} holds {[n for n, _ in methods]}")
        methods = [(adapter_name, methods[0][1])]
    return methods


def _attach(model: nnx.Module, methods) -> nnx.Module:
    for name, config in methods:
        apply(model, config, adapter_name=name, stack=True)
    return model


def _own_slots(model: nnx.Module, arrays, head_paths: set[str]) -> dict[str, Slot]:
    """peftjax's layout: each variable as it is, by dotted path; besides the
    required ones, the statistics of frozen batch norms a train state updated
    and a frozen new head, when the file holds them."""
    variables = adapter_variables(model)
    variables.update({
        dotted(p): v for p, v in nnx.iter_graph(model)
        if (isinstance(v, nnx.BatchStat) or (isinstance(v, nnx.Param) and dotted(p) in head_paths))
        and dotted(p) in arrays
    })  # fmt: skip
    return {k: Slot.of(v, tuple(v.get_value().shape)) for k, v in variables.items()}


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


def load_adapter(model: nnx.Module, path: str | os.PathLike, *, adapter_name: str | None = None) -> nnx.Module:
    """Apply the saved methods to ``model`` (a freshly loaded base) and fill in
    the saved parameters and running statistics, from a peftjax or an HF PEFT
    adapter folder (an HF adapter, or a renamed single one, is named
    ``adapter_name``; "default" if not given). Everything is checked on an
    abstract copy first, so a file that does not fit raises and leaves
    ``model`` as it was. Batch norms whose statistics the file holds are
    recorded as changed, so that saving ``model`` again keeps them. A new head
    (see ``peftjax.core.new_head``) the file holds is filled in whether it
    trains on ``model`` or not."""
    fill_adapter(model, path, adapter_name=adapter_name)
    return model


def fill_adapter(model: nnx.Module, path: str | os.PathLike, *, adapter_name: str | None = None) -> set[str]:
    """``load_adapter``, returning the dotted paths of the variables it filled."""
    path = Path(path)
    head = new_head(model)
    head_paths = set(head.paths) if head is not None else set()
    config, arrays = _read(path)
    if "peft_type" in config:
        name = adapter_name or DEFAULT_ADAPTER
        methods = [(name, hf_peft.method_from_hf(config, model, source=str(path / CONFIG_FILE)))]
        slots_of = lambda m: hf_peft.slots(m, *methods[0])  # noqa: E731
        copies_of = lambda abstract: hf_peft.base_copies(abstract, model, name)  # noqa: E731
    else:
        methods = _methods(config, path / CONFIG_FILE, adapter_name)
        slots_of = lambda m: _own_slots(m, arrays, head_paths)  # noqa: E731
        copies_of = lambda abstract: {}  # noqa: E731
    try:
        abstract = nnx.eval_shape(lambda m: _attach(m, methods), model)
    except PeftError as err:
        raise AdapterError(f"adapter at {path} does not fit this model: {err}") from None
    expected, copies = {k: slot.shape for k, slot in slots_of(abstract).items()}, copies_of(abstract)
    missing, unexpected = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected) - set(copies))
    wrong = [f"{k}: file {arrays[k].shape}, model {expected[k]}" for k in sorted(expected.keys() & arrays.keys())
             if tuple(arrays[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        raise AdapterError(
            f"adapter at {path} does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {wrong[:5]}." + _misfit_hint(model, missing, unexpected)
        )
    replaced = [k for k in sorted(copies.keys() & arrays.keys())
                if not np.array_equal(arrays[k].astype(copies[k].dtype), copies[k])]
    if replaced:
        raise AdapterError(
            f"adapter at {path} holds base tables that differ from this model's ({replaced}; a resized vocabulary?). "
            "peftjax adapters leave base weights alone: load the base model those tables belong to."
        )
    _attach(model, methods)
    slots = slots_of(model)
    for key, slot in slots.items():
        slot.write(arrays[key])
    filled = {id(v): v for slot in slots.values() for v in slot.variables}
    statistics = {key for key, slot in slots.items() if any(isinstance(v, nnx.BatchStat) for v in slot.variables)}
    record_updated(model, {key.rpartition(".")[0] for key in statistics})
    return {dotted(p) for p, v in nnx.iter_graph(model) if id(v) in filled}
