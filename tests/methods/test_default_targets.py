"""Default targets per architecture: ``LoraConfig()`` and ``IA3Config()`` wrap what HF PEFT wraps.

The tables are HF PEFT's (checked against peft's own constants for every
model type peftjax.models supports), and on tiny models of each family the
modules peftjax wraps are exactly those HF PEFT wraps on the transformers
model. Models are built abstractly (``nnx.eval_shape``): nothing runs.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import peftjax  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax.methods.ia3 import IA3Linear  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
constants = pytest.importorskip("peft.utils.constants")

FAMILY_CONFIGS = {
    "bert": models.PRESETS["bert-tiny"],
    "roberta": models.PRESETS["roberta-tiny"],
    "llama": models.PRESETS["llama-tiny"],
    "mistral": dataclasses.replace(models.PRESETS["llama-tiny"], model_type="mistral"),
    "qwen2": dataclasses.replace(models.PRESETS["llama-tiny"], model_type="qwen2", attention_bias=True),
}


def as_tuple(value):
    return tuple(value) if value is not None else None


def test_tables_are_hf_pefts():
    for model_type in models.SUPPORTED_MODEL_TYPES:
        lora = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        assert as_tuple(peftjax.LoraConfig.default_targets.get(model_type)) == as_tuple(lora), model_type
        ia3 = constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
        assert as_tuple(peftjax.IA3Config.default_targets.get(model_type)) == as_tuple(ia3), model_type
        if ia3 is not None:
            feedforward = constants.TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING[model_type]
            stand_in = types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type))
            assert peftjax.IA3Config().for_model(stand_in).feedforward == tuple(feedforward), model_type


def wrapped(model) -> set[str]:
    return {path for path, _ in peftjax.iter_wrappers(model)}


@pytest.mark.parametrize("model_type", ["bert", "roberta", "llama", "mistral", "qwen2"])
@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_defaults_wrap_what_hf_peft_wraps(model_type, method):
    config = FAMILY_CONFIGS[model_type]
    ours_config, theirs_config = {
        "lora": (peftjax.LoraConfig(), peft.LoraConfig()),
        "ia3": (peftjax.IA3Config(), peft.IA3Config()),
    }[method]
    ours = nnx.eval_shape(lambda: peftjax.apply(models.from_config(config, num_labels=2), ours_config))
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in config.to_hf_dict().items() if k != "label2id"})
    theirs = peft.get_peft_model(transformers.AutoModelForSequenceClassification.from_config(hf_config), theirs_config)
    layers = (peft.tuners.lora.LoraLayer, peft.tuners.ia3.IA3Layer)
    expected = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                if isinstance(m, layers) and not n.endswith(("base_layer", ".default"))}
    assert wrapped(ours) == expected
    if method == "ia3":
        scales_input = {p for p, w in peftjax.iter_wrappers(ours) if isinstance(w, IA3Linear) and w.scales_input}
        assert scales_input == {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                                if isinstance(m, peft.tuners.ia3.IA3Layer) and m.is_feedforward}


def test_no_default_asks_for_targets():
    vit = nnx.eval_shape(lambda: models.from_config("vit-tiny"))
    with pytest.raises(peftjax.PeftError, match=r"LoraConfig.targets has no default for ViTModel \(model_type 'vit'\)"
                                                r".*Give targets"):
        peftjax.apply(vit, peftjax.LoraConfig())
    from conftest import ToyStack

    with pytest.raises(peftjax.PeftError, match=r"IA3Config.targets has no default for ToyStack \(model_type None\)"):
        nnx.eval_shape(lambda: peftjax.apply(ToyStack(rngs=nnx.Rngs(0)), peftjax.IA3Config()))
    with pytest.raises(peftjax.PeftError, match=r"VeraConfig.targets is required"):
        peftjax.VeraConfig()  # a method without HF PEFT defaults still needs targets


def test_the_recorded_config_names_its_targets():
    model = nnx.eval_shape(lambda: peftjax.apply(models.from_config("llama-tiny"), peftjax.IA3Config()))
    ((_, recorded),) = peftjax.applied_methods(model)
    assert (recorded.targets, recorded.feedforward) == (("k_proj", "v_proj", "down_proj"), ("down_proj",))
    assert peftjax.config_from_dict(peftjax.IA3Config().to_dict()) == peftjax.IA3Config()
