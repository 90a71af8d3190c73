"""Parity with HF PEFT on a tiny torch model: IA3 (output and feed-forward
scaling, and which modules may be feed-forward), DoRA (magnitude init and
forward), VeRA (given the same random matrices). Weights go torch -> JAX, so
both compute from identical values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import peftjax

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

D_IN, D_HIDDEN, D_OUT = 6, 5, 4


class TorchToy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.key = torch.nn.Linear(D_IN, D_HIDDEN)
        self.down = torch.nn.Linear(D_HIDDEN, D_OUT)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.key(x)))


class JaxToy(nnx.Module):
    def __init__(self, source: TorchToy):
        rngs = nnx.Rngs(0)
        self.key = nnx.Linear(D_IN, D_HIDDEN, rngs=rngs)
        self.down = nnx.Linear(D_HIDDEN, D_OUT, rngs=rngs)
        for name in ("key", "down"):
            theirs = getattr(source, name)
            getattr(self, name).kernel[...] = jnp.asarray(theirs.weight.detach().numpy().T)
            getattr(self, name).bias[...] = jnp.asarray(theirs.bias.detach().numpy())

    def __call__(self, x):
        return self.down(jax.nn.gelu(self.key(x), approximate=False))


def numpy(tensor) -> np.ndarray:
    return tensor.detach().numpy()


def randomise(tensor, seed, low=0.5, high=1.5):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator))


def compare(theirs, ours):
    x = np.random.default_rng(0).standard_normal((3, D_IN)).astype(np.float32)
    theirs.eval()
    with torch.no_grad():
        expected = theirs(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(ours(jnp.asarray(x)), expected, atol=1e-5)


def test_ia3_matches_peft():
    theirs = peft.get_peft_model(
        TorchToy(), peft.IA3Config(target_modules=["key", "down"], feedforward_modules=["down"])
    )
    ours = JaxToy(theirs.base_model.model)
    peftjax.apply(ours, peftjax.IA3Config(targets=["key", "down"], feedforward=["down"]))
    for i, name in enumerate(("key", "down")):
        vector = getattr(theirs.base_model.model, name).ia3_l["default"]
        randomise(vector, seed=i)
        getattr(ours, name).ia3_l[...] = jnp.asarray(numpy(vector).ravel())
    compare(theirs, ours)


def test_dora_matches_peft():
    theirs = peft.get_peft_model(
        TorchToy(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["key", "down"], use_dora=True)
    )
    ours = JaxToy(theirs.base_model.model)
    peftjax.apply(ours, peftjax.DoraConfig(rank=2, alpha=4, targets=["key", "down"]))
    for i, name in enumerate(("key", "down")):
        layer, mine = getattr(theirs.base_model.model, name), getattr(ours, name)
        magnitude = layer.lora_magnitude_vector["default"].weight
        np.testing.assert_allclose(mine.magnitude[...], numpy(magnitude), rtol=1e-6)  # both ||W||_c at init
        randomise(layer.lora_B["default"].weight, seed=i, low=-0.5, high=0.5)
        randomise(magnitude, seed=10 + i)
        mine.lora_a[...] = jnp.asarray(numpy(layer.lora_A["default"].weight).T)
        mine.lora_b[...] = jnp.asarray(numpy(layer.lora_B["default"].weight).T)
        mine.magnitude[...] = jnp.asarray(numpy(magnitude))
    compare(theirs, ours)


def test_vera_matches_peft_given_the_same_random_matrices():
    theirs = peft.get_peft_model(TorchToy(), peft.VeraConfig(r=3, target_modules=["key", "down"]))
    ours = JaxToy(theirs.base_model.model)
    peftjax.apply(ours, peftjax.VeraConfig(rank=3, targets=["key", "down"]))
    for i, name in enumerate(("key", "down")):
        layer, mine = getattr(theirs.base_model.model, name), getattr(ours, name)
        np.testing.assert_array_equal(numpy(layer.vera_lambda_b["default"]), np.zeros(mine.scale_b.shape))
        np.testing.assert_allclose(numpy(layer.vera_lambda_d["default"]), mine.scale_d[...])
        randomise(layer.vera_lambda_b["default"], seed=i, low=-1, high=1)
        randomise(layer.vera_lambda_d["default"], seed=10 + i, low=-1, high=1)
        # One A and one B, sized to the largest layer and shared: the same shapes as HF's, transposed.
        mine.projection_a[...] = jnp.asarray(numpy(layer.vera_A["default"]).T)
        mine.projection_b[...] = jnp.asarray(numpy(layer.vera_B["default"]).T)
        mine.scale_b[...] = jnp.asarray(numpy(layer.vera_lambda_b["default"]))
        mine.scale_d[...] = jnp.asarray(numpy(layer.vera_lambda_d["default"]))
    compare(theirs, ours)


def test_feedforward_modules_must_be_targets_in_both():
    """IA3Config's rule, as HF PEFT's IA3Config enforces it."""
    with pytest.raises(ValueError, match="feedforward_modules.*subset of `target_modules`"):
        peft.IA3Config(target_modules=["key"], feedforward_modules=["down"])
    with pytest.raises(peftjax.PeftError, match=r"feedforward.*must be among targets; \['down'\] are not"):
        peftjax.IA3Config(targets=["key"], feedforward=["down"])
