"""LoraConfig.rank_pattern / alpha_pattern against HF PEFT on a tiny BERT: which module gets
which rank and scale, the trainable-parameter count, and adapter files both ways."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402

import peftjax  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax.errors import PeftError  # noqa: E402
from peftjax.methods.base import config_from_dict  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

BERT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
            intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
            initializer_range=0.3)
# First match wins, as in HF PEFT: layer 0's query gets 2, every other query 5, every value 6; keys match
# a path or a dot-separated tail of it.
RANKS = {r"layer\.0\.attention\.self\.query": 2, "query": 5, "value": 6}
ALPHAS = {r"layer\.1\..*\.value": 30.0, "output.dense": 3.0}
TARGETS = ["query", "value", "attention.output.dense"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("bert")
    transformers.BertForSequenceClassification(transformers.BertConfig(**BERT)).save_pretrained(folder)
    return str(folder)


def theirs_model(checkpoint, **fields):
    base = transformers.BertForSequenceClassification.from_pretrained(checkpoint).eval()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["classifier"],
                             rank_pattern=dict(RANKS), alpha_pattern=dict(ALPHAS), **fields)
    return peft.get_peft_model(base, config)


def ours_model(checkpoint, **fields):
    model = models.from_pretrained(checkpoint)
    model.eval()
    peftjax.apply(model, peftjax.LoraConfig(rank=4, alpha=8, targets=TARGETS, also_train=(r"classifier\..*",),
                                            rank_pattern=RANKS, alpha_pattern=ALPHAS, **fields))
    return model


def per_module(theirs, ours) -> tuple[dict, dict]:
    layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules()
              if isinstance(m, peft.tuners.lora.LoraLayer)}
    their = {n: (m.r["default"], m.scaling["default"]) for n, m in layers.items()}
    mine = {p: (w.lora_a.shape[-1], w.scale) for p, w in peftjax.iter_wrappers(ours)}
    return their, mine


@pytest.mark.parametrize("rslora", [False, True])
def test_ranks_scales_and_counts_match_hf_peft(checkpoint, rslora):
    theirs, ours = theirs_model(checkpoint, use_rslora=rslora), ours_model(checkpoint, rslora=rslora)
    their, mine = per_module(theirs, ours)
    assert their.keys() == mine.keys() and len(mine) == 6
    for path, (rank, scale) in their.items():
        assert mine[path][0] == rank and mine[path][1] == pytest.approx(scale), path
    assert mine["bert.encoder.layer.0.attention.self.query"][0] == 2
    assert mine["bert.encoder.layer.1.attention.self.query"][0] == 5
    assert mine["bert.encoder.layer.1.attention.self.value"] == (6, pytest.approx(30.0 / (6**0.5 if rslora else 6)))
    assert mine["bert.encoder.layer.0.attention.output.dense"] == (4, pytest.approx(3.0 / (2.0 if rslora else 4)))
    trainable, _ = theirs.get_nb_trainable_parameters()
    counts = peftjax.count_params(ours, peftjax.make_optimizer(ours, optax.sgd(0.1)).labels)
    assert counts.trainable == trainable == 64 * (2 + 5) + 2 * 64 * 6 + 2 * 64 * 4 + 32 * 3 + 3


def test_adapter_files_both_ways(checkpoint, tmp_path):
    """Ours with non-zero factors of every pattern's rank, saved in HF PEFT's format, gives HF PEFT's
    logits; HF PEFT's file loads in ours."""
    ours = ours_model(checkpoint)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 100, size=(2, 8))
    for _, wrapper in peftjax.iter_wrappers(ours):  # B starts at zero: give every factor values of its own
        for factor in (wrapper.lora_a, wrapper.lora_b):
            factor[...] = jnp.asarray(rng.normal(0.0, 0.3, factor.shape), factor.dtype)
    ours.classifier.kernel[...] = jnp.asarray(rng.normal(0.0, 0.3, ours.classifier.kernel.shape), jnp.float32)
    peftjax.save_adapter(ours, tmp_path / "ours", format="peft")
    base = transformers.BertForSequenceClassification.from_pretrained(checkpoint).eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        expected = theirs(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids)).logits), expected, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    back = peftjax.load_adapter(models.from_pretrained(checkpoint), tmp_path / "theirs")
    back.eval()
    their, mine = per_module(theirs, back)
    assert {p: r for p, (r, _) in their.items()} == {p: r for p, (r, _) in mine.items()}
    np.testing.assert_allclose(np.asarray(back(jnp.asarray(ids)).logits), expected, atol=1e-5)


def test_patterns_round_trip_and_bad_input():
    config = peftjax.LoraConfig(rank=4, targets=TARGETS, rank_pattern=RANKS, alpha_pattern=ALPHAS)
    assert config_from_dict(config.to_dict()) == config and config.to_dict()["rank_pattern"] == RANKS
    with pytest.raises(PeftError, match=r"rank_pattern.*values must be positive integers; 'query' has 0"):
        peftjax.LoraConfig(targets=TARGETS, rank_pattern={"query": 0})
    with pytest.raises(PeftError, match=r"rank_pattern.*key '\(' is not a valid regex"):
        peftjax.LoraConfig(targets=TARGETS, rank_pattern={"(": 2})
    model = models.from_config("bert-tiny", num_labels=2, num_hidden_layers=1)
    with pytest.raises(PeftError, match=r"rank_pattern keys \['key'\] match none of the 2 adapted modules"):
        peftjax.apply(model, peftjax.LoraConfig(targets=["query", "value"], rank_pattern={"key": 2}))
    assert not list(peftjax.iter_wrappers(model))  # the model was left unchanged
