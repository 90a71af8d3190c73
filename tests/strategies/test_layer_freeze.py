"""layer_freeze: labels that freeze the embeddings
and the bottom layers (their adapters included), errors that name the key, and a run
from YAML through ``peftjax train`` on SST-2."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import optax
import pytest
import yaml
from safetensors.numpy import load_file

import peftjax
from peftjax import FROZEN
from peftjax.cli import main
from peftjax.config import ConfigError, load_config
from peftjax.data import require_shared_data
from peftjax.models import from_config
from peftjax.strategies import strategy_from_dict
from peftjax.strategies.base import build_strategies, stage_optimizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "experiments" / "configs" / "sst2_minilm_layer_freeze.yaml"


def labels_with(model, *strategies):
    built = build_strategies([s.to_dict() for s in strategies])
    return stage_optimizer(model, optax.sgd(0.1), built, [0] * len(built), info=None).labels


def test_frozen_layers_keep_no_adapter_and_no_optimizer_state():
    model = from_config("bert-tiny", num_labels=2)
    peftjax.apply(model, peftjax.LoraConfig(rank=2, targets=["query", "value"], also_train=(r"classifier\..*",)))
    labels = labels_with(model, strategy_from_dict({"type": "layer_freeze", "layers": 1}))
    trains = sorted(path for path, label in labels.items() if label != FROZEN)
    assert trains == ["bert.encoder.layer.1.attention.self.query.lora_a",
                      "bert.encoder.layer.1.attention.self.query.lora_b",
                      "bert.encoder.layer.1.attention.self.value.lora_a",
                      "bert.encoder.layer.1.attention.self.value.lora_b",
                      "classifier.bias", "classifier.kernel"]
    state = peftjax.TrainState.create(model, stage_optimizer(
        model, optax.adam(1e-3), build_strategies([{"type": "layer_freeze", "layers": 1}]), [0], info=None))
    assert sorted(state.tx.trainable_paths) == trains
    moments = sorted(leaf.size for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim)
    assert sum(moments) == 2 * sum(leaf.size for leaf in jax.tree.leaves(state.trainable))

    full = from_config("bert-tiny", num_labels=2)
    peftjax.apply(full, peftjax.FullFineTuningConfig())
    labels = labels_with(full, strategy_from_dict({"type": "layer_freeze", "layers": 2, "embeddings": False}))
    assert {p for p, label in labels.items() if label == FROZEN} == {p for p in labels if ".layer." in p}
    assert labels["bert.embeddings.word_embeddings.embedding"] != FROZEN


def test_bad_layer_freeze_settings_name_the_key(tmp_path):
    model = from_config("bert-tiny", num_labels=2)
    peftjax.apply(model, peftjax.LoraConfig(rank=2, targets=["query"]))
    with pytest.raises(peftjax.PeftError, match=r"layer_freeze.layers=3: BertForSequenceClassification has 2 layers"):
        labels_with(model, strategy_from_dict({"type": "layer_freeze", "layers": 3}))
    with pytest.raises(peftjax.PeftError, match=r"\['layer_freeze'\] at stages \[0\] no parameter trains"):
        labels_with(model, strategy_from_dict({"type": "layer_freeze", "layers": 2}))
    config = {"model": {"name": "bert-tiny"}, "data": {"source": "synthetic:sentiment"}, "train": {"steps": 1}}
    cases = {
        "layer: 2": "strategies.0.layer: unknown key; did you mean 'strategies.0.layers'?",
        "layers: -1": "strategies.0.layers: must not be negative, got -1",
        "layers: 0, embeddings: false": "strategies.0.layers: freezes nothing with embeddings: false",
        "layers: two": "strategies.0.layers: expected an integer, got 'two'",
    }
    for fields, expected in cases.items():
        path = tmp_path / "exp.yaml"
        path.write_text(yaml.safe_dump(config) + f"strategies:\n  - {{type: layer_freeze, {fields}}}\n")
        with pytest.raises(ConfigError) as caught:
            load_config(path, strategy_validator=strategy_from_dict)
        assert expected in str(caught.value)
    path.write_text(yaml.safe_dump(config) + "strategies:\n  - {type: layer_freez}\n")
    with pytest.raises(ConfigError, match="strategies.0.type: unknown strategy 'layer_freez'; did you mean"):
        load_config(path, strategy_validator=strategy_from_dict)
    path.write_text(yaml.safe_dump(config) + "strategies:\n  - {layers: 2}\n")
    with pytest.raises(ConfigError, match="strategies.0: every strategy needs a string 'type'"):
        load_config(path)


def test_sst2_layer_freeze_from_yaml_through_peftjax_train(tmp_path, capsys):
    """The example config, shortened to 4 steps: the frozen layers' LoRA B stays at its
    zero start, the upper layers' moves, and the counts say so."""
    require_shared_data("sst2/train.tsv")
    out = tmp_path / "out"
    overrides = [f"output_dir={out}", "train.steps=4", "train.epochs=null", "train.batch_size=8",
                 "train.checkpoint_every=0", "train.eval_every=0", "data.max_train_rows=32", "data.max_length=16",
                 "data.bucket_lengths=[16]", "data.group_by_length=false", "data.eval_split=null",
                 "data.test_split=null"]
    assert main(["train", str(EXAMPLE), *overrides, "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    hidden, rank, upper_layers = 384, 8, 3
    lora = upper_layers * 2 * (hidden * rank + rank * hidden)  # query and value of layers 3..5
    assert printed["params"]["trainable"] == lora + hidden * 2 + 2  # and the classifier
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    for layer in range(6):
        b = adapter[f"bert.encoder.layer.{layer}.attention.self.query.lora_b"]
        assert bool(np.any(b != 0)) == (layer >= 3), f"layer {layer}"
    saved = json.loads((out / "result.json").read_text())
    assert saved["config"]["strategies"] == [{"type": "layer_freeze", "layers": 3, "embeddings": True}]
