"""BitFit, LN tuning, linear probing and full fine-tuning: which parameters
each selects, narrowing with targets/exclude, and errors when nothing is selected."""

import pytest
from flax import nnx

import peftjax
from peftjax import BitFitConfig, FullFineTuningConfig, LinearProbeConfig, LNTuningConfig, PeftError
from peftjax.models import from_config


def trained(model) -> set[str]:
    return {p for p, label in peftjax.param_labels(model).items() if label != peftjax.FROZEN}


def test_bitfit_trains_every_bias_and_nothing_else(toy):
    peftjax.apply(toy, BitFitConfig())
    selected = trained(toy)
    assert selected and all(p.endswith(".bias") for p in selected)
    assert selected == {p for p, _ in peftjax.param_labels(toy).items() if p.endswith(".bias")}
    assert peftjax.applied_methods(toy)[0][1] == BitFitConfig()  # recorded like any method
    assert not list(peftjax.iter_wrappers(toy))  # and wraps nothing


def test_targets_and_exclude_narrow_the_selection(toy):
    peftjax.apply(toy, BitFitConfig(targets=["layers"], exclude=["key", "norm"]))
    selected = trained(toy)
    assert "head.bias" not in selected
    assert not any(".key." in p or ".norm." in p for p in selected)
    assert "layers.0.query.bias" in selected and "layers.1.down.bias" in selected


def test_ln_tuning_selects_norms_by_type_not_name():
    class Named(nnx.Module):
        def __init__(self, rngs):
            self.LayerNorm = nnx.Linear(4, 4, rngs=rngs)  # named like a norm, but is not one
            self.mixer = nnx.RMSNorm(4, rngs=rngs)  # a norm with an unusual name
            self.other = nnx.LayerNorm(4, use_bias=False, rngs=rngs)

    model = Named(nnx.Rngs(0))
    peftjax.apply(model, LNTuningConfig())
    assert trained(model) == {"mixer.scale", "other.scale"}


def test_linear_probe_trains_the_named_head_only():
    model = from_config("bert-tiny", num_labels=3, seed=0)
    peftjax.apply(model, LinearProbeConfig())
    assert trained(model) == {"classifier.kernel", "classifier.bias"}


def test_full_fine_tuning_trains_everything_including_stacked_adapters(toy):
    peftjax.apply(toy, peftjax.LoraConfig(rank=2, targets=["query"]))
    peftjax.apply(toy, FullFineTuningConfig(exclude=["head"]), adapter_name="full")
    labels = peftjax.param_labels(toy)
    assert {p for p, label in labels.items() if label == peftjax.FROZEN} == {"head.kernel", "head.bias"}
    count = peftjax.count_params(toy)
    assert count.trainable == count.total - 17


@pytest.mark.parametrize(
    ("preset", "config", "message"),
    [
        ("llama-tiny", BitFitConfig(), "BitFitConfig selects no parameter.*'bias'"),  # Llama has no biases
        ("bert-tiny", LinearProbeConfig(), "LinearProbeConfig selects no parameter.*output_head_names"),
        ("bert-tiny", LNTuningConfig(targets=["pooler"]), "LNTuningConfig selects no parameter.*pooler"),
    ],
)
def test_selecting_nothing_is_an_error_at_apply(preset, config, message, unchanged):
    model = from_config(preset, seed=0)  # no head: a bare encoder / a tied causal LM
    check = unchanged(model)
    with pytest.raises(PeftError, match=message):
        peftjax.apply(model, config)
    check()
    assert not peftjax.applied_methods(model)


def test_configs_round_trip_and_reject_all_linear():
    for config in (BitFitConfig(exclude=["key"]), LNTuningConfig(), LinearProbeConfig(), FullFineTuningConfig()):
        assert peftjax.config_from_dict(config.to_dict()) == config
    with pytest.raises(PeftError, match="wraps none"):
        BitFitConfig(targets="all-linear")


def test_ln_tuning_trains_what_hf_peft_trains_on_llama(tiny_llama_path):
    """HF PEFT's LNTuningConfig targets Llama's input, post-attention and final norms."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from peftjax.models import from_pretrained

    reference = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_path)
    theirs = peft.get_peft_model(reference, peft.LNTuningConfig(task_type="CAUSAL_LM"))
    their_norms = {
        name.removeprefix("base_model.model.").split(".ln_tuning_layers.")[0]
        for name, p in theirs.named_parameters() if p.requires_grad
    }  # fmt: skip
    model = from_pretrained(tiny_llama_path)
    peftjax.apply(model, LNTuningConfig())
    assert {p.removesuffix(".scale") for p in trained(model)} == their_norms
    assert peftjax.count_params(model).trainable == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
