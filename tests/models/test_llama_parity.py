"""Llama, Mistral and Qwen2: peftjax logits equal transformers PyTorch logits.

Each variant is a tiny random transformers model saved to a temporary folder
once per module, loaded by ``from_pretrained`` and run on the same padded
batch. Together they cover grouped-query attention, llama3 and linear RoPE
scaling, tied and untied embeddings, Qwen2's q/k/v biases, Mistral's sliding
window, right and left padding, and the sequence classification head.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from peftjax import models

ATOL = 1e-4  # max abs difference to transformers in float32

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
TINY = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=128,
    pad_token_id=0,
)

VARIANTS = {
    # Llama 3.2 in miniature: GQA, llama3 RoPE scaling, tied embeddings.
    "llama-gqa-llama3-tied": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(num_key_value_heads=2, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True),
    ),
    # Untied head, linear RoPE scaling, Llama's biases on every projection.
    "llama-untied-linear-bias": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(
            num_key_value_heads=4,
            tie_word_embeddings=False,
            attention_bias=True,
            mlp_bias=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        ),
    ),
    # Qwen2: q/k/v biases only, GQA with one KV head.
    "qwen2-bias": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(num_key_value_heads=1, tie_word_embeddings=False),
    ),
    # Mistral with a sliding window shorter than the sequence.
    "mistral-sliding": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(num_key_value_heads=2, sliding_window=4, tie_word_embeddings=False),
    ),
    "llama-seq-cls": (
        transformers.LlamaConfig,
        transformers.LlamaForSequenceClassification,
        dict(num_key_value_heads=2, num_labels=3, rope_parameters=LLAMA3_ROPE),
    ),
}


@nnx.jit
def forward(model, input_ids, attention_mask, position_ids):
    return model(input_ids, attention_mask, position_ids)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, tuple[str, torch.nn.Module]]:
    """Every variant built and saved by transformers once: name -> (folder, model)."""
    built = {}
    for name, (config_cls, model_cls, extra) in VARIANTS.items():
        torch.manual_seed(0)
        config = config_cls(**{**TINY, **extra})
        reference = model_cls(config).eval()
        folder = tmp_path_factory.mktemp(name)
        reference.save_pretrained(folder)
        built[name] = (str(folder), reference)
    return built


def batch(padding_side: str) -> dict[str, np.ndarray]:
    """Three sequences of 10 tokens; two are padded (right or left)."""
    rng = np.random.default_rng(1)
    ids = rng.integers(1, 101, size=(3, 10))
    mask = np.ones_like(ids)
    for row, length in ((1, 7), (2, 4)):
        if padding_side == "right":
            mask[row, length:] = 0
        else:
            mask[row, : 10 - length] = 0
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask}


def compare(ours: jnp.ndarray, theirs: torch.Tensor, mask: np.ndarray | None) -> float:
    """Max abs difference, over real (unpadded) positions when given a mask."""
    diff = np.abs(np.asarray(ours) - theirs.detach().numpy())
    if mask is not None:
        diff = diff[mask.astype(bool)]
    return float(diff.max())


@pytest.mark.parametrize("name", [n for n in VARIANTS if n != "llama-seq-cls"])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_causal_lm_logits_match(checkpoints, name, padding_side):
    folder, reference = checkpoints[name]
    model, report = models.from_pretrained(folder, output_loading_info=True)
    assert isinstance(model, models.LlamaForCausalLM)
    assert report.missing_keys == () and report.unexpected_keys == ()
    inputs = batch(padding_side)
    # Left padding: start every sequence at position 0 in both frameworks.
    positions = np.maximum(np.cumsum(inputs["attention_mask"], axis=1) - 1, 0)
    ours = forward(
        model,
        jnp.asarray(inputs["input_ids"]),
        jnp.asarray(inputs["attention_mask"]),
        jnp.asarray(positions),
    )
    with torch.no_grad():
        theirs = reference(
            input_ids=torch.from_numpy(inputs["input_ids"]),
            attention_mask=torch.from_numpy(inputs["attention_mask"]),
            position_ids=torch.from_numpy(positions),
        )
    assert ours.logits.shape == tuple(theirs.logits.shape)
    assert compare(ours.logits, theirs.logits, inputs["attention_mask"]) < ATOL


def test_structure_follows_config(checkpoints):
    tied = models.from_pretrained(checkpoints["llama-gqa-llama3-tied"][0])
    assert tied.lm_head is None and tied.config.tie_word_embeddings
    assert tied.config.rope_parameters.rope_type == "llama3"
    attention = tied.model.layers[0].self_attn
    assert attention.k_proj.kernel.shape == (64, 2 * 16)  # 2 KV heads of 16 dims
    assert attention.q_proj.bias is None

    qwen = models.from_pretrained(checkpoints["qwen2-bias"][0])
    attention = qwen.model.layers[1].self_attn
    assert attention.q_proj.bias is not None and attention.v_proj.bias is not None
    assert attention.o_proj.bias is None
    assert qwen.lm_head.kernel.shape == (64, 101)

    mistral = models.from_pretrained(checkpoints["mistral-sliding"][0])
    assert mistral.model.layers[0].self_attn.sliding_window == 4
    assert mistral.get_input_embeddings() is mistral.model.embed_tokens


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_sequence_classification_pools_last_real_token(checkpoints, padding_side):
    folder, reference = checkpoints["llama-seq-cls"]
    model = models.from_pretrained(folder)
    assert isinstance(model, models.LlamaForSequenceClassification)
    assert model.output_head_names == ("score",)
    inputs = batch(padding_side)
    ours = forward(
        model, jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"]), None
    )
    with torch.no_grad():
        theirs = reference(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    assert ours.logits.shape == (3, 3)
    assert compare(ours.logits, theirs.logits, None) < ATOL


@pytest.mark.parametrize("name", ["llama-gqa-llama3-tied", "qwen2-bias", "llama-seq-cls"])
def test_round_trip_through_transformers(checkpoints, tmp_path, name):
    folder, reference = checkpoints[name]
    model = models.from_pretrained(folder)
    models.save_pretrained(model, tmp_path)
    reloaded = type(reference).from_pretrained(tmp_path).eval()
    assert reloaded.config.model_type == reference.config.model_type
    inputs = batch("right")
    with torch.no_grad():
        before = reference(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits
        after = reloaded(**{k: torch.from_numpy(v) for k, v in inputs.items()}).logits
    assert compare(after.numpy(), before, None) == 0.0
    ours = forward(
        model, jnp.asarray(inputs["input_ids"]), jnp.asarray(inputs["attention_mask"]), None
    )
    mask = inputs["attention_mask"] if after.ndim == 3 else None
    assert compare(ours.logits, after, mask) < ATOL


def test_llama3_inverse_frequencies_match_transformers(checkpoints):
    _, reference = checkpoints["llama-gqa-llama3-tied"]
    model = models.from_pretrained(checkpoints["llama-gqa-llama3-tied"][0])
    ours = model.config.rope_parameters.inverse_frequencies(model.config.head_dim)
    theirs = reference.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
