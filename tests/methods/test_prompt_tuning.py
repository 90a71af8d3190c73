"""Prompt tuning against a manual computation and HF PEFT: N virtual tokens
whose embeddings are those of real tokens P must give the base model's
computation on the sequence [P; ids] (the N positions dropped from token
outputs), and a tiny Llama must give HF PEFT's logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import peftjax
from peftjax import PeftError, PromptTuningConfig
from peftjax.methods.prompt_tuning import repeat_to_length
from peftjax.models import from_config

PROMPT_IDS = (11, 12, 13, 14, 15)
N = len(PROMPT_IDS)
TOLERANCE = 1e-5


def batch():
    ids = jax.random.randint(jax.random.key(1), (2, 8), 3, 1000)
    mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3], jnp.int32)
    return ids, mask


def with_prompt_tokens(ids, mask):
    """[P; ids] and its mask: what the virtual tokens stand for."""
    prompt = jnp.broadcast_to(jnp.array(PROMPT_IDS, ids.dtype), (ids.shape[0], N))
    return jnp.concatenate([prompt, ids], 1), jnp.concatenate([jnp.ones_like(prompt), mask], 1)


def prompted_and_base(preset, **kwargs):
    """The preset with a text-initialised prompt, and the same base model without it."""
    model, base = from_config(preset, seed=0, **kwargs), from_config(preset, seed=0, **kwargs)
    peftjax.apply(model, PromptTuningConfig(num_virtual_tokens=N, init="text", init_text_ids=PROMPT_IDS))
    model.eval(), base.eval()
    return model, base


@pytest.mark.parametrize("preset", ["bert-tiny", "roberta-tiny"])
def test_bert_sequence_classification_reads_position_0_of_the_prompted_sequence(preset):
    """BERT's pooler and RoBERTa's head read the first virtual token, as
    transformers does on HF PEFT's prompted inputs_embeds (on MiniLM against
    HF PEFT itself: tests/methods/test_hf_peft_minilm.py)."""
    model, base = prompted_and_base(preset, num_labels=2)
    ids, mask = batch()
    out = model(ids, mask)
    prompted = base(*with_prompt_tokens(ids, mask))
    np.testing.assert_allclose(out.last_hidden_state, prompted.last_hidden_state[:, N:], atol=TOLERANCE)
    np.testing.assert_allclose(out.logits, prompted.logits, atol=TOLERANCE)


def test_bert_token_classification_drops_the_virtual_positions():
    model, base = prompted_and_base("bert-tiny", task="token_classification", num_labels=3)
    ids, mask = batch()
    out = model(ids, mask)
    assert out.logits.shape == (2, 8, 3)
    hidden = base.base_model(*with_prompt_tokens(ids, mask)).last_hidden_state
    np.testing.assert_allclose(out.logits, base.classifier(hidden[:, N:]), atol=TOLERANCE)


def test_llama_sequence_classification_pools_the_last_real_token():
    model, base = prompted_and_base("llama-tiny", num_labels=2)
    ids, mask = batch()
    out = model(ids, mask)
    hidden = base.model(*with_prompt_tokens(ids, mask)).last_hidden_state
    last = jnp.array([N + 7, N + 4])  # row 1 is padded after its fifth token
    np.testing.assert_allclose(out.logits, base.score(hidden[jnp.arange(2), last]), atol=TOLERANCE)
    np.testing.assert_allclose(out.last_hidden_state, hidden[:, N:], atol=TOLERANCE)


def test_llama_causal_lm_logits_are_the_callers_positions():
    model, base = prompted_and_base("llama-tiny")
    ids, mask = batch()
    expected = base(*with_prompt_tokens(ids, mask)).logits[:, N:]
    np.testing.assert_allclose(model(ids, mask).logits, expected, atol=TOLERANCE)


def hf_prompt_tuning(path, task_type, seed=0, **model_kwargs):
    """HF PEFT's prompt tuning on a transformers Llama, random prompt, and the
    same prompt on peftjax's Llama from the same checkpoint."""
    import transformers
    from peft import PromptTuningConfig as HFPromptTuningConfig
    from peft import get_peft_model

    from peftjax.models import from_pretrained

    cls = transformers.LlamaForCausalLM if task_type == "CAUSAL_LM" else transformers.LlamaForSequenceClassification
    torch.manual_seed(seed)
    reference = cls.from_pretrained(path, **model_kwargs).eval()
    theirs = get_peft_model(reference, HFPromptTuningConfig(task_type=task_type, num_virtual_tokens=N)).eval()
    task = "causal_lm" if task_type == "CAUSAL_LM" else "classification"
    ours = from_pretrained(path, task=task, **model_kwargs)
    peftjax.apply(ours, PromptTuningConfig(num_virtual_tokens=N))
    ours.eval()
    ours.model.input_embeddings.prompt[...] = theirs.prompt_encoder["default"].embedding.weight.detach().numpy()
    return theirs, ours


def test_llama_causal_lm_matches_hf_peft(tiny_llama_path):
    """HF PEFT's own forward on a padded batch: its logits at the caller's positions."""
    theirs, ours = hf_prompt_tuning(tiny_llama_path, "CAUSAL_LM")
    ids, mask = (np.asarray(a) for a in batch())
    with torch.no_grad():
        expected = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours(ids, mask).logits)[real], expected[:, N:][real], atol=1e-4, rtol=0)


def test_llama_classifier_matches_hf_peft_on_rows_without_padding(tiny_llama_path):
    """Without padding, transformers' last position is the last real token."""
    theirs, ours = hf_prompt_tuning(tiny_llama_path, "SEQ_CLS", num_labels=3)
    ours.score.kernel[...] = theirs.base_model.score.weight.detach().numpy().T
    ids = np.asarray(batch()[0])
    with torch.no_grad():
        expected = theirs(input_ids=torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(ours(ids).logits, expected, atol=1e-4, rtol=0)


def test_roberta_classifier_matches_hf_peft_on_a_right_padded_batch(tmp_path):
    """<s> of the prompted sequence is the first virtual token; right padding
    keeps the real tokens' positions where transformers puts them."""
    import transformers
    from peft import PromptTuningConfig as HFPromptTuningConfig
    from peft import get_peft_model

    from peftjax.models import PRESETS, from_pretrained

    config = PRESETS["roberta-tiny"].to_hf_dict()
    config.update(id2label={"0": "a", "1": "b", "2": "c"}, label2id={"a": 0, "b": 1, "c": 2})
    torch.manual_seed(0)
    transformers.RobertaForSequenceClassification(transformers.AutoConfig.for_model(**config)).save_pretrained(tmp_path)
    reference = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path).eval()
    theirs = get_peft_model(reference, HFPromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N)).eval()
    ours = from_pretrained(tmp_path)
    peftjax.apply(ours, PromptTuningConfig(num_virtual_tokens=N))
    ours.eval()
    prompt = theirs.prompt_encoder["default"].embedding.weight.detach().numpy()
    ours.roberta.embeddings.input_embeddings.prompt[...] = prompt
    ids, mask = (np.array(a) for a in batch())
    ids[mask == 0] = config["pad_token_id"]
    with torch.no_grad():
        expected = theirs(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(ours(ids, mask).logits, expected, atol=1e-4, rtol=0)


def test_hf_peft_draws_a_random_prompt_from_a_standard_normal(tiny_llama_path):
    """What the module doc says of HF PEFT's random start (ours is scaled to the table)."""
    theirs, _ = hf_prompt_tuning(tiny_llama_path, "CAUSAL_LM")
    values = theirs.prompt_encoder["default"].embedding.weight.detach().numpy()  # N x 64 = 320 draws
    assert abs(values.mean()) < 0.25 and abs(values.std() - 1) < 0.15


def test_text_init_repeats_or_truncates_the_ids_as_hf_peft():
    assert repeat_to_length((1, 2, 3), 7) == (1, 2, 3, 1, 2, 3, 1)
    assert repeat_to_length((1, 2, 3, 4), 2) == (1, 2)
    model = from_config("bert-tiny", num_labels=2, seed=0)
    table = model.get_input_embeddings().embedding[...]
    peftjax.apply(model, PromptTuningConfig(num_virtual_tokens=7, init="text", init_text_ids=(5, 6, 7)))
    prompt = model.bert.embeddings.input_embeddings.prompt[...]
    np.testing.assert_array_equal(prompt, table[jnp.array([5, 6, 7, 5, 6, 7, 5])])


def test_random_init_matches_the_token_table_scale():
    model = from_config("llama-tiny", seed=0)
    table_std = float(jnp.std(model.get_input_embeddings().embedding[...]))
    peftjax.apply(model, PromptTuningConfig(num_virtual_tokens=64))
    prompt = model.model.input_embeddings.prompt[...]
    assert prompt.shape == (64, 64)
    assert abs(float(jnp.std(prompt)) / table_std - 1) < 0.1
    fixed = from_config("llama-tiny", seed=0)
    peftjax.apply(fixed, PromptTuningConfig(num_virtual_tokens=64, init_std=0.5))
    assert abs(float(jnp.std(fixed.model.input_embeddings.prompt[...])) / 0.5 - 1) < 0.1


def test_vit_takes_a_random_prompt_and_refuses_a_text_one(unchanged):
    model = from_config("vit-tiny", num_labels=3, seed=0)
    check = unchanged(model)
    with pytest.raises(PeftError, match="reads the token embeddings.*get_input_embeddings"):
        peftjax.apply(model, PromptTuningConfig(num_virtual_tokens=2, init="text", init_text_ids=(1,)))
    check()
    peftjax.apply(model, PromptTuningConfig(num_virtual_tokens=2))
    model.eval()
    out = model(jax.random.normal(jax.random.key(0), (2, 3, 32, 32)))
    assert out.logits.shape == (2, 3) and out.last_hidden_state.shape == (2, 17, 32)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (dict(num_virtual_tokens=0), "num_virtual_tokens=0: must be a positive integer"),
        (dict(init="vocab"), "init='vocab': must be 'random' or 'text'"),
        (dict(init="text"), "init_text_ids=\\(\\): must not be empty"),
        (dict(init="text", init_text_ids=(1, -2)), "must hold non-negative token ids"),
        (dict(init_std=0.0), "init_std=0.0: must be > 0"),
    ],
)
def test_bad_configs_are_clear_errors(fields, message):
    with pytest.raises(PeftError, match=message):
        PromptTuningConfig(**fields)


def test_ids_outside_the_vocabulary_leave_the_model_untouched(unchanged):
    model = from_config("bert-tiny", num_labels=2, seed=0)
    check = unchanged(model)
    with pytest.raises(PeftError, match=r"init_text_ids \[5000\] are outside the vocabulary of 1000 tokens"):
        peftjax.apply(model, PromptTuningConfig(init="text", init_text_ids=(3, 5000)))
    check()


def test_config_round_trip_and_default_targets():
    config = PromptTuningConfig(num_virtual_tokens=3, init="text", init_text_ids=[4, 5])
    assert config.targets == ("input_embeddings",) and config.init_text_ids == (4, 5)
    assert peftjax.config_from_dict(config.to_dict()) == config


def test_bert_refuses_positions_past_its_table_instead_of_returning_nan():
    model = from_config("bert-tiny", num_labels=2, seed=0)  # max_position_embeddings=128
    peftjax.apply(model, PromptTuningConfig(num_virtual_tokens=20))
    model.eval()
    assert jnp.isfinite(model(jnp.full((1, 108), 5)).logits).all()
    with pytest.raises(ValueError, match=r"109 tokens \+ 20 prepended .* up to 128, but max_position_embeddings=128"):
        model(jnp.full((1, 109), 5))
