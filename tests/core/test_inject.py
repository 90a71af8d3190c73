"""The injection engine and LoRA: selection, exact counts, identity at init,
merge/unmerge, and bad input that leaves the model untouched."""

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import peftjax
from peftjax import LoraConfig, PeftError
from peftjax.core.paths import dotted


class QueryValueStack(nnx.Module):
    """12 layers of 768x768 query and value kernels, nothing else."""

    def __init__(self, *, layers=12, d=768, rngs):
        self.layer = nnx.List(
            [nnx.Dict(query=nnx.Linear(d, d, rngs=rngs), value=nnx.Linear(d, d, rngs=rngs)) for _ in range(layers)]
        )


def test_lora_count_on_a_bert_base_shaped_stack():
    model = nnx.eval_shape(lambda: QueryValueStack(rngs=nnx.Rngs(0)))
    before = peftjax.count_params(model).total
    peftjax.apply(model, LoraConfig(rank=4, targets=["query", "value"]))
    count = peftjax.count_params(model)
    assert count.trainable == 147_456 == 12 * 2 * (768 * 4 + 4 * 768)
    assert count.total == before + 147_456


def test_lora_count_on_one_4096_kernel():
    class One(nnx.Module):
        def __init__(self, rngs):
            self.proj = nnx.Linear(4096, 4096, use_bias=False, rngs=rngs)

    model = nnx.eval_shape(lambda: One(nnx.Rngs(0)))
    peftjax.apply(model, LoraConfig(rank=8, targets=["proj"]))
    assert peftjax.count_params(model) == (65_536, 4096 * 4096 + 65_536)
    assert "trainable params: 65,536 || all params: 16,842,752 || trainable%: 0.3891" in peftjax.summary(model)


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
@pytest.mark.parametrize("rslora", [False, True])
def test_step_zero_output_equals_base_exactly(toy, toy_batch, init, rslora):
    x, _ = toy_batch
    before = toy(x)
    peftjax.apply(toy, LoraConfig(rank=4, alpha=16, targets="all-linear", init=init, rslora=rslora))
    assert (toy(x) == before).all()
    layer = toy.layers[0].query
    assert isinstance(layer, peftjax.AdapterWrapper) and not (layer.lora_a[...] == 0).all()
    assert layer.scale == (16 / 2 if rslora else 16 / 4)


def test_lora_forward_is_the_formula(toy):
    peftjax.apply(toy, LoraConfig(rank=3, alpha=6, targets=["query"]))
    layer = toy.layers[0].query
    layer.lora_b[...] = jax.random.normal(jax.random.key(2), layer.lora_b.shape)
    x = jax.random.normal(jax.random.key(3), (5, 16))
    base = layer.base
    expected = x @ base.kernel[...] + base.bias[...] + 2.0 * (x @ layer.lora_a[...]) @ layer.lora_b[...]
    assert jnp.allclose(layer(x), expected, atol=1e-5)


def randomise_adapters(model, seed=7):
    for i, (_, wrapper) in enumerate(peftjax.iter_wrappers(model)):
        wrapper.lora_b[...] = 0.1 * jax.random.normal(jax.random.key(seed + i), wrapper.lora_b.shape)


def test_merge_matches_unmerged_and_unmerge_restores_kernels(toy, toy_batch):
    x, _ = toy_batch
    kernels = {p: jnp.array(v[...]) for p, v in nnx.iter_graph(toy) if isinstance(v, nnx.Param)}
    peftjax.apply(toy, LoraConfig(rank=4, alpha=8, targets="all-linear"))
    randomise_adapters(toy)
    unmerged = toy(x)
    peftjax.merge(toy)
    assert all(w.merged for _, w in peftjax.iter_wrappers(toy))
    assert jnp.abs(toy(x) - unmerged).max() <= 1e-5
    peftjax.unmerge(toy)
    for _, wrapper in peftjax.iter_wrappers(toy):
        assert not wrapper.merged
    restored = {p[:-2] + p[-1:]: v[...] for p, v in nnx.iter_graph(toy) if isinstance(v, nnx.Param) and "base" in p}
    for path, kernel in restored.items():
        assert jnp.abs(kernel - kernels[path]).max() <= 1e-6, path


def test_einsum_kernels_get_the_same_lora():
    """An nnx.Einsum with a (d, heads, head_dim) kernel behaves as the Linear
    with the kernel flattened: same output, same merge."""
    rngs = nnx.Rngs(0)
    einsum = nnx.Einsum("btd,dnh->btnh", (8, 2, 3), rngs=rngs)
    linear = nnx.Linear(8, 6, use_bias=False, rngs=rngs)
    linear.kernel[...] = einsum.kernel[...].reshape(8, 6)

    class Pair(nnx.Module):
        def __init__(self):
            self.proj_e, self.proj_l = einsum, linear

    pair = Pair()
    peftjax.apply(pair, LoraConfig(rank=2, targets=["proj_e", "proj_l"]))
    pair.proj_l.lora_a[...] = pair.proj_e.lora_a[...]
    b = jax.random.normal(jax.random.key(1), (2, 6))
    pair.proj_l.lora_b[...], pair.proj_e.lora_b[...] = b, b.reshape(2, 2, 3)
    x = jax.random.normal(jax.random.key(2), (2, 5, 8))
    out = pair.proj_e(x)
    assert jnp.allclose(out.reshape(2, 5, 6), pair.proj_l(x), atol=1e-5)
    peftjax.merge(pair)
    assert jnp.allclose(pair.proj_e(x), out, atol=1e-5)


def test_target_rules(toy):
    def selected(targets, exclude=()):
        model = ToyStackFactory()
        peftjax.apply(model, LoraConfig(rank=1, targets=targets, exclude=exclude))
        return sorted(p for p, _ in peftjax.iter_wrappers(model))

    assert selected(["query"]) == ["layers.0.query", "layers.1.query"]
    assert selected(r"layers\.1\.(key|value)") == ["layers.1.key", "layers.1.value"]
    assert selected(r".*query") == selected(["query"])
    with pytest.raises(PeftError, match=r"must match the whole dotted path, e.g. '\.\*query'"):
        selected("query")
    linear = selected("all-linear")
    assert "head" not in linear and len(linear) == 12
    assert selected("all-linear", exclude=["up", "down"]) == [p for p in linear if not p.endswith(("up", "down"))]


@pytest.mark.parametrize(
    ("targets", "exclude"),
    [
        (["query", "value"], ()),
        (["output.dense"], ()),  # both attention.output.dense and the FFN's output.dense
        (["dense"], ["output.dense"]),
        (["encoder.layer.1.attention.self.key"], ()),
        (r".*layer\.0\..*(query|intermediate\.dense)", ()),
        (r".*\.dense", r".*pooler\.dense"),
    ],
)
def test_targets_select_what_hf_peft_selects(targets, exclude):
    """The README's claim: names and regexes (target_modules, exclude_modules)
    select the same modules as HF PEFT's check_target_module_exists."""
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    from peftjax.models import from_config

    model = from_config("bert-tiny", seed=0)  # a BertModel: paths start at embeddings / encoder / pooler
    linear = [dotted(path) for path, module in nnx.iter_modules(model) if isinstance(module, nnx.Linear)]
    peftjax.apply(model, LoraConfig(rank=1, targets=targets, exclude=exclude))
    ours = sorted(p for p, _ in peftjax.iter_wrappers(model))
    config = peft.LoraConfig(
        target_modules=targets if isinstance(targets, str) else list(targets),
        exclude_modules=(exclude if isinstance(exclude, str) else list(exclude)) or None,
    )
    theirs = sorted(p for p in linear if check_target_module_exists(config, p))  # excluded ones are falsy
    assert ours == theirs and ours


def ToyStackFactory():
    from conftest import ToyStack

    return ToyStack(rngs=nnx.Rngs(0))


BAD_CONFIGS = {
    "no match": (dict(targets=["qeury"]), "matched no module.*Did you mean \\['query'\\]"),
    "regex needs full match": (dict(targets="query"), "matched no module.*must match the whole dotted path"),
    "rank 0": (dict(targets=["query"], rank=0), "rank=0: must be a positive integer"),
    "alpha 0": (dict(targets=["query"], alpha=0.0), "alpha=0.0: must be > 0"),
    "dropout 1": (dict(targets=["query"], dropout=1.0), r"dropout=1.0: must be in \[0, 1\)"),
    "dropout negative": (dict(targets=["query"], dropout=-0.1), r"dropout=-0.1"),
    "unsupported layer": (dict(targets=["norm"]), "layers.0.norm is a LayerNorm; LoraConfig wraps"),
    "container module": (dict(targets=["layers"]), "layers is a List"),
    "bad regex": (dict(targets="query("), "not a valid regular expression"),
    "empty targets": (dict(targets=[]), "targets is empty"),
    "missing targets": (dict(), r"targets has no default for ToyStack \(model_type None\).*Give targets"),
}


@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_input_is_a_clear_error_and_leaves_the_model_untouched(toy, unchanged, case):
    fields, message = BAD_CONFIGS[case]
    check = unchanged(toy)
    with pytest.raises(PeftError, match=message):
        peftjax.apply(toy, LoraConfig(**fields))
    check()
    assert issubclass(PeftError, ValueError)


def test_double_wrapping_is_an_error_unless_stacking(toy, toy_batch, unchanged):
    peftjax.apply(toy, LoraConfig(rank=2, targets=["query"]))
    check = unchanged(toy)
    with pytest.raises(PeftError, match="already wrapped by LoraLinear.*stack=True"):
        peftjax.apply(toy, LoraConfig(rank=2, targets="all-linear"), adapter_name="second")
    check()
    with pytest.raises(PeftError, match="adapter name 'default' is already used"):
        peftjax.apply(toy, LoraConfig(rank=2, targets=["key"]))
    check()
    x, _ = toy_batch
    before = toy(x)
    peftjax.apply(toy, LoraConfig(rank=2, targets=["query"]), adapter_name="second", stack=True)
    stacked = toy.layers[0].query
    assert stacked.adapter_name == "second" and stacked.base.adapter_name == "default"
    assert (toy(x) == before).all()
    assert peftjax.count_params(toy).trainable == 2 * 2 * (16 * 2 + 2 * 16)


def test_an_error_midway_restores_every_module(toy, unchanged, monkeypatch):
    """Surgery that fails on its last assignment undoes the earlier ones."""
    from peftjax.core import inject

    check = unchanged(toy)
    real_assign, calls = inject._assign, []

    def failing_assign(parent, key, value):
        calls.append(key)
        if len(calls) == 3:
            raise RuntimeError("boom")
        real_assign(parent, key, value)

    monkeypatch.setattr(inject, "_assign", failing_assign)
    with pytest.raises(RuntimeError):
        peftjax.apply(toy, LoraConfig(rank=2, targets=["query", "value"]))
    monkeypatch.setattr(inject, "_assign", real_assign)
    check()


def test_config_round_trip():
    config = LoraConfig(rank=4, alpha=8, targets=["query", "value"], dropout=0.1, rslora=True)
    assert peftjax.config_from_dict(config.to_dict()) == config
    with pytest.raises(PeftError, match="Did you mean \\['lora'"):
        peftjax.config_from_dict({"type": "lroa"})
    with pytest.raises(PeftError, match="no field"):
        peftjax.config_from_dict({"type": "lora", "targets": ["q"], "rnak": 4})
