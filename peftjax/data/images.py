"""Image classification data: class folders of image files, or arrays."""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from peftjax.config import DataConfig
from peftjax.data.errors import DataError
from peftjax.data.examples import ImageExamples, TaskData
from peftjax.data.shared import missing_file_error
from peftjax.data.sources import SPLITS, local_split_path, select_rows, source_kind

# What ``load_data`` uses when data.image_size is null and no runner filled in the model's.
FALLBACK_IMAGE_SIZE = 224
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def load_image_folder(
    folder: str | os.PathLike[str],
    *,
    image_size: int,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    class_names: Sequence[str] | None = None,
) -> tuple[ImageExamples, tuple[str, ...]]:
    """Images from ``folder/<class>/<image>``, resized to ``image_size`` square, RGB.

    Pixels are scaled to [0, 1], then normalised as ``(x - mean) / std`` per
    channel (ViT checkpoints expect 0.5/0.5). Classes are the subfolder names in
    sorted order, or ``class_names`` (pass the training split's names for the
    evaluation split so class ids agree).
    """
    from PIL import Image  # lazy: only image tasks need it

    root = pathlib.Path(folder)
    if not root.is_dir():
        raise missing_file_error(root, "image folder")
    present = sorted((child.name for child in root.iterdir() if child.is_dir()), key=_natural_key)
    if not present:
        raise DataError(f"{root} has no class subfolders; expected {root}/<class name>/<image files>")
    names = tuple(class_names) if class_names is not None else tuple(present)
    unknown = sorted(set(present) - set(names))
    if unknown:
        raise DataError(f"{root} has class folders {unknown} that the training split lacks; classes: {list(names)}")
    mean_array = np.asarray(mean, np.float32)
    std_array = np.asarray(std, np.float32)
    if mean_array.shape not in ((1,), (3,)) or std_array.shape != mean_array.shape:
        raise DataError(f"image mean/std need 1 or 3 values each, got {list(mean)} and {list(std)}")
    images, labels = [], []
    for label, name in enumerate(names):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.iterdir(), key=lambda p: _natural_key(p.name)):
            if path.suffix.lower() not in _IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(path) as image:
                    resized = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
            except OSError as error:
                raise DataError(f"could not read image {path}: {error}") from None
            images.append(np.asarray(resized, np.float32) / 255.0)
            labels.append(label)
    if not images:
        raise DataError(f"{root} has no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in its class folders")
    pixels = (np.stack(images) - mean_array) / std_array
    return ImageExamples(images=pixels.astype(np.float32), labels=np.asarray(labels, np.int32)), names


def load_image_task(config: DataConfig) -> TaskData:
    kind, _ = source_kind(config.source)
    if kind != "local":
        raise DataError(
            f"image_classification reads a local folder (data.source), not {config.source!r}; "
            "for arrays use image_task_from_arrays"
        )
    splits: dict[str, ImageExamples] = {}
    class_names: tuple[str, ...] | None = None
    limits = {"train": config.max_train_rows, "eval": config.max_eval_rows, "test": config.max_test_rows}
    for split in SPLITS:
        path = local_split_path(config, split)
        if path is None:
            continue
        examples, names = load_image_folder(
            path, image_size=config.image_size or FALLBACK_IMAGE_SIZE, mean=config.image_mean or (0.5, 0.5, 0.5),
            std=config.image_std or (0.5, 0.5, 0.5), class_names=class_names,
        )
        class_names = class_names or names
        rows = select_rows(len(examples), limits[split], config.row_selection, config.row_seed)
        if rows is not None:
            examples = ImageExamples(images=examples.images[rows], labels=examples.labels[rows])
        splits[split] = examples
    return TaskData(
        task="image_classification",
        splits=splits,
        num_labels=len(class_names or ()),
        label_names=class_names,
        config=config,
    )


def image_task_from_arrays(
    train: tuple[np.ndarray, np.ndarray],
    eval: tuple[np.ndarray, np.ndarray] | None = None,  # noqa: A002 - the split's name
    test: tuple[np.ndarray, np.ndarray] | None = None,
    *,
    num_labels: int | None = None,
) -> TaskData:
    """An image classification task from ``(images [N, H, W, C], labels [N])`` pairs."""
    splits = {
        name: ImageExamples.from_arrays(*arrays)
        for name, arrays in (("train", train), ("eval", eval), ("test", test))
        if arrays is not None
    }
    shapes = {examples.images.shape[1:] for examples in splits.values()}
    if len(shapes) > 1:
        raise DataError(f"every split needs the same image shape, got {sorted(shapes)}")
    largest = max(int(examples.labels.max()) for examples in splits.values())
    if num_labels is not None and largest >= num_labels:
        raise DataError(f"label {largest} does not fit num_labels={num_labels}")
    return TaskData(task="image_classification", splits=splits, num_labels=num_labels or largest + 1)
