"""LoRA on ``nnx.Embed`` and ``nnx.Conv`` against HF PEFT's Embedding and Conv2d LoRA layers.

A torch toy with an embedding, a strided 3x3 convolution and a 1x1 one gets
HF PEFT LoRA with random factors; the JAX twin gets the same base weights and
factors (through the HF PEFT tensor mapping the adapter files use). Forward
outputs, the factors' gradients and the merged kernels must agree, and
initialisation must follow HF PEFT's (embedding: A = 0, B standard normal;
convolution: A Kaiming-uniform on the window's fan-in, B = 0). fp32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peftjax

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

ATOL = 1e-5
VOCAB, FEATURES, CHANNELS = 20, 6, 3


class TorchToy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(VOCAB, FEATURES)
        self.conv = torch.nn.Conv2d(CHANNELS, 5, kernel_size=3, stride=2, padding=1)
        self.pointwise = torch.nn.Conv2d(5, 4, kernel_size=1)

    def forward(self, ids, image_bchw):
        return self.embed(ids), self.pointwise(self.conv(image_bchw)).permute(0, 2, 3, 1)


class JaxToy(nnx.Module):
    def __init__(self, source: TorchToy):
        rngs = nnx.Rngs(0)
        self.embed = nnx.Embed(VOCAB, FEATURES, rngs=rngs)
        self.conv = nnx.Conv(CHANNELS, 5, kernel_size=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), rngs=rngs)
        self.pointwise = nnx.Conv(5, 4, kernel_size=(1, 1), rngs=rngs)
        self.embed.embedding[...] = jnp.asarray(source.embed.weight.detach().numpy())
        for name in ("conv", "pointwise"):
            theirs, ours = getattr(source, name), getattr(self, name)
            ours.kernel[...] = jnp.asarray(theirs.weight.detach().numpy().transpose(2, 3, 1, 0))
            ours.bias[...] = jnp.asarray(theirs.bias.detach().numpy())

    def __call__(self, ids, image_bhwc):
        return self.embed(ids), self.pointwise(self.conv(image_bhwc))


def inputs():
    rng = np.random.default_rng(0)
    return rng.integers(0, VOCAB, size=(2, 5)), rng.standard_normal((2, CHANNELS, 9, 9)).astype(np.float32)


def run_theirs(model, ids, image):
    return model(torch.from_numpy(ids), torch.from_numpy(image))


def run_ours(model, ids, image):
    return model(jnp.asarray(ids), jnp.asarray(image.transpose(0, 2, 3, 1)))


@pytest.fixture(scope="module")
def pair():
    """HF PEFT's LoRA toy with random factors, and ours with the same weights."""
    theirs = peft.get_peft_model(
        TorchToy(), peft.LoraConfig(r=3, lora_alpha=6, use_rslora=True, target_modules=["embed", "conv", "pointwise"])
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in theirs.named_parameters():
            if "lora_" in name:
                tensor.copy_(0.5 * torch.randn(tensor.shape, generator=generator))
    ours = JaxToy(theirs.base_model.model)
    peftjax.apply(ours, peftjax.LoraConfig(rank=3, alpha=6, rslora=True, targets=["embed", "conv", "pointwise"]))
    state = {k.replace("base_model.model.", "").replace(".default", ""): v.detach().numpy()
             for k, v in theirs.named_parameters() if "lora_" in k}
    for path, wrapper in peftjax.iter_wrappers(ours):
        for name, tensor in wrapper.hf_tensors().items():
            variable = getattr(wrapper, tensor.attribute)
            variable[...] = jnp.asarray(tensor.from_torch(state[f"{path}.{name}"], ours=variable.shape))
    return theirs, ours


def test_forward_matches_hf_peft(pair):
    theirs, ours = pair
    ids, image = inputs()
    with torch.no_grad():
        expected = run_theirs(theirs, ids, image)
    for mine, reference in zip(run_ours(ours, ids, image), expected):
        np.testing.assert_allclose(mine, reference.numpy(), atol=ATOL)


def test_factor_gradients_match_hf_peft(pair):
    theirs, ours = pair
    ids, image = inputs()
    weights = [np.random.default_rng(i).standard_normal(o.shape).astype(np.float32) for i, o in
               enumerate(run_ours(ours, ids, image))]
    theirs.zero_grad()
    loss = sum((out * torch.from_numpy(w)).sum() for out, w in zip(run_theirs(theirs, ids, image), weights))
    loss.backward()
    grads = nnx.grad(lambda m: sum(jnp.sum(o * w) for o, w in zip(run_ours(m, ids, image), weights)),
                     argnums=nnx.DiffState(0, peftjax.AdapterParam))(ours)
    named = {k.replace("base_model.model.", "").replace(".default", ""): p.grad.numpy()
             for k, p in theirs.named_parameters() if "lora_" in k}
    for path, wrapper in peftjax.iter_wrappers(ours):
        for name, tensor in wrapper.hf_tensors().items():
            mine = np.asarray(_at(grads, path)[tensor.attribute][...])
            np.testing.assert_allclose(tensor.to_torch(mine), named[f"{path}.{name}"], atol=1e-4, rtol=1e-5)


def _at(state, path):
    for key in path.split("."):
        state = state[key]
    return state


def test_merge_matches_hf_peft_and_unmerge_restores(pair):
    theirs, ours = pair
    ids, image = inputs()
    before = [np.asarray(o) for o in run_ours(ours, ids, image)]
    base = {name: np.asarray(getattr(ours, name).base_layer.kernel[...]) for name in ("conv", "pointwise")}
    peftjax.merge(ours)
    try:
        merged = peft.get_peft_model(TorchToy(), theirs.peft_config["default"])
        merged.load_state_dict(theirs.state_dict())
        merged = merged.merge_and_unload()
        table = merged.embed.weight.detach().numpy()
        np.testing.assert_allclose(ours.embed.base_layer.embedding[...], table, atol=ATOL)
        for name in ("conv", "pointwise"):
            reference = getattr(merged, name).weight.detach().numpy().transpose(2, 3, 1, 0)
            np.testing.assert_allclose(getattr(ours, name).base_layer.kernel[...], reference, atol=ATOL)
        for mine, expected in zip(run_ours(ours, ids, image), before):
            np.testing.assert_allclose(mine, expected, atol=ATOL, rtol=1e-5)  # outputs reach 40: fp32 rounding
    finally:
        peftjax.unmerge(ours)
    for name, kernel in base.items():
        np.testing.assert_allclose(getattr(ours, name).base_layer.kernel[...], kernel, atol=1e-6)


def test_initialisation_follows_hf_peft():
    model = JaxToy(TorchToy())
    embed_rank = 64
    peftjax.apply(model, peftjax.LoraConfig(rank=embed_rank, targets=["embed"]))
    peftjax.apply(model, peftjax.LoraConfig(rank=16, targets=["conv"]), adapter_name="conv")
    embed, conv = model.embed, model.conv
    assert not np.any(np.asarray(embed.lora_a[...])) and not np.any(np.asarray(conv.lora_b[...]))
    b = np.asarray(embed.lora_b[...])  # standard normal, (rank, features) = 384 draws
    assert abs(b.mean()) < 0.2 and abs(b.std() - 1) < 0.15
    bound = 1 / np.sqrt(CHANNELS * 3 * 3)  # kaiming_uniform(a=sqrt(5)) on a Conv2d(in, r, 3x3), as HF PEFT's A
    a = np.abs(np.asarray(conv.lora_a[...]))
    assert a.max() <= bound and a.max() > 0.9 * bound
    theirs = peft.get_peft_model(TorchToy(), peft.LoraConfig(r=16, target_modules=["conv"]))
    assert np.abs(theirs.base_model.model.conv.lora_A["default"].weight.detach().numpy()).max() <= bound
    assert model.embed.attend(jnp.ones((1, FEATURES))).shape == (1, VOCAB)  # a tied head reads the base table


def test_unsupported_convolutions_are_refused():
    model = nnx.Sequential(nnx.Conv(2, 2, kernel_size=(3, 3), kernel_dilation=2, rngs=nnx.Rngs(0)))
    with pytest.raises(peftjax.PeftError, match=r"plain convolutions only .*Exclude it from targets"):
        peftjax.apply(model, peftjax.LoraConfig(targets=["layers.0"]))
    with pytest.raises(peftjax.PeftError, match=r"DoraConfig wraps only those"):
        peftjax.apply(nnx.Sequential(nnx.Embed(4, 2, rngs=nnx.Rngs(0))), peftjax.DoraConfig(targets=["layers.0"]))
