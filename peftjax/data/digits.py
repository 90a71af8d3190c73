"""Real images offline: scikit-learn's handwritten digits, and an MNIST-M-style colour domain.

``load_digits`` reads the 1,797 8x8 grey digits that scikit-learn ships inside
its package (the UCI "Optical Recognition of Handwritten Digits" test set;
no download), resizes them to a network's input and returns them channels-last
(``image_task_from_arrays`` and the loaders take that layout).

``colour_blend`` builds the target domain of the textbooks' MNIST -> MNIST-M
setup from the same digits. MNIST-M (Ganin & Lempitsky 2015) takes a random
crop of a colour photograph (BSDS500) per digit and writes
``|crop - digit|`` per channel, so strokes invert the background's colours.
No photographs are available offline, so each crop is replaced by a random
colour patch: a 4x4 grid of uniform RGB colours, upsampled bilinearly (smooth
colour regions with edges between them, as crops of photographs have), plus
pixel noise. The digit is then blended as MNIST-M does. Everything is drawn
from ``numpy.random.default_rng(seed)``, so a seed names one fixed domain.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from peftjax.data.errors import DataError

DIGITS_SIZE = 8  # scikit-learn's digits are 8x8
_DIGITS_MAX = 16.0  # their pixels are counts 0..16
_PATCH_GRID = 4  # colour cells per side of a random patch before upsampling
_PATCH_NOISE = 0.05  # std of the per-pixel noise on a patch, in [0, 1] units


def _resize(images_nhw: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of float images in [0, 1] to ``size`` square (Pillow, per image)."""
    from PIL import Image  # lazy, as in peftjax.data.images

    if size == images_nhw.shape[1]:
        return images_nhw.astype(np.float32)
    resized = [
        np.asarray(Image.fromarray(image.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR))
        for image in images_nhw
    ]
    return np.clip(np.stack(resized), 0.0, 1.0).astype(np.float32)


def load_digits(
    *, image_size: int = DIGITS_SIZE, classes: Sequence[int] | None = None, channels: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """``(images [N, image_size, image_size, channels], labels [N])`` of scikit-learn's digits.

    Pixels are in [0, 1] (scikit-learn's 0..16 counts divided by 16), grey
    repeated over ``channels``. ``classes`` keeps those digits only, relabelled
    0.. in the order given (``classes=(5, 6, 7, 8, 9)`` makes 5 label 0), so a
    transfer task gets a head of its own size. Images stay in scikit-learn's order.
    """
    try:
        from sklearn import datasets  # lazy: a dev dependency, only these images need it
    except ImportError:
        raise DataError("the digits images come with scikit-learn: pip install scikit-learn "
                        "(it is in peftjax's dev extra)") from None
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 (grey) or 3 (grey as RGB), got {channels!r}")
    bunch = datasets.load_digits()
    images, labels = bunch.images / _DIGITS_MAX, bunch.target
    if classes is not None:
        classes = [int(c) for c in classes]
        unknown = sorted(set(classes) - set(range(10)))
        if unknown or len(set(classes)) != len(classes) or not classes:
            raise DataError(f"classes must be distinct digits 0-9, got {classes}")
        keep = np.isin(labels, classes)
        images, labels = images[keep], np.array([classes.index(label) for label in labels[keep]])
    pixels = _resize(images, image_size)[..., None]
    return np.repeat(pixels, channels, axis=-1), labels.astype(np.int32)


def colour_blend(images_nhwc: np.ndarray, *, seed: int) -> np.ndarray:
    """MNIST-M-style images: ``|patch - digit|`` per channel on a random colour patch per image.

    ``images_nhwc`` are digits in [0, 1] (grey: one channel, or three equal
    ones); the result is RGB in [0, 1], same height and width. See the module
    docstring for how a patch is drawn; ``seed`` fixes every patch.
    """
    images = np.asarray(images_nhwc, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"colour_blend takes grey digits [N, H, W, 1 or 3], got shape {images.shape}")
    if images.size and (images.min() < 0 or images.max() > 1):
        raise DataError("colour_blend takes pixels in [0, 1]; pass load_digits' images before normalising them")
    count, height, width = images.shape[:3]
    rng = np.random.default_rng(seed)
    cells = rng.uniform(0.0, 1.0, size=(count, _PATCH_GRID, _PATCH_GRID, 3)).astype(np.float32)
    patches = np.stack([_upsample(cell, height, width) for cell in cells])
    patches = np.clip(patches + rng.normal(0.0, _PATCH_NOISE, size=patches.shape), 0.0, 1.0)
    return np.abs(patches - images[..., :1]).astype(np.float32)


def _upsample(cells_hwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a small colour grid, one channel at a time (Pillow)."""
    from PIL import Image

    channels = [
        np.asarray(Image.fromarray(np.ascontiguousarray(cells_hwc[..., c])).resize((width, height), Image.Resampling.BILINEAR))
        for c in range(cells_hwc.shape[-1])
    ]
    return np.stack(channels, axis=-1)
