"""Trainable counts on bert-base (never allocated: abstract shapes only), each
equal to its method's formula written out by hand.

bert-base: L = 12 layers, d = 768, FFN width f = 3072; 109,482,240 parameters
with the pooler, and a classifier of d * 2 + 2 = 1,538 for two labels.
"""

import pytest
from flax import nnx

import peftjax
from peftjax.models import from_config

L, D, F = 12, 768, 3072
BERT_BASE = 109_482_240
HEAD = D * 2 + 2  # classifier for num_labels=2
LORA_QV_R8 = L * 2 * 8 * (D + D)

CASES = {
    # IA3 on keys, values (out_features each) and the FFN output projection's input (f).
    "ia3-k-v-ffn": (
        peftjax.IA3Config(
            targets=r".*\.(key|value|layer\.\d+\.output\.dense)", feedforward=r".*\.layer\.\d+\.output\.dense"
        ),
        L * (D + D + F),
        55_296,
    ),
    "lora-qv-r8": (peftjax.LoraConfig(rank=8, targets=["query", "value"]), LORA_QV_R8, 294_912),
    "loraplus-qv-r8": (
        peftjax.LoraConfig(rank=8, targets=["query", "value"], loraplus_lr_ratio=16.0),
        LORA_QV_R8,
        294_912,
    ),
    # DoRA = LoRA + one magnitude per output unit of each adapted kernel.
    "dora-qv-r8": (peftjax.DoraConfig(rank=8, targets=["query", "value"]), LORA_QV_R8 + L * 2 * D, 313_344),
    # VeRA = r + out per adapted kernel; the shared random matrices are buffers, not parameters.
    "vera-qv-r256": (peftjax.VeraConfig(rank=256, targets=["query", "value"]), L * 2 * (256 + D), 24_576),
    # QLoRA trains exactly LoRA's parameters.
    "qlora-qv-r8": (peftjax.QLoraConfig(rank=8, targets=["query", "value"]), LORA_QV_R8, 294_912),
    # BitFit: q, k, v, attention output, FFN in (f), FFN out, two LayerNorms per layer;
    # the embeddings' LayerNorm and the pooler.
    "bitfit": (peftjax.BitFitConfig(), L * (4 * D + F + D + 2 * D) + D + D, 102_912),
    # LN tuning: scale and bias of two LayerNorms per layer and of the embeddings' LayerNorm.
    "ln-tuning": (peftjax.LNTuningConfig(), L * 2 * 2 * D + 2 * D, 38_400),
}


def abstract_bert_base(**kwargs) -> nnx.Module:
    return from_config("bert-base", abstract=True, **kwargs)


def applied(model: nnx.Module, config: peftjax.MethodConfig) -> nnx.Module:
    """``model`` with ``config`` applied, built abstractly (DoRA's magnitudes and
    QLoRA's codes are computed from the kernels, which are only shapes here)."""
    return nnx.eval_shape(lambda m: peftjax.apply(m, config), model)


@pytest.fixture(scope="module")
def bert_base():
    model = abstract_bert_base()
    assert peftjax.count_params(model) == (0, BERT_BASE)
    return model


@pytest.mark.parametrize("case", CASES, ids=str)
def test_trainable_count_is_the_formula(bert_base, case):
    config, formula, written = CASES[case]
    assert formula == written
    count = peftjax.count_params(applied(bert_base, config))
    assert count.trainable == formula
    # Relabelling adds no parameter, the others add exactly what trains (QLoRA's
    # 4-bit kernels count as the float parameters they stand for).
    added = 0 if isinstance(config, (peftjax.BitFitConfig, peftjax.LNTuningConfig)) else formula
    assert count.total == BERT_BASE + added


def test_linear_probe_and_full_fine_tuning_with_a_two_label_head():
    model = abstract_bert_base(num_labels=2)
    assert peftjax.count_params(model).total == BERT_BASE + HEAD
    probe = peftjax.count_params(applied(model, peftjax.LinearProbeConfig()))
    assert probe == (HEAD, BERT_BASE + HEAD) == (1_538, 109_483_778)
    full = peftjax.count_params(applied(model, peftjax.FullFineTuningConfig()))
    assert full == (BERT_BASE + HEAD, BERT_BASE + HEAD)
