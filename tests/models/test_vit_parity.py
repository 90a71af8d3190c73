"""ViT: peftjax outputs equal transformers PyTorch outputs on a tiny model."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from peftjax import models

ATOL = 1e-4  # max abs difference to transformers in float32

TINY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    image_size=32,
    patch_size=8,
    num_labels=5,
)


@nnx.jit
def forward(model, pixel_values):
    return model(pixel_values)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, torch.nn.Module]]:
    built = {}
    for name, model_cls in (
        ("classifier", transformers.ViTForImageClassification),
        ("base", transformers.ViTModel),
    ):
        torch.manual_seed(0)
        reference = model_cls(transformers.ViTConfig(**TINY)).eval()
        folder = tmp_path_factory.mktemp(f"vit-{name}")
        reference.save_pretrained(folder)
        built[name] = (str(folder), reference)
    return built


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)


def max_diff(ours, theirs: torch.Tensor) -> float:
    return float(np.abs(np.asarray(ours) - theirs.detach().numpy()).max())


def test_image_classifier_matches_transformers(checkpoints, pixels):
    folder, reference = checkpoints["classifier"]
    model, report = models.from_pretrained(folder, output_loading_info=True)
    assert isinstance(model, models.ViTForImageClassification)
    assert report.missing_keys == () and report.unexpected_keys == ()
    ours = forward(model, jnp.asarray(pixels))
    with torch.no_grad():
        theirs = reference(pixel_values=torch.from_numpy(pixels))
    assert ours.logits.shape == (2, 5)
    assert max_diff(ours.logits, theirs.logits) < ATOL


def test_base_model_matches_transformers(checkpoints, pixels):
    folder, reference = checkpoints["base"]
    model = models.from_pretrained(folder)
    assert isinstance(model, models.ViTModel) and model.get_input_embeddings() is None
    ours = forward(model, jnp.asarray(pixels))
    with torch.no_grad():
        theirs = reference(pixel_values=torch.from_numpy(pixels))
    assert ours.logits is None
    assert max_diff(ours.last_hidden_state, theirs.last_hidden_state) < ATOL
    assert max_diff(ours.pooler_output, theirs.pooler_output) < ATOL


def test_module_paths_are_the_checkpoint_names(checkpoints):
    model = models.from_pretrained(checkpoints["classifier"][0])
    layer = model.vit.encoder.layer[1]
    assert layer.attention.attention.query.kernel.shape == (32, 32)
    assert layer.attention.output.dense.kernel.shape == (32, 32)
    assert layer.intermediate.dense.kernel.shape == (32, 48)
    assert layer.output.dense.kernel.shape == (48, 32)
    assert model.vit.embeddings.cls_token.shape == (1, 1, 32)
    assert model.vit.embeddings.position_embeddings.shape == (1, 17, 32)
    assert model.output_head_names == ("classifier",)


def test_round_trip_through_transformers(checkpoints, pixels, tmp_path):
    model = models.from_pretrained(checkpoints["classifier"][0])
    models.save_pretrained(model, tmp_path)
    reloaded = transformers.ViTForImageClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        theirs = reloaded(pixel_values=torch.from_numpy(pixels))
    assert max_diff(forward(model, jnp.asarray(pixels)).logits, theirs.logits) < ATOL


def test_wrong_image_size_is_a_clear_error(checkpoints):
    model = models.from_pretrained(checkpoints["classifier"][0])
    with pytest.raises(ValueError, match=r"expects \(3, 32, 32\)"):
        model(jnp.zeros((1, 3, 16, 16)))
