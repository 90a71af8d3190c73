"""Several adapters on one model: named adapters, the active set, disabling,
deleting, different methods combined, and the errors that leave a model as it was."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import peftjax
from peftjax import BottleneckConfig, IA3Config, LoraConfig, PeftError, PrefixTuningConfig, PromptTuningConfig
from peftjax.models import from_config

BERT_FFN_OUT = r".*\.layer\.\d+\.output\.dense"  # the FFN's second projection, not attention.output.dense


def bert():
    model = from_config("bert-tiny", num_labels=2, seed=0)
    model.eval()
    ids = jax.random.randint(jax.random.key(1), (2, 8), 3, 1000)
    mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3], jnp.int32)
    return model, (ids, mask)


def logits(model, inputs):
    return model(*inputs).logits


def perturb(model, seed=0):
    """Non-zero adapter weights, so every adapter changes the output."""
    variables = [v for _, v in nnx.iter_graph(model) if isinstance(v, peftjax.AdapterParam)]
    for i, variable in enumerate(variables):
        variable[...] += 0.2 * jax.random.normal(jax.random.key(seed + i), variable.shape)


def params_of(model, adapter):
    """``{path: array}`` of one adapter's own parameters (not the layers it wraps)."""
    owned = {}
    for where, wrapper in peftjax.iter_wrappers(model):
        if wrapper.adapter_name != adapter:
            continue
        for path, variable in nnx.iter_graph(wrapper):
            if isinstance(variable, peftjax.AdapterParam) and path[0] != "base":
                owned[f"{where}.{'.'.join(map(str, path))}"] = jnp.array(variable[...])
    return owned


def two_adapters():
    """LoRA "a" on the attention, Houlsby adapters "b" on both branch outputs, both perturbed."""
    model, inputs = bert()
    base = logits(model, inputs)
    peftjax.apply(model, LoraConfig(rank=2, targets=["query", "value"]), adapter_name="a")
    peftjax.apply(model, BottleneckConfig(variant="houlsby"), adapter_name="b")
    perturb(model)
    return model, inputs, base


def only(model, keep):
    """A copy of ``model`` with every adapter but ``keep`` deleted: the reference output."""
    copy = nnx.clone(model)
    for name, _ in peftjax.applied_methods(model):
        if name != keep:
            peftjax.delete_adapter(copy, name)
    return copy


def test_the_active_set_chooses_the_output():
    model, inputs, base = two_adapters()
    both = logits(model, inputs)
    with_a, with_b = logits(only(model, "a"), inputs), logits(only(model, "b"), inputs)
    assert not np.allclose(with_a, both, atol=1e-4) and not np.allclose(with_b, both, atol=1e-4)
    peftjax.set_active_adapters(model, "a")
    np.testing.assert_array_equal(logits(model, inputs), with_a)
    peftjax.set_active_adapters(model, ["b"])
    np.testing.assert_array_equal(logits(model, inputs), with_b)
    peftjax.set_active_adapters(model, ["a", "b"])
    np.testing.assert_array_equal(logits(model, inputs), both)
    peftjax.disable_adapters(model)
    np.testing.assert_array_equal(logits(model, inputs), base)


def test_inactive_adapters_are_frozen_and_do_not_train():
    model, inputs, base = two_adapters()
    peftjax.set_active_adapters(model, ["a"])
    labels = peftjax.param_labels(model)
    a, b = params_of(model, "a"), params_of(model, "b")
    assert len(a) == 2 * 2 * 2 and len(b) == 2 * 2 * 4  # (A, B) per kernel; (down, up) x (kernel, bias)
    assert {labels[p] for p in a} == {"adapter"} and {labels[p] for p in b} == {peftjax.FROZEN}
    assert peftjax.count_params(model).trainable == sum(v.size for v in a.values())

    state = peftjax.TrainState.create(model, peftjax.make_optimizer(model, optax.adam(1e-2)))
    step = peftjax.make_train_step(lambda m, batch: jnp.mean((m(*batch).logits - 1.0) ** 2))
    for _ in range(2):
        state, _ = step(state, inputs)
    trained = state.model()
    assert all((params_of(trained, "b")[p] == v).all() for p, v in b.items()), "inactive adapter unchanged"
    assert all((params_of(trained, "a")[p] != v).any() for p, v in a.items()), "active adapter trained"


def test_disabling_every_method_gives_the_base_output_exactly():
    """LoRA, IA3, a bottleneck adapter, prefix and prompt tuning together, then none."""
    model, inputs = bert()
    base = logits(model, inputs)
    configs = {
        "lora": LoraConfig(rank=2, targets=["query", "value"]),
        "ia3": IA3Config(targets=BERT_FFN_OUT, feedforward=BERT_FFN_OUT),
        "adapter": BottleneckConfig(variant="pfeiffer"),
        "prefix": PrefixTuningConfig(num_virtual_tokens=2),
        "prompt": PromptTuningConfig(num_virtual_tokens=3),
    }
    for name, config in configs.items():
        peftjax.apply(model, config, adapter_name=name)
    perturb(model)
    combined = logits(model, inputs)
    assert not np.allclose(combined, base, atol=1e-4)
    peftjax.disable_adapters(model)
    assert (logits(model, inputs) == base).all()
    assert peftjax.count_params(model).trainable == 0
    peftjax.set_active_adapters(model, list(configs))
    np.testing.assert_array_equal(logits(model, inputs), combined)


def test_lora_on_attention_and_ia3_on_the_ffn_train_and_save_together(tmp_path):
    model, inputs = bert()
    peftjax.apply(model, LoraConfig(rank=2, targets=["query", "value"]), adapter_name="attention")
    peftjax.apply(model, IA3Config(targets=BERT_FFN_OUT, feedforward=BERT_FFN_OUT), adapter_name="ffn")
    layers, hidden, inner = model.config.num_hidden_layers, model.config.hidden_size, model.config.intermediate_size
    lora, ia3 = layers * 2 * 2 * (hidden + hidden), layers * inner  # IA3 scales the FFN's inner activation
    assert peftjax.count_params(model).trainable == lora + ia3
    assert sum(v.size for v in params_of(model, "ffn").values()) == ia3

    state = peftjax.TrainState.create(model, peftjax.make_optimizer(model, optax.adam(1e-2)))
    step = peftjax.make_train_step(lambda m, batch: jnp.mean((m(*batch).logits - 1.0) ** 2))
    for _ in range(2):
        state, _ = step(state, inputs)
    trained = state.model()
    trained.eval()
    ffn = params_of(trained, "ffn")
    assert len(ffn) == layers and all((v != 1).any() for v in ffn.values()), "IA3 vectors moved from 1"
    peftjax.save_adapter(trained, tmp_path / "both")
    fresh, _ = bert()
    peftjax.load_adapter(fresh, tmp_path / "both")
    fresh.eval()
    assert [n for n, _ in peftjax.applied_methods(fresh)] == ["attention", "ffn"]
    np.testing.assert_allclose(logits(fresh, inputs), logits(trained, inputs), atol=1e-6)


def test_an_inactive_adapter_is_saved_and_loads_back(tmp_path):
    model, inputs, _ = two_adapters()
    peftjax.set_active_adapters(model, ["a"])
    expected = logits(model, inputs)
    peftjax.save_adapter(model, tmp_path / "ab")
    fresh, _ = bert()
    peftjax.load_adapter(fresh, tmp_path / "ab")  # every saved adapter comes back active
    fresh.eval()
    peftjax.set_active_adapters(fresh, ["a"])
    np.testing.assert_array_equal(logits(fresh, inputs), expected)
    peftjax.set_active_adapters(fresh, ["a", "b"]), peftjax.set_active_adapters(model, ["a", "b"])
    np.testing.assert_array_equal(logits(fresh, inputs), logits(model, inputs))


def test_delete_restores_the_module_tree_and_the_parameter_count():
    model, inputs = bert()
    graphdef, count, base = nnx.graphdef(model), peftjax.count_params(model), logits(model, inputs)
    peftjax.apply(model, LoraConfig(rank=2, targets=["query", "value"]), adapter_name="a")
    peftjax.apply(model, BottleneckConfig(variant="houlsby"), adapter_name="b")
    peftjax.apply(model, IA3Config(targets=["query"]), adapter_name="c", stack=True)  # on top of "a"
    perturb(model)
    with_b_and_c = logits(only(model, "b"), inputs), logits(only(model, "c"), inputs)

    peftjax.delete_adapter(model, "a")  # the inner wrapper of a stack
    query = model.bert.encoder.layer[0].attention.self.query
    assert query.adapter_name == "c" and isinstance(query.base, nnx.Linear)
    peftjax.set_active_adapters(model, ["b"])
    np.testing.assert_array_equal(logits(model, inputs), with_b_and_c[0])
    peftjax.set_active_adapters(model, ["c"])
    np.testing.assert_array_equal(logits(model, inputs), with_b_and_c[1])

    peftjax.delete_adapter(model, "b")
    peftjax.delete_adapter(model, "c")
    assert nnx.graphdef(model) == graphdef
    assert peftjax.count_params(model) == (0, count.total) and count.trainable == 0
    assert peftjax.applied_methods(model) == ()
    np.testing.assert_array_equal(logits(model, inputs), base)


def test_an_unknown_adapter_name_is_a_clear_error(unchanged):
    model, _, _ = two_adapters()
    check = unchanged(model)
    for call in (
        lambda: peftjax.set_active_adapters(model, ["a", "c"]),
        lambda: peftjax.set_active_adapters(model, "A"),
        lambda: peftjax.delete_adapter(model, "default"),
    ):
        with pytest.raises(PeftError, match=r"no adapter named \[.*\] on this model; adapters: \['a', 'b'\]"):
            call()
        check()


@pytest.mark.parametrize(
    "second",
    [IA3Config(targets=["query"]), LoraConfig(rank=1, targets="all-linear"), BottleneckConfig(variant="pfeiffer")],
    ids=["ia3-on-lora", "lora-all-linear-over-lora", "bottleneck-twice"],
)
def test_two_methods_on_one_module_need_stacking(second, unchanged):
    model, inputs = bert()
    peftjax.apply(model, LoraConfig(rank=2, targets=["query"]), adapter_name="first")
    peftjax.apply(model, BottleneckConfig(variant="houlsby"), adapter_name="adapters")
    check = unchanged(model)
    with pytest.raises(PeftError, match=r"is already wrapped by \w+ \(adapter '(first|adapters)'\); pass stack=True"):
        peftjax.apply(model, second, adapter_name="second")
    check()
    assert [n for n, _ in peftjax.applied_methods(model)] == ["first", "adapters"]
