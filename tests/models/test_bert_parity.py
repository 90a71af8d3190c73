"""BERT and RoBERTa: peftjax outputs equal transformers PyTorch outputs.

The real MiniLM checkpoint proves the loader on real weights; tiny random
models saved by transformers cover the heads and RoBERTa's differences; a
save/load round trip proves transformers reads what peftjax writes.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from peftjax import models

ATOL = 1e-4  # max abs difference to transformers in float32


@nnx.jit
def forward(model, input_ids, attention_mask, token_type_ids=None):
    return model(input_ids, attention_mask, token_type_ids)


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.asarray(value)) for name, value in batch.items()}


def max_diff(ours, theirs: torch.Tensor) -> float:
    return float(np.abs(np.asarray(ours, dtype=np.float32) - theirs.detach().numpy()).max())


def test_minilm_real_weights_match_transformers(minilm_path):
    path = minilm_path
    tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    batch = tokenizer(
        ["A short one.", "A much longer sentence, so the first one is padded in this batch."],
        padding=True,
        return_tensors="np",
    )
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"

    model, report = models.from_pretrained(path, output_loading_info=True)
    assert isinstance(model, models.BertModel)
    assert report.missing_keys == () and report.unexpected_keys == ()
    ours = forward(
        model,
        jnp.asarray(batch["input_ids"]),
        jnp.asarray(batch["attention_mask"]),
        jnp.asarray(batch["token_type_ids"]),
    )

    reference = transformers.BertModel.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        theirs = reference(**to_torch(batch))
    assert max_diff(ours.last_hidden_state, theirs.last_hidden_state) < ATOL
    assert max_diff(ours.pooler_output, theirs.pooler_output) < ATOL
    assert ours.logits is None


TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=48,
    max_position_embeddings=40,
    num_labels=3,
)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, tuple[str, torch.nn.Module]]:
    """Tiny random transformers models saved once per module: name -> (folder, model)."""
    builds = {
        "bert-seq": (transformers.BertConfig, transformers.BertForSequenceClassification),
        "bert-tok": (transformers.BertConfig, transformers.BertForTokenClassification),
        "roberta-base": (transformers.RobertaConfig, transformers.RobertaModel),
        "roberta-seq": (transformers.RobertaConfig, transformers.RobertaForSequenceClassification),
    }
    checkpoints = {}
    for name, (config_cls, model_cls) in builds.items():
        torch.manual_seed(0)
        extra = dict(max_position_embeddings=42, type_vocab_size=1) if "roberta" in name else {}
        model = model_cls(config_cls(**{**TINY, **extra})).eval()
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder)
        checkpoints[name] = (str(folder), model)
    return checkpoints


def padded_batch(pad_id: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 99, size=(3, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = pad_id
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    "name, expected_cls",
    [
        ("bert-seq", models.BertForSequenceClassification),
        ("bert-tok", models.BertForTokenClassification),
        ("roberta-base", models.BertModel),
        ("roberta-seq", models.BertForSequenceClassification),
    ],
)
def test_tiny_heads_match_transformers(tiny_checkpoints, name, expected_cls):
    folder, reference = tiny_checkpoints[name]
    model, report = models.from_pretrained(folder, output_loading_info=True)
    assert type(model) is expected_cls
    assert report.missing_keys == () and report.unexpected_keys == ()
    batch = padded_batch(reference.config.pad_token_id)
    ours = forward(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    with torch.no_grad():
        theirs = reference(**to_torch(batch))
    if name == "roberta-base":
        assert max_diff(ours.last_hidden_state, theirs.last_hidden_state) < ATOL
        assert max_diff(ours.pooler_output, theirs.pooler_output) < ATOL
    else:
        assert ours.logits.shape == tuple(theirs.logits.shape)
        assert max_diff(ours.logits, theirs.logits) < ATOL


def test_roberta_module_paths_mirror_transformers(tiny_checkpoints):
    folder, reference = tiny_checkpoints["roberta-seq"]
    model = models.from_pretrained(folder)
    assert model.roberta.embeddings.word_embeddings is model.get_input_embeddings()
    assert model.classifier.out_proj.kernel.shape == (32, 3)
    assert model.output_head_names == ("classifier",)
    torch_names = {name.rsplit(".", 1)[0] for name, _ in reference.named_parameters()}
    assert "roberta.encoder.layer.0.attention.self.query" in torch_names
    assert model.roberta.encoder.layer[0].attention.self.query.kernel.shape == (32, 32)


@pytest.mark.parametrize("name", ["bert-seq", "bert-tok", "roberta-seq"])
def test_round_trip_through_transformers(tiny_checkpoints, tmp_path, name):
    folder, _ = tiny_checkpoints[name]
    model = models.from_pretrained(folder)
    models.save_pretrained(model, tmp_path)
    reloaded = transformers.AutoConfig.from_pretrained(tmp_path)
    model_cls = getattr(transformers, reloaded.architectures[0])
    theirs_model = model_cls.from_pretrained(tmp_path).eval()
    batch = padded_batch(reloaded.pad_token_id)
    ours = forward(model, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]))
    with torch.no_grad():
        theirs = theirs_model(**to_torch(batch))
    assert max_diff(ours.logits, theirs.logits) < ATOL


def test_head_on_bare_checkpoint_is_reported_new(tiny_checkpoints, caplog):
    folder, _ = tiny_checkpoints["roberta-base"]
    with caplog.at_level("WARNING", logger="peftjax.models"):
        model, report = models.from_pretrained(
            folder,
            task="classification",
            num_labels=5,
            seed=jax.random.key(0, impl="rbg"),  # quick to compile on CPU
            output_loading_info=True,
        )
    assert set(report.missing_keys) == {
        "classifier.dense.weight",
        "classifier.dense.bias",
        "classifier.out_proj.weight",
        "classifier.out_proj.bias",
    }
    # RoBERTa's classifier reads the first token, not the pooler.
    assert all(key.startswith("pooler.") for key in report.unexpected_keys)
    assert "newly initialised" in caplog.text and "classifier.out_proj.weight" in caplog.text
    assert model.classifier.out_proj.kernel.shape == (32, 5)
