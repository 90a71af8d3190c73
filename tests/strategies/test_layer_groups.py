"""Layer groups of every model family, checked against the checkpoint's own module names:
each group holds exactly the tensors that a transformers checkpoint keeps under one module
(``bert.encoder.layer.1``, ``model.norm``, ``classifier``), in input-to-output order; and
strategies' group indices, from the bottom or the top, with the error for one out of range."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402

import peftjax  # noqa: E402
from peftjax import models  # noqa: E402
from peftjax.core.layer_groups import select_groups  # noqa: E402
from peftjax.models import registry  # noqa: E402
from peftjax.models.loading import checkpoint_names  # noqa: E402

CASES = {
    # preset, task: [(group name, kind, module names in the checkpoint file)]
    ("bert-tiny", "classification"): [
        ("embeddings", "embeddings", ["bert.embeddings"]),
        *[(f"layer.{i}", "block", [f"bert.encoder.layer.{i}"]) for i in range(2)],
        ("final", "final", ["bert.pooler"]),
        ("head", "head", ["classifier"]),
    ],
    ("roberta-tiny", "classification"): [  # no pooler: RoBERTa's head pools itself
        ("embeddings", "embeddings", ["roberta.embeddings"]),
        *[(f"layer.{i}", "block", [f"roberta.encoder.layer.{i}"]) for i in range(2)],
        ("head", "head", ["classifier"]),
    ],
    ("llama-tiny", "classification"): [
        ("embeddings", "embeddings", ["model.embed_tokens"]),
        *[(f"layer.{i}", "block", [f"model.layers.{i}"]) for i in range(2)],
        ("final", "final", ["model.norm"]),
        ("head", "head", ["score"]),
    ],
    ("llama-tiny", "causal_lm"): [  # lm_head is the embedding table (tied): no head group
        ("embeddings", "embeddings", ["model.embed_tokens"]),
        *[(f"layer.{i}", "block", [f"model.layers.{i}"]) for i in range(2)],
        ("final", "final", ["model.norm"]),
    ],
    ("vit-tiny", "image_classification"): [
        ("embeddings", "embeddings", ["vit.embeddings"]),
        *[(f"layer.{i}", "block", [f"vit.encoder.layer.{i}"]) for i in range(2)],
        ("final", "final", ["vit.layernorm"]),
        ("head", "head", ["classifier"]),
    ],
    ("resnet-tiny", "image_classification"): [  # the model declares its own groups
        ("stem", "embeddings", ["resnet.embedder"]),
        *[(f"stage{i + 1}", "block", [f"resnet.encoder.stages.{i}"]) for i in range(4)],
        ("head", "head", ["classifier"]),
    ],
}


def loaded_pair(preset: str, task: str, folder):
    """The checkpoint file's keys for a preset (written by transformers) and our model loaded from it."""
    config = models.PRESETS[preset]
    hf = config.to_hf_dict()
    hf.update(id2label={"0": "A", "1": "B"})
    hf.pop("label2id", None)
    model_cls = registry.model_class(config.model_type, task)
    architecture = registry.family(config.model_type).hf_prefix + model_cls.hf_architecture_suffix
    torch.manual_seed(0)
    reference = getattr(transformers, architecture)(transformers.AutoConfig.for_model(**hf))
    reference.save_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), framework="np") as handle:
        keys = set(handle.keys())
    return keys, models.from_pretrained(folder, task=task)


@pytest.mark.parametrize(("preset", "task"), list(CASES))
def test_groups_hold_exactly_the_checkpoints_modules(preset, task, tmp_path):
    keys, model = loaded_pair(preset, task, tmp_path)  # parameters and running statistics; a tied table once
    expected = CASES[(preset, task)]
    groups = peftjax.layer_groups(model)
    assert [(g.name, g.kind) for g in groups] == [(name, kind) for name, kind, _ in expected]
    names, _ = checkpoint_names(model)
    hf_key = {".".join(map(str, path)): key for path, (key, _) in names.items()}
    covered = set()
    for group, (_, _, hf_modules) in zip(groups, expected):
        theirs = {k for k in keys if any(k.startswith(m + ".") for m in hf_modules)}
        ours = {key for path, key in hf_key.items() if any(path.startswith(p + ".") for p in group.paths)}
        assert theirs and ours == theirs, group.name
        covered |= ours
    assert covered == keys, "a tensor of the checkpoint is in no group"


def test_groups_by_index_from_either_end_and_by_name(tmp_path):
    _, model = loaded_pair("bert-tiny", "classification", tmp_path)
    pick = lambda *selectors: [g.name for g in select_groups(model, selectors, key="k")]  # noqa: E731
    assert pick(0, -1) == ["embeddings", "head"]
    assert pick(-2, "layer.0", 2) == ["layer.0", "layer.1", "final"]
    with pytest.raises(peftjax.PeftError, match=r"partial_freeze.groups: group index 5 is out of range; "
                       r"BertForSequenceClassification has 5 layer groups .* use 0..4 from the bottom or -1..-5"):
        select_groups(model, [5], key="partial_freeze.groups")
    with pytest.raises(peftjax.PeftError, match="has no layer group 'pooler'; its groups are"):
        select_groups(model, ["pooler"], key="k")
