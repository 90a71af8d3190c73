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

from peftjax.models import registry
from peftjax.models.batch_norm import BatchNorm
from peftjax.models.errors import (
    CheckpointNotFoundError,
    ModelLoadError,
    UnsupportedModelError,
)
from peftjax.points import InsertionPoint

logger = logging.getLogger("peftjax.models")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "tf_model.h5")

# Checkpoint entries that are buffers, not parameters: never reported.
_IGNORED_KEYS = re.compile(r"(^|\.)(position_ids|token_type_ids|rotary_emb\.inv_freq)$")
# Pre-2019 BERT checkpoints name LayerNorm parameters gamma/beta.
_LEGACY_LEAVES = {"gamma": "weight", "beta": "bias"}

# Leaf renames and layouts of the layers whose parameters checkpoints hold.
_LAYER_LEAVES: Mapping[type, Mapping[str, tuple[str, str]]] = {
    nnx.Linear: {"kernel": ("weight", "linear"), "bias": ("bias", "same")},
    nnx.Conv: {"kernel": ("weight", "conv"), "bias": ("bias", "same")},
    nnx.Embed: {"embedding": ("weight", "same")},
    nnx.LayerNorm: {"scale": ("weight", "same"), "bias": ("bias", "same")},
    nnx.RMSNorm: {"scale": ("weight", "same")},
    nnx.BatchNorm: {
        "scale": ("weight", "same"),
        "bias": ("bias", "same"),
        "mean": ("running_mean", "same"),
        "var": ("running_var", "same"),
    },
    BatchNorm: {
        "scale": ("weight", "same"),
        "bias": ("bias", "same"),
        "mean": ("running_mean", "same"),
        "var": ("running_var", "same"),
        "num_batches_tracked": ("num_batches_tracked", "count"),
    },
}
# What a checkpoint holds: parameters and batch norms' running statistics.
_CHECKPOINT_VARIABLES = (nnx.Param, nnx.BatchStat)


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
# Layouts.
# --------------------------------------------------------------------------


def to_model_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":  # torch (out, in, kh, kw) -> flax (kh, kw, in, out)
        return array.transpose(2, 3, 1, 0)
    return array


def to_torch_layout(array: np.ndarray, layout: str) -> np.ndarray:
    if layout == "linear":
        return array.T
    if layout == "conv":
        return array.transpose(3, 2, 0, 1)
    if layout == "count":  # torch keeps counters as int64; JAX (without x64) as int32
        return array.astype(np.int64)
    return array


def _contiguous(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy when needed; unlike ``np.ascontiguousarray`` it keeps
    scalars (a batch norm's counter) zero-dimensional."""
    return np.require(array, requirements="C")


def _model_shape(torch_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "linear" and len(torch_shape) == 2:
        return torch_shape[::-1]
    if layout == "conv" and len(torch_shape) == 4:
        out, inp, kh, kw = torch_shape
        return (kh, kw, inp, out)
    return tuple(torch_shape)


def _is_reference_module(module: Any) -> bool:
    """Modules whose parameters belong in a transformers checkpoint.

    Layers listed in ``_LAYER_LEAVES``, layer lists and the reference model
    classes themselves; anything else (insertion points, adapter wrappers)
    holds parameters no transformers model has.
    """
    if isinstance(module, InsertionPoint):
        return False
    if isinstance(module, (nnx.List, *_LAYER_LEAVES)):
        return True
    return type(module).__module__.startswith("peftjax.models.")


def checkpoint_names(model: nnx.Module) -> tuple[dict[tuple, tuple[str, str]], list[str]]:
    """Maps each parameter (and running statistic) path to its checkpoint key and layout.

    Returns ``(names, skipped)``: ``names[path] = (hf_key, layout)`` for every
    parameter and batch-norm statistic of the reference architecture, and the
    dotted paths of those under other modules (adapters, points), which have
    no transformers counterpart.
    """
    modules = dict(nnx.iter_modules(model))
    names: dict[tuple, tuple[str, str]] = {}
    skipped: list[str] = []
    for path, _ in nnx.to_flat_state(nnx.state(model, _CHECKPOINT_VARIABLES)):
        owner_path, leaf = path[:-1], path[-1]
        chain = [modules.get(owner_path[:i]) for i in range(len(owner_path) + 1)]
        if not all(m is not None and _is_reference_module(m) for m in chain):
            skipped.append(".".join(map(str, path)))
            continue
        owner = modules[owner_path]
        hf_leaf, layout = str(leaf), "same"
        # The nearest class in the owner's ancestry: a subclass with leaves of its own
        # (peftjax's BatchNorm) has its entry, one without (lean_backward.LayerNorm) its base's.
        leaves = next((_LAYER_LEAVES[cls] for cls in type(owner).__mro__ if cls in _LAYER_LEAVES), None)
        if leaves is not None:
            hf_leaf, layout = leaves[leaf]
        names[path] = (".".join(map(str, (*owner_path, hf_leaf))), layout)
    return names, skipped


# --------------------------------------------------------------------------
# Finding and opening checkpoints.
# --------------------------------------------------------------------------


def _resolve_folder(path: str | os.PathLike, revision: str | None) -> Path:
    """A local checkpoint folder, fetching a Hub repo id through the HF cache."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    text = str(path)
    if folder.exists() or folder.is_absolute() or text.startswith((".", "~")):
        raise CheckpointNotFoundError(
            f"Checkpoint folder {text!r} does not exist or is not a folder. Pass a folder "
            f"holding {CONFIG_NAME} and *.safetensors (e.g. one written by save_pretrained)."
        )
    try:
        import huggingface_hub

        snapshot = huggingface_hub.snapshot_download(
            repo_id=text,
            revision=revision,
            allow_patterns=[CONFIG_NAME, "*.safetensors", WEIGHTS_INDEX_NAME],
        )
    except Exception as error:  # offline miss, unknown repo, bad repo id, network
        raise CheckpointNotFoundError(
            f"{text!r} is not a local folder and could not be fetched from the Hugging Face "
            f"Hub or its cache ({type(error).__name__}: {error}). Pass a local folder, or run "
            "once with network access (HF_HUB_OFFLINE unset) to fill the cache."
        ) from error
    return Path(snapshot)


def _read_config(folder: Path) -> dict[str, Any]:
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
    folder = _resolve_folder(path, revision)
    hf_config = _read_config(folder)
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
    output_loading_info: bool = False,
) -> nnx.Module | tuple[nnx.Module, LoadReport]:
    """Loads a transformers checkpoint (config.json + safetensors) into a peftjax model.

    Args:
        path: a local checkpoint folder, or a Hub repo id resolved through
            ``huggingface_hub.snapshot_download`` (works offline from the cache).
        task: which head to build ("base", "sequence-classification",
            "token-classification", "causal-lm", "image-classification");
            by default the checkpoint's ``architectures`` decide.
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
    folder = _resolve_folder(path, revision)
    hf_config = _read_config(folder)
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
    for leaf_path, (hf_key, layout) in names.items():
        ckpt_key = by_canonical.get(_canonical(hf_key, prefix))
        if ckpt_key is None:
            missing.append(hf_key)
            continue
        used.add(ckpt_key)
        torch_shape = handles[files[ckpt_key]].shape(ckpt_key)
        expected = tuple(abstract_leaves[leaf_path].shape)
        if _model_shape(torch_shape, layout) != expected:
            torch_expected = to_torch_shape(expected, layout)
            mismatched.append((ckpt_key, torch_shape, torch_expected))
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
            value = jnp.asarray(_contiguous(array), dtype=variable.dtype)
        elif isinstance(variable, nnx.RngKey):
            value = jnp.broadcast_to(jax.random.fold_in(base_key, index), variable.shape)
        elif isinstance(variable, nnx.RngCount):
            value = jnp.zeros(variable.shape, variable.dtype)
        else:
            value = fresh[leaf_path]
        leaves.append((leaf_path, variable.replace(value)))

    model = nnx.merge(graphdef, nnx.from_flat_state(leaves))
    model.eval()

    if missing or reinitialised:
        logger.warning(
            "Some weights of %s were not initialised from the checkpoint at %s and are newly "
            "initialised: [%s]. You should probably train this model on a downstream task.",
            model_cls.__name__,
            folder,
            _summarise([*missing, *reinitialised]),
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


def to_torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "linear" and len(shape) == 2:
        return shape[::-1]
    if layout == "conv" and len(shape) == 4:
        kh, kw, inp, out = shape
        return (out, inp, kh, kw)
    return tuple(shape)


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
    variables = dict(nnx.to_flat_state(nnx.state(model, _CHECKPOINT_VARIABLES)))
    tensors: dict[str, np.ndarray] = {}
    dtypes = set()  # of the parameters: running statistics and counters keep their own
    for leaf_path, (hf_key, layout) in names.items():
        array = np.asarray(jax.device_get(variables[leaf_path].get_value()))
        if isinstance(variables[leaf_path], nnx.Param):
            dtypes.add(array.dtype)
        tensors[hf_key] = _contiguous(to_torch_layout(array, layout))
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})

    hf_config = {"architectures": [registry.hf_architecture(model)], **model.config.to_hf_dict()}
    if len(dtypes) == 1:
        hf_config["dtype"] = str(jnp.dtype(dtypes.pop()))
    (folder / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    return folder
