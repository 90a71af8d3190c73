"""Presets and configs: parameter counts equal transformers', configs round-trip.

transformers builds the same architectures on the ``meta`` device (shapes
only), so counts are compared without allocating a single weight; the
peftjax side is built with ``abstract=True`` (``nnx.eval_shape``).
"""

import dataclasses

import jax
import pytest
import torch
import transformers
from flax import nnx

from peftjax import models

# peftjax preset -> (peftjax task, transformers class).
COUNTED = {
    "bert-base": (None, transformers.BertModel),
    "bert-large": (None, transformers.BertModel),
    "roberta-base": (None, transformers.RobertaModel),
    "vit-base": (None, transformers.ViTModel),
    "llama-1b": (None, transformers.LlamaForCausalLM),
    "bert-tiny": ("token_classification", transformers.BertForTokenClassification),
    "roberta-tiny": ("classification", transformers.RobertaForSequenceClassification),
    "llama-tiny": ("classification", transformers.LlamaForSequenceClassification),
    "vit-tiny": ("image_classification", transformers.ViTForImageClassification),
    "resnet-18": ("image_classification", transformers.ResNetForImageClassification),
    "resnet-34": ("image_classification", transformers.ResNetForImageClassification),
    "resnet-50": ("image_classification", transformers.ResNetForImageClassification),
    "resnet-tiny": (None, transformers.ResNetModel),
}


def transformers_count(preset: str, model_cls: type) -> int:
    config = models.PRESETS[preset]
    hf_config = transformers.AutoConfig.for_model(**config.to_hf_dict())
    with torch.device("meta"):
        reference = model_cls(hf_config)
    return sum(p.numel() for p in reference.parameters())


# The ResNets' counts are torchvision's (ImageNet-1k heads), which microsoft/resnet-* equal.
PUBLISHED = {
    "bert-base": 109_482_240,
    "llama-1b": 1_235_814_400,
    "resnet-18": 11_689_512,
    "resnet-34": 21_797_672,
    "resnet-50": 25_557_032,
}


@pytest.mark.parametrize("preset", list(COUNTED))
def test_parameter_count_equals_transformers(preset):
    task, model_cls = COUNTED[preset]
    count = models.count_parameters(models.from_config(preset, task=task, abstract=True))
    assert count == transformers_count(preset, model_cls)
    assert count == PUBLISHED.get(preset, count)


def test_llama_8b_is_sized_abstractly():
    model = models.from_config("llama-8b", abstract=True)
    leaves = [leaf for _, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert all(isinstance(leaf.get_value(), jax.ShapeDtypeStruct) for leaf in leaves)
    assert models.count_parameters(model) == 8_030_261_248
    assert model.lm_head.kernel.shape == (4096, 128256)
    assert model.model.layers[31].self_attn.k_proj.kernel.shape == (4096, 8 * 128)


def test_llama_1b_is_llama_3_2_1b():
    config = models.PRESETS["llama-1b"]
    assert (config.hidden_size, config.num_hidden_layers) == (2048, 16)
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 8)
    assert (config.intermediate_size, config.vocab_size) == (8192, 128256)
    assert config.tie_word_embeddings
    assert config.rope_parameters.rope_type == "llama3"
    assert config.rope_parameters.rope_theta == 500000.0


def test_presets_listing_and_unknown_names():
    assert {"bert-base", "bert-large", "roberta-base", "llama-1b", "llama-8b", "vit-base",
            "bert-tiny", "roberta-tiny", "llama-tiny", "vit-tiny", "resnet-18", "resnet-34", "resnet-50",
            "resnet-tiny"} <= set(models.presets())
    with pytest.raises(models.ModelLoadError, match="Unknown preset 'gpt-2'.*bert-base"):
        models.from_config("gpt-2")
    with pytest.raises(models.ModelLoadError, match="not available for model_type 'vit'"):
        models.from_config("vit-tiny", task="causal_lm", abstract=True)


@pytest.mark.parametrize(
    "preset, kwargs, expected_cls",
    [
        ("bert-tiny", {}, models.BertModel),
        ("bert-tiny", {"num_labels": 4}, models.BertForSequenceClassification),
        ("llama-tiny", {}, models.LlamaForCausalLM),
        ("llama-tiny", {"num_labels": 2}, models.LlamaForSequenceClassification),
        ("vit-tiny", {"num_labels": 10}, models.ViTForImageClassification),
        ("resnet-tiny", {}, models.ResNetModel),
        ("resnet-18", {"num_labels": 10}, models.ResNetForImageClassification),
        (models.PRESETS["roberta-tiny"], {"task": "token_classification"},
         models.BertForTokenClassification),
    ],
)
def test_from_config_picks_the_head(preset, kwargs, expected_cls):
    model = models.from_config(preset, abstract=True, **kwargs)
    assert type(model) is expected_cls
    if "num_labels" in kwargs:
        assert model.config.num_labels == kwargs["num_labels"]
    head_names = expected_cls.output_head_names
    assert all(hasattr(model, name) for name in head_names)


# ------------------------------------------------------------------ configs


@pytest.mark.parametrize("preset", list(models.PRESETS))
def test_config_round_trips_through_hf_dict(preset):
    config = dataclasses.replace(models.PRESETS[preset], label_names=(), remat=False)
    hf_dict = config.to_hf_dict()
    assert type(config).from_hf_dict(hf_dict) == config
    hash(config)  # models keep configs as static graph data
    # transformers reads the same architecture from the dict.
    hf_config = transformers.AutoConfig.for_model(**hf_dict)
    shape_fields = ("hidden_size", "num_attention_heads", "hidden_sizes", "depths", "layer_type", "embedding_size")
    checked = [name for name in shape_fields if hasattr(config, name)]
    assert len(checked) >= 2
    for name in checked:
        ours = getattr(config, name)
        assert getattr(hf_config, name) == (list(ours) if isinstance(ours, tuple) else ours), name


def test_qwen2_and_mistral_configs_keep_their_family_fields():
    qwen = models.LlamaConfig.from_hf_dict(
        transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16,
                                 max_window_layers=2).to_dict()
    )
    assert (qwen.attention_bias, qwen.attention_output_bias) == (True, False)
    assert qwen.layer_types == ("full_attention",) * 2 + ("sliding_attention",) * 2
    assert qwen.layer_window(3) == 16 and qwen.layer_window(0) is None
    back = transformers.Qwen2Config(**qwen.to_hf_dict())
    assert list(back.layer_types) == list(qwen.layer_types)

    mistral_dict = transformers.MistralConfig(sliding_window=8).to_dict()
    mistral = models.LlamaConfig.from_hf_dict(mistral_dict)
    assert mistral.layer_window(0) == 8 and mistral.num_key_value_heads == 8


def test_transformers_4_rope_scaling_is_read():
    config = models.LlamaConfig.from_hf_dict({
        "model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    })
    assert config.rope_parameters == models.RopeParameters(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=8192,
    )


@pytest.mark.parametrize(
    "build, field",
    [
        (lambda: models.BertConfig(hidden_size=30, num_attention_heads=4), "hidden_size"),
        (lambda: models.BertConfig(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (lambda: models.BertConfig(model_type="electra"), "model_type"),
        (lambda: models.BertConfig(hidden_act="mish"), "hidden_act"),
        (lambda: models.BertConfig(num_labels=2, label_names=("a",)), "label_names"),
        (lambda: models.LlamaConfig(num_attention_heads=8, num_key_value_heads=3),
         "num_key_value_heads"),
        (lambda: models.LlamaConfig(model_type="qwen2"), "qwen2"),
        (lambda: models.LlamaConfig(layer_types=("sliding_attention",) * 32), "sliding_window"),
        (lambda: models.RopeParameters(rope_type="yarn"), "rope_type"),
        (lambda: models.RopeParameters(rope_type="llama3", factor=8.0), "low_freq_factor"),
        (lambda: models.ViTConfig(image_size=30, patch_size=8), "image_size"),
        (lambda: models.ViTConfig(num_channels=0), "num_channels"),
        (lambda: models.ResNetConfig(hidden_sizes=(8, 16), depths=(1,)), "depths"),
        (lambda: models.ResNetConfig(depths=(1, 0, 1, 1)), "depths"),
        (lambda: models.ResNetConfig(layer_type="bottleneck", hidden_sizes=(2, 8), depths=(1, 1)), "hidden_sizes"),
    ],
)
def test_invalid_configs_name_the_field(build, field):
    with pytest.raises(ValueError, match=field):
        build()
