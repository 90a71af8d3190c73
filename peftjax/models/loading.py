"""Hugging Face checkpoints in and out: ``from_pretrained`` and ``save_pretrained``.

A model's parameter paths already equal the checkpoint's module names (the
models mirror transformers' attribute names), so mapping is mechanical: the
leaf name becomes ``weight``/``bias`` and linear (and conv) kernels are
transposed from torch's (out, in) layout. Batch norms' running statistics
(``nnx.BatchStat``) are checkpoint entries too, and load and save like
parameters. Loading builds the model abstractly
with ``nnx.eval_shape``, checks every checkpoint shape before reading any
tensor, and reads tensors one at a time. Only parameters the checkpoint lacks
(a new head) are initialised for real, inside one ``jax.jit`` whose unused
outputs XLA prunes, so a large model is never randomly initialised first;
dropout RNG streams are seeded directly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from peftjax.core.new_head import mark_new_head
from peftjax.models import registry
from peftjax.models.errors import (
    CheckpointNotFoundError,
    ModelLoadError,
    UnsupportedModelError,
)
from peftjax.models.factory import PRESETS
from peftjax.models.layouts import (
    CHECKPOINT_VARIABLES,
    checkpoint_names,
    contiguous,
    model_shape,
    to_model_layout,
    to_torch_layout,
    to_torch_shape,
)
from peftjax.models.names import CONFIG_NAME, WEIGHTS_INDEX_NAME, resolve_checkpoint

logger = logging.getLogger("peftjax.models")

WEIGHTS_NAME = "model.safetensors"
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "tf_model.h5")

# Checkpoint entries that are buffers, not parameters: never reported.
_IGNORED_KEYS = re.compile(r"(^|\.)(position_ids|token_type_ids|rotary_emb\.inv_freq)$")
# Pre-2019 BERT checkpoints name LayerNorm parameters gamma/beta.
_LEGACY_LEAVES = {"gamma": "weight", "beta": "bias"}



@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What ``from_pretrained`` did with each parameter and checkpoint entry.

    ``missing_keys`` were not in the checkpoint and were newly initialised;
    ``unexpected_keys`` were in the checkpoint and unused;
    ``mismatched_keys`` (only with ``ignore_mismatched_sizes=True``) had the
    wrong shape and were re-initialised: (key, checkpoint shape, model shape).
    """

    checkpoint: str
    loaded_keys: tuple[str, ...]
    missing_keys: tuple[str, ...]
    unexpected_keys: tuple[str, ...]
    mismatched_keys: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()


# --------------------------------------------------------------------------
# Finding and opening checkpoints.
# --------------------------------------------------------------------------


def read_config(folder: Path) -> dict[str, Any]:
    """The checkpoint folder's ``config.json`` as a dict; errors say what is missing."""
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        present = sorted(p.name for p in folder.iterdir())[:20]
        raise CheckpointNotFoundError(
            f"No {CONFIG_NAME} in checkpoint folder {str(folder)!r} (it holds: {present}). "
            f"Point to the folder that contains {CONFIG_NAME} and the *.safetensors weights, "
            "or write one with save_pretrained."
        )
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ModelLoadError(
            f"{str(config_file)!r} is not valid JSON ({error}); re-download or re-save it."
        ) from error


def _weight_files(folder: Path, config: Mapping[str, Any]) -> dict[str, Path]:
    """Maps each checkpoint key to its safetensors file (single or sharded)."""
    index_file = folder / WEIGHTS_INDEX_NAME
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text()).get("weight_map", {})
        files = {}
        for key, name in weight_map.items():
            shard = folder / name
            if not shard.is_file():
                raise CheckpointNotFoundError(
                    f"Shard {name!r} listed in {str(index_file)!r} (for {key!r}) is missing; "
                    "re-download the checkpoint so every shard is present."
                )
            files[key] = shard
        return files
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        pickles = [name for name in _PICKLE_WEIGHTS if (folder / name).exists()]
        if pickles:
            architecture = (config.get("architectures") or ["AutoModel"])[0]
            raise ModelLoadError(
                f"Checkpoint folder {str(folder)!r} has only {pickles[0]} and peftjax reads "
                "safetensors only (pickled weights can run code and need torch). Convert it "
                "once with transformers: `transformers."
                f"{architecture}.from_pretrained(DIR).save_pretrained(DIR)` (transformers 5 "
                "writes model.safetensors; on 4.x pass safe_serialization=True)."
            )
        raise CheckpointNotFoundError(
            f"No *.safetensors weights in checkpoint folder {str(folder)!r}; expected "
            f"{WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} with its shards. A Hub repository that "
            "only publishes pytorch_model.bin must be converted once with transformers' "
            "save_pretrained (which writes safetensors)."
        )
    files = {}
    for shard in shards:
        for key in _open(shard).keys():
            files[key] = shard
    return files


def _open(file: Path) -> _Checked:
    """``safe_open`` that turns a corrupt or truncated file into a clear error."""
    try:
        return _Checked(safe_open(str(file), framework="np"), file)
    except (SafetensorError, OSError) as error:
        raise _corrupt(file, error) from error


class _Checked:
    """Forwards to a safetensors handle, translating read errors."""

    def __init__(self, handle: Any, file: Path):
        self._handle, self._file = handle, file

    def keys(self) -> list[str]:
        return list(self._handle.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        try:
            return tuple(self._handle.get_slice(key).get_shape())
        except (SafetensorError, OSError) as error:
            raise _corrupt(self._file, error, key) from error

    def tensor(self, key: str) -> np.ndarray:
        try:
            return self._handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError) as error:
            raise _corrupt(self._file, error, key) from error


def _corrupt(file: Path, error: Exception, key: str | None = None) -> ModelLoadError:
    where = f" while reading {key!r}" if key else ""
    return ModelLoadError(
        f"Safetensors file {str(file)!r} is truncated or corrupt{where} ({error}). "
        "Re-download it (delete the cached copy first) or re-save the checkpoint."
    )


# --------------------------------------------------------------------------
# from_pretrained.
# --------------------------------------------------------------------------


def _canonical(key: str, prefix: str) -> str:
    """A checkpoint key without the base-model prefix and with legacy leaf names.

    Checkpoints of bare encoders (``BertModel``) have no ``bert.`` prefix,
    checkpoints of models with heads do; comparing without it lets either
    load into either.
    """
    head, _, leaf = key.rpartition(".")
    if head.endswith(("LayerNorm", "layer_norm", "layernorm")) and leaf in _LEGACY_LEAVES:
        key = f"{head}.{_LEGACY_LEAVES[leaf]}"
    if key.startswith(prefix + "."):
        key = key[len(prefix) + 1 :]
    return key


def _summarise(keys: Iterable[str], limit: int = 12) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def checkpoint_architecture(path: str | os.PathLike, revision: str | None = None) -> registry.ModelConfig:
    """The model config of a checkpoint's ``config.json``, without reading its weights
    (``from_config`` on it builds the architecture with random weights)."""
    folder = resolve_checkpoint(path, revision, presets=PRESETS)
    hf_config = read_config(folder)
    try:
        return registry.config_from_hf_dict(hf_config)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"{str(folder / CONFIG_NAME)!r}: {error}") from None


def from_pretrained(
    path: str | os.PathLike,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    seed: int | jax.Array = 0,
    revision: str | None = None,
    config_overrides: Mapping[str, Any] | None = None,
    strict: bool = False,
    ignore_mismatched_sizes: bool = False,
    freeze_new_head: bool = False,
    adapter: str | os.PathLike | None = None,
    output_loading_info: bool = False,
) -> nnx.Module | tuple[nnx.Module, LoadReport]:
    """Loads a transformers checkpoint (config.json + safetensors) into a peftjax model.

    Args:
        path: a local checkpoint folder, a packaged checkpoint's name
            (``"minilm"``, see ``peftjax.models.names``), or a Hub repo id
            resolved through ``huggingface_hub.snapshot_download`` (works
            offline from the cache).
        task: which head to build ("base", "classification",
            "token_classification", "causal_lm", "image_classification", the
            names ``data.task`` takes); by default the checkpoint's
            ``architectures`` decide.
        num_labels: size of a classification head; overrides the checkpoint's.
        dtype: computation dtype. param_dtype: storage dtype of parameters.
        seed: an int or a typed PRNG key (``jax.random.key``); seeds newly
            initialised parameters and dropout.
        revision: Hub revision, when ``path`` is a repo id.
        config_overrides: config fields to replace, e.g. ``{"remat": True}``
            or dropout rates.
        strict: raise instead of warning when keys are missing or unexpected.
        ignore_mismatched_sizes: re-initialise (and report) parameters whose
            checkpoint shape differs, e.g. a classifier with other labels,
            instead of raising.
        freeze_new_head: keep the parameters the checkpoint lacks (a new
            head) frozen. By default they train along with any PEFT method
            applied later, as HF PEFT's ``modules_to_save`` for a task's head
            (see ``peftjax.core.new_head``; ``peftjax.summary`` lists them).
        adapter: a folder written by ``peftjax.save_adapter`` to load onto
            the model (``peftjax.load_adapter``); parameters it fills are not
            reported as newly initialised.
        output_loading_info: also return a ``LoadReport``.

    Returns:
        The model in eval mode (dropout off, as transformers returns it); call
        ``model.train()`` before fine-tuning. With ``output_loading_info``,
        ``(model, report)``.

    Raises:
        CheckpointNotFoundError: no folder, no ``config.json`` or no weights.
        ModelLoadError: unsupported ``model_type``, ``.bin``-only checkpoint,
            a shape mismatch, or a truncated/corrupt safetensors file.
    """
    folder = resolve_checkpoint(path, revision, presets=PRESETS)
    hf_config = read_config(folder)
    model_type = hf_config.get("model_type")
    try:
        fam = registry.family(model_type)
    except UnsupportedModelError as error:
        raise UnsupportedModelError(f"{str(folder / CONFIG_NAME)!r}: {error}") from None
    try:
        config = fam.config_class.from_hf_dict(hf_config)
        overrides = dict(config_overrides or {})
        if num_labels is not None and num_labels != config.num_labels:
            overrides.setdefault("num_labels", num_labels)
            overrides.setdefault("label_names", ())
        config = dataclasses.replace(config, **overrides)
    except (TypeError, ValueError) as error:
        raise ModelLoadError(f"{str(folder / CONFIG_NAME)!r}: {error}") from error
    chosen_task = registry.resolve_task(
        model_type, task, architectures=hf_config.get("architectures"), num_labels=num_labels
    )
    model_cls = registry.model_class(model_type, chosen_task)
    files = _weight_files(folder, hf_config)

    base_key = seed if isinstance(seed, jax.Array) else jax.random.key(seed)

    def build() -> nnx.Module:
        return model_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(base_key))

    abstract = nnx.eval_shape(build)
    graphdef, abstract_state = nnx.split(abstract)
    names, _ = checkpoint_names(abstract)
    flat_abstract = list(nnx.to_flat_state(abstract_state))
    abstract_leaves = dict(flat_abstract)
    prefix = config.base_model_prefix

    # Index the checkpoint by canonical key; check shapes before reading data.
    by_canonical: dict[str, str] = {}
    for key in files:
        by_canonical.setdefault(_canonical(key, prefix), key)
    handles = {file: _open(file) for file in sorted(set(files.values()))}
    plan: dict[tuple, tuple[str, str]] = {}
    missing, mismatched, used = [], [], set()
    new_paths: dict[str, tuple] = {}  # checkpoint key -> path of each leaf initialised here
    for leaf_path, (hf_key, layout) in names.items():
        ckpt_key = by_canonical.get(_canonical(hf_key, prefix))
        if ckpt_key is None:
            missing.append(hf_key)
            new_paths[hf_key] = leaf_path
            continue
        used.add(ckpt_key)
        torch_shape = handles[files[ckpt_key]].shape(ckpt_key)
        expected = tuple(abstract_leaves[leaf_path].shape)
        if model_shape(torch_shape, layout) != expected:
            torch_expected = to_torch_shape(expected, layout)
            mismatched.append((ckpt_key, torch_shape, torch_expected))
            new_paths[ckpt_key] = leaf_path
            continue
        plan[leaf_path] = (ckpt_key, layout)

    if mismatched and not ignore_mismatched_sizes:
        lines = "; ".join(
            f"{key}: checkpoint {ckpt} vs model {model}" for key, ckpt, model in mismatched
        )
        raise ModelLoadError(
            f"Shape mismatch loading {str(folder)!r} into {model_cls.__name__}: {lines}. "
            "Check that config.json matches the weights; for a head with a different "
            "number of labels pass ignore_mismatched_sizes=True to re-initialise it."
        )
    tied = getattr(config, "tie_word_embeddings", False)
    unexpected = sorted(
        key
        for key in files
        if key not in used
        and not _IGNORED_KEYS.search(key)
        and not (tied and _canonical(key, prefix) == "lm_head.weight")
    )
    reinitialised = [key for key, _, _ in mismatched]
    if strict and (missing or unexpected):
        raise ModelLoadError(
            f"strict loading of {str(folder)!r} into {model_cls.__name__} failed: "
            f"missing [{_summarise(missing)}], unexpected [{_summarise(unexpected)}]."
        )

    # Parameters the checkpoint lacks (a new head) are initialised by the
    # real constructor under jit, where XLA prunes everything not returned;
    # dropout RNG streams are seeded directly, which needs no trace at all.
    fresh_paths = [
        p for p, v in flat_abstract
        if p not in plan and not isinstance(v, (nnx.RngKey, nnx.RngCount))
    ]

    @jax.jit
    def initialise_fresh() -> list[jax.Array]:
        fresh_state = dict(nnx.to_flat_state(nnx.state(build())))
        return [fresh_state[p].get_value() for p in fresh_paths]

    fresh = dict(zip(fresh_paths, initialise_fresh())) if fresh_paths else {}
    leaves = []
    for index, (leaf_path, variable) in enumerate(flat_abstract):
        if leaf_path in plan:
            ckpt_key, layout = plan[leaf_path]
            array = to_model_layout(handles[files[ckpt_key]].tensor(ckpt_key), layout)
            value = jnp.asarray(contiguous(array), dtype=variable.dtype)
        elif isinstance(variable, nnx.RngKey):
            value = jnp.broadcast_to(jax.random.fold_in(base_key, index), variable.shape)
        elif isinstance(variable, nnx.RngCount):
            value = jnp.zeros(variable.shape, variable.dtype)
        else:
            value = fresh[leaf_path]
        leaves.append((leaf_path, variable.replace(value)))

    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    model.eval()
    dotted_new = {key: ".".join(map(str, path)) for key, path in new_paths.items()}
    params = [dotted_new[key] for key, path in new_paths.items() if isinstance(abstract_leaves[path], nnx.Param)]
    mark_new_head(model, params, trains=not freeze_new_head)
    filled = set()
    if adapter is not None:
        from peftjax.core.adapter_io import fill_adapter

        filled = fill_adapter(model, adapter)
    unfilled = [key for key in [*missing, *reinitialised] if dotted_new[key] not in filled]
    if unfilled:
        logger.warning(
            "Some weights of %s were not initialised from the checkpoint at %s and are newly "
            "initialised: [%s]. %s",
            model_cls.__name__,
            folder,
            _summarise(unfilled),
            "They stay frozen (freeze_new_head=True): train them with also_train, or load them with adapter=."
            if freeze_new_head else
            "They train along with the PEFT methods you apply (freeze_new_head=True keeps them frozen).",
        )
    if unexpected:
        logger.warning(
            "Some weights of the checkpoint at %s were not used by %s: [%s]. This is expected "
            "when the checkpoint has a head (or pooler) this model does not.",
            folder,
            model_cls.__name__,
            _summarise(unexpected),
        )
    if not output_loading_info:
        return model
    report = LoadReport(
        checkpoint=str(folder),
        loaded_keys=tuple(key for key, _ in plan.values()),
        missing_keys=tuple(missing),
        unexpected_keys=tuple(unexpected),
        mismatched_keys=tuple(mismatched) if ignore_mismatched_sizes else (),
    )
    return model, report


# --------------------------------------------------------------------------
# save_pretrained.
# --------------------------------------------------------------------------


def save_pretrained(model: nnx.Module, path: str | os.PathLike) -> Path:
    """Writes ``config.json`` and ``model.safetensors`` that transformers can load.

    Parameters are written in their stored dtype and torch layout under the
    checkpoint names of ``model``'s architecture. Parameters that belong to
    no transformers module (adapters, insertion points with parameters) are
    not written, with a warning: merge adapters into the base weights first
    if the checkpoint must include them.

    Returns:
        The folder written.
    """
    folder = Path(path).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    names, skipped = checkpoint_names(model)
    if skipped:
        logger.warning(
            "save_pretrained skipped %d parameters that transformers' %s has no place for "
            "(adapters or point parameters; merge them first to keep them): [%s].",
            len(skipped),
            registry.hf_architecture(model),
            _summarise(skipped),
        )
    variables = dict(nnx.to_flat_state(nnx.state(model, CHECKPOINT_VARIABLES)))
    tensors: dict[str, np.ndarray] = {}
    dtypes = set()  # of the parameters: running statistics and counters keep their own
    for leaf_path, (hf_key, layout) in names.items():
        array = np.asarray(jax.device_get(variables[leaf_path].get_value()))
        if isinstance(variables[leaf_path], nnx.Param):
            dtypes.add(array.dtype)
        tensors[hf_key] = contiguous(to_torch_layout(array, layout))
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    hf_config = {"architectures": [registry.hf_architecture(model)], **model.config.to_hf_dict()}
    if len(dtypes) == 1:
        hf_config["dtype"] = str(jnp.dtype(dtypes.pop()))
    (folder / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return folder
