"""scikit-learn's digits as network inputs, and the MNIST-M-style colour domain."""

import numpy as np
import pytest
from sklearn import datasets

from peftjax.data import DataError
from peftjax.data.digits import colour_blend, load_digits


@pytest.fixture(scope="module")
def reference():
    bunch = datasets.load_digits()
    return bunch.images / 16.0, bunch.target


def test_native_size_is_scikit_learns_pixels_over_channels(reference):
    images, labels = load_digits(channels=3)
    assert images.shape == (1797, 8, 8, 3) and images.dtype == np.float32
    np.testing.assert_array_equal(labels, reference[1])
    for channel in range(3):
        np.testing.assert_allclose(images[..., channel], reference[0], atol=1e-7)


def test_classes_are_kept_and_relabelled_in_the_order_given(reference):
    images, labels = load_digits(classes=(7, 5), channels=1)
    kept = np.isin(reference[1], (7, 5))
    assert images.shape == (kept.sum(), 8, 8, 1)
    np.testing.assert_array_equal(labels, np.where(reference[1][kept] == 7, 0, 1))
    np.testing.assert_allclose(images[..., 0], reference[0][kept], atol=1e-7)


def test_resizing_keeps_range_and_layout(reference):
    images, _ = load_digits(image_size=32, classes=(0,))
    assert images.shape[1:] == (32, 32, 3) and images.min() >= 0 and images.max() <= 1
    # Bilinear upsampling by 4: each output pixel lies between the input pixels around it.
    first = reference[0][reference[1] == 0][0]
    assert np.abs(images[0, 1::4, 1::4, 0] - first).max() < 0.35
    assert abs(images[0, ..., 0].mean() - first.mean()) < 0.05


def test_colour_blend_is_mnist_m_absolute_difference_and_seeded():
    shape = (3, 16, 16, 1)
    patches = colour_blend(np.zeros(shape, np.float32), seed=4)  # |patch - 0| is the patch itself
    np.testing.assert_allclose(colour_blend(np.ones(shape, np.float32), seed=4), 1 - patches, atol=1e-6)
    half = colour_blend(np.full(shape, 0.5, np.float32), seed=4)
    np.testing.assert_allclose(half, np.abs(patches - 0.5), atol=1e-6)
    assert patches.shape == (3, 16, 16, 3) and patches.min() >= 0 and patches.max() <= 1
    # Colour: channels differ, images differ, and the seed decides.
    assert np.abs(patches[..., 0] - patches[..., 1]).mean() > 0.1
    assert np.abs(patches[0] - patches[1]).mean() > 0.1
    assert np.abs(colour_blend(np.zeros(shape, np.float32), seed=5) - patches).mean() > 0.1


def test_bad_input_is_a_clear_error():
    with pytest.raises(DataError, match="distinct digits 0-9"):
        load_digits(classes=(3, 10))
    with pytest.raises(DataError, match="channels must be 1"):
        load_digits(channels=2)
    with pytest.raises(DataError, match=r"pixels in \[0, 1\]"):
        colour_blend(np.full((1, 4, 4, 1), 16.0), seed=0)
    with pytest.raises(DataError, match=r"\[N, H, W, 1 or 3\]"):
        colour_blend(np.zeros((4, 4)), seed=0)
