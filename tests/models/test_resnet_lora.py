"""LoRA on every convolution of a ResNet against HF PEFT on transformers' ResNet.

HF PEFT wraps every ``convolution`` of a tiny transformers ResNet (the 7x7
stride-2 stem, 1x1 and strided 3x3 bottleneck convolutions, strided 1x1
shortcuts) with random factors and saves the adapter; peftjax loads that
adapter file into its own ResNet built from the same checkpoint. In eval mode
(batch norms on their running statistics, which are perturbed away from the
identity) the logits, the factors' gradients and the merged kernels must
agree, merged must equal unmerged, and unmerging restores the base. fp32.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peftjax
from peftjax import models

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import tiny_checkpoints  # noqa: E402  (tests/models helper, see its docstring)

ATOL = 1e-4
TARGETS = r".*\.convolution"
TORCH_CONV = (2, 3, 1, 0)  # torch (out, in, kh, kw) -> nnx (kh, kw, in, out)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """HF PEFT's LoRA ResNet with random factors, and ours loaded from its adapter file."""
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        layer_type="bottleneck", embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3,
        downsample_in_bottleneck=True,
    )  # fmt: skip
    reference = transformers.ResNetForImageClassification(config)
    tiny_checkpoints.perturb_batch_norms(reference, 0)
    checkpoint = tmp_path_factory.mktemp("resnet")
    reference.save_pretrained(checkpoint)
    theirs = peft.get_peft_model(reference, peft.LoraConfig(r=2, lora_alpha=6, target_modules=TARGETS)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in theirs.named_parameters():
            if "lora_" in name:
                tensor.copy_(0.3 * torch.randn(tensor.shape, generator=generator))
    adapter = tmp_path_factory.mktemp("adapter")
    theirs.save_pretrained(adapter)
    ours = peftjax.load_adapter(models.from_pretrained(checkpoint), adapter)
    ours.eval()
    return theirs, ours


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)


@nnx.jit
def forward(model, pixel_values):
    return model(pixel_values).logits


def conv_wrappers(model):
    return {path: wrapper for path, wrapper in peftjax.iter_wrappers(model)}


def test_every_convolution_is_adapted(pair):
    theirs, ours = pair
    wrapped = conv_wrappers(ours)
    their_convs = {name.removeprefix("base_model.model.") for name, module in theirs.named_modules()
                   if isinstance(module, peft.tuners.lora.Conv2d)}
    assert set(wrapped) == their_convs and len(wrapped) == 9  # the stem, then 3 + a shortcut per stage
    assert {type(w.base_layer) for w in wrapped.values()} == {nnx.Conv}


def test_logits_and_factor_gradients_match_hf_peft(pair, pixels):
    theirs, ours = pair
    weights = np.random.default_rng(1).normal(size=(2, 3)).astype(np.float32)
    theirs.zero_grad()
    their_logits = theirs(pixel_values=torch.from_numpy(pixels)).logits
    (their_logits * torch.from_numpy(weights)).sum().backward()

    @nnx.jit
    def logits_and_grads(model, pixel_values):
        def loss(model):
            logits = model(pixel_values).logits
            return jnp.sum(logits * weights), logits

        return nnx.value_and_grad(loss, has_aux=True, argnums=nnx.DiffState(0, peftjax.AdapterParam))(model)

    (_, logits), grads = logits_and_grads(ours, jnp.asarray(pixels))
    np.testing.assert_allclose(logits, their_logits.detach().numpy(), atol=ATOL)
    their_grads = {name.removeprefix("base_model.model.").replace(".default", ""): p.grad.numpy()
                   for name, p in theirs.named_parameters() if "lora_" in name}
    compared = 0
    for path, wrapper in conv_wrappers(ours).items():
        state = grads
        for key in path.split("."):
            state = state[int(key) if key.isdigit() else key]
        for name, tensor in wrapper.hf_tensors().items():
            mine = tensor.to_torch(np.asarray(state[tensor.attribute][...]))
            np.testing.assert_allclose(mine, their_grads[f"{path}.{name}"], atol=ATOL, rtol=1e-4)
            compared += 1
    assert compared == len(their_grads) == 18


def test_merge_matches_hf_peft_and_unmerge_restores(pair, pixels):
    theirs, ours = pair
    before = np.asarray(forward(ours, jnp.asarray(pixels)))
    base = {path: np.asarray(w.base_layer.kernel[...]) for path, w in conv_wrappers(ours).items()}
    merged_reference = peft.get_peft_model(
        transformers.ResNetForImageClassification(theirs.base_model.model.config), theirs.peft_config["default"]
    )
    merged_reference.load_state_dict(theirs.state_dict())
    merged_reference = merged_reference.merge_and_unload()
    their_kernels = dict(merged_reference.named_parameters())
    peftjax.merge(ours)
    try:
        for path, wrapper in conv_wrappers(ours).items():
            expected = their_kernels[f"{path}.weight"].detach().numpy().transpose(TORCH_CONV)
            np.testing.assert_allclose(wrapper.base_layer.kernel[...], expected, atol=1e-5)
            assert np.abs(np.asarray(wrapper.base_layer.kernel[...]) - base[path]).max() > 1e-2  # the update is real
        np.testing.assert_allclose(forward(ours, jnp.asarray(pixels)), before, atol=ATOL, rtol=1e-5)
    finally:
        peftjax.unmerge(ours)
    for path, wrapper in conv_wrappers(ours).items():
        np.testing.assert_allclose(wrapper.base_layer.kernel[...], base[path], atol=1e-6)
    np.testing.assert_allclose(forward(ours, jnp.asarray(pixels)), before, atol=1e-5)
