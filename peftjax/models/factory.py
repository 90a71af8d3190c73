"""Named architectures for random initialisation: ``from_config("llama-1b")``.

The full-size presets copy the published checkpoints' shapes (so parameter
counts and memory estimates match the real models); the ``-tiny`` presets
keep every structural feature of their family (grouped KV heads, tied
embeddings, llama3 RoPE scaling, RoBERTa positions) at a size tests can run
in milliseconds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from peftjax.models import registry
from peftjax.models.bert import BertConfig
from peftjax.models.errors import UnsupportedModelError
from peftjax.models.llama import LlamaConfig, RopeParameters
from peftjax.models.names import PACKAGED_CHECKPOINTS
from peftjax.models.resnet import ResNetConfig
from peftjax.models.vit import ViTConfig

_LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
_LLAMA3_SHARED = dict(
    vocab_size=128256,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    bos_token_id=128000,
    eos_token_id=128001,
)
_TINY_TEXT = dict(
    vocab_size=1000,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
)
_ROBERTA = dict(
    model_type="roberta",
    type_vocab_size=1,
    layer_norm_eps=1e-5,
    pad_token_id=1,
    bos_token_id=0,
    eos_token_id=2,
)

PRESETS: Mapping[str, registry.ModelConfig] = {
    # google-bert/bert-base-uncased and google-bert/bert-large-uncased.
    "bert-base": BertConfig(),
    "bert-large": BertConfig(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    # FacebookAI/roberta-base.
    "roberta-base": BertConfig(vocab_size=50265, max_position_embeddings=514, **_ROBERTA),
    # meta-llama/Llama-3.2-1B.
    "llama-1b": LlamaConfig(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        head_dim=64,
        tie_word_embeddings=True,
        rope_parameters=RopeParameters(factor=32.0, **_LLAMA3_ROPE),
        **_LLAMA3_SHARED,
    ),
    # meta-llama/Llama-3.1-8B.
    "llama-8b": LlamaConfig(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        head_dim=128,
        tie_word_embeddings=False,
        rope_parameters=RopeParameters(factor=8.0, **_LLAMA3_ROPE),
        **_LLAMA3_SHARED,
    ),
    # google/vit-base-patch16-224.
    "vit-base": ViTConfig(),
    # microsoft/resnet-18, -34 and -50, with their ImageNet-1k heads.
    "resnet-18": ResNetConfig(layer_type="basic", hidden_sizes=(64, 128, 256, 512), depths=(2, 2, 2, 2), num_labels=1000),
    "resnet-34": ResNetConfig(layer_type="basic", hidden_sizes=(64, 128, 256, 512), depths=(3, 4, 6, 3), num_labels=1000),
    "resnet-50": ResNetConfig(num_labels=1000),
    # Test-sized members of each family.
    "bert-tiny": BertConfig(max_position_embeddings=128, **_TINY_TEXT),
    "roberta-tiny": BertConfig(max_position_embeddings=130, **_TINY_TEXT, **_ROBERTA),
    "llama-tiny": LlamaConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters=RopeParameters(
            **{**_LLAMA3_ROPE, "factor": 32.0, "original_max_position_embeddings": 64}
        ),
    ),
    "vit-tiny": ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    ),
    # Four stages, as the full-size ResNets have; identity and projection shortcuts both occur.
    "resnet-tiny": ResNetConfig(layer_type="basic", embedding_size=8, hidden_sizes=(8, 16, 32, 64), depths=(1, 1, 1, 1)),
}


def presets() -> tuple[str, ...]:
    """Names ``from_config`` accepts."""
    return tuple(PRESETS)


def preset_config(name: str) -> registry.ModelConfig:
    """The config of a preset; the error lists the known names."""
    if name in PACKAGED_CHECKPOINTS:
        raise UnsupportedModelError(
            f"{name!r} is a pretrained checkpoint, not a preset: load it with "
            f"peftjax.models.from_pretrained({name!r}); presets: {', '.join(PRESETS)}."
        )
    if name not in PRESETS:
        raise UnsupportedModelError(
            f"Unknown preset {name!r}; choose one of {', '.join(PRESETS)} or pass a config."
        )
    return PRESETS[name]


def from_config(
    name_or_config: str | registry.ModelConfig,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
    seed: int | jax.Array = 0,
    abstract: bool = False,
    **overrides: Any,
) -> nnx.Module:
    """A randomly initialised model from a preset name or a config object.

    Args:
        name_or_config: a name from ``presets()`` or a ``BertConfig``/
            ``LlamaConfig``/``ViTConfig``/``ResNetConfig``.
        task: the head ("base", "classification", "token_classification",
            "causal_lm", "image_classification"); by default
            the family's base model (BERT, ViT, ResNet) or causal LM (Llama), or its
            classifier when ``num_labels`` is given.
        num_labels: size of a classification head.
        dtype, param_dtype: computation and parameter dtypes.
        rngs: initialisation and dropout RNGs; ``nnx.Rngs(seed)`` if omitted.
        seed: an int or a typed PRNG key (``jax.random.key``).
        abstract: return the model as ``nnx.eval_shape`` builds it, with
            ``jax.ShapeDtypeStruct`` leaves and nothing allocated; for sizing
            models such as ``llama-8b`` that should not be materialised.
        **overrides: config fields to replace (``remat=True``, dropouts, ...).

    Returns:
        The model in eval mode (dropout off), as ``from_pretrained`` returns
        one; call ``model.train()`` before fine-tuning (``peftjax train``
        does). Nothing is recorded as a new head: every parameter is random.
    """
    if isinstance(name_or_config, str):
        config = preset_config(name_or_config)
    else:
        config = name_or_config
    if num_labels is not None:
        overrides.setdefault("num_labels", num_labels)
        if num_labels != config.num_labels:
            overrides.setdefault("label_names", ())
    config = dataclasses.replace(config, **overrides)
    chosen_task = registry.resolve_task(config.model_type, task, num_labels=num_labels)
    model_cls = registry.model_class(config.model_type, chosen_task)

    def build(rngs: nnx.Rngs) -> nnx.Module:
        model = model_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        model.eval()
        return model

    rngs = rngs if rngs is not None else nnx.Rngs(seed)
    if abstract:
        return nnx.eval_shape(build, rngs)
    return build(rngs)


def count_parameters(model: nnx.Module) -> int:
    """Number of scalars in ``model``'s ``nnx.Param`` leaves (works on abstract models)."""
    return sum(
        math.prod(leaf.shape) for _, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param))
    )
