"""Bad rank-search input: each a SweepError (a ConfigError) naming the key and the fix."""

from __future__ import annotations

import json
import pathlib

import pytest
import yaml

from peftjax.config import ConfigError
from peftjax.models import from_config
from peftjax.rank_search import SweepConfig, SweepError, load_rank_search
from peftjax.rank_search.config import resolve_target_sets
from peftjax.rank_search.sweep import validate_against_model

TINY = {
    "name": "tiny-rank-search",
    "model": {"name": "bert-tiny"},
    "methods": [{"type": "lora", "targets": ["query", "value"], "rank": 4, "alpha": 8,
                 "also_train": [r"classifier\..*"]}],
    "data": {"source": "synthetic:sentiment", "task": "classification", "test_split": "test",
             "max_length": 16, "bucket_lengths": [16], "max_train_rows": 64, "max_test_rows": 32},
    "optim": {"name": "adamw", "learning_rate": 3e-3},
    "train": {"batch_size": 16, "steps": 2, "log_every": 0},
    "sweep": {"ranks": [1, 2], "target_sets": ["qv"], "seeds": [0], "metric": "test_accuracy"},
}


def write(folder: pathlib.Path, **changes) -> pathlib.Path:
    tree = json.loads(json.dumps(TINY))
    for section, fields in changes.items():
        if isinstance(fields, dict) and isinstance(tree.get(section), dict):
            tree[section].update(fields)
        elif fields is None:
            tree.pop(section, None)
        else:
            tree[section] = fields
    tree["output_dir"] = str(folder / "out")
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_a_valid_file_loads_with_overrides_on_both_sections(tmp_path):
    config, sweep = load_rank_search(write(tmp_path), ["sweep.ranks=[8, 2]", "train.steps=3"])
    assert sweep.ranks == (2, 8) and config.train.steps == 3 and sweep.mode == "batched"
    assert [t.name for t in sweep.target_sets] == ["qv"]
    assert SweepConfig.from_dict(sweep.to_dict()) == sweep


def test_empty_rank_list(tmp_path):
    with pytest.raises(SweepError, match=r"sweep\.ranks: is empty: list at least one LoRA rank") as caught:
        load_rank_search(write(tmp_path, sweep={"ranks": []}))
    assert isinstance(caught.value, ConfigError) and caught.value.key == "sweep.ranks"
    with pytest.raises(SweepError, match=r"sweep\.ranks: ranks must be positive integers, got \[0\]"):
        load_rank_search(write(tmp_path), ["sweep.ranks=[0, 4]"])


def test_training_strategies_are_refused(tmp_path):
    with pytest.raises(SweepError, match=r"strategies: rank search trains LoRA at many ranks on its own"):
        load_rank_search(write(tmp_path, strategies=[{"type": "layer_freeze", "layers": 1}]))


def test_rank_above_a_kernels_min_d_k_names_the_module_and_its_shape(tmp_path):
    # bert-tiny: hidden 32, so query/value kernels are (32, 32); 64 cannot be a rank of their update.
    config, sweep = load_rank_search(write(tmp_path, sweep={"ranks": [4, 64]}))
    with pytest.raises(SweepError) as caught:
        validate_against_model(config, sweep)
    message = str(caught.value)
    assert caught.value.key == "sweep.ranks"
    assert "rank(s) [64] exceed min(d, k) = 32" in message
    assert "bert.encoder.layer.0.attention.self.query" in message and "kernel shape (32, 32)" in message
    # The classifier (32 -> 2) as an explicit target caps the rank at 2.
    config, sweep = load_rank_search(write(tmp_path, sweep={"ranks": [1, 4], "target_sets": [["classifier"]]}))
    with pytest.raises(SweepError, match=r"rank\(s\) \[4\] exceed min\(d, k\) = 2 of classifier \(kernel shape "
                                         r"\(32, 2\)"):
        validate_against_model(config, sweep)


def test_unknown_target_set_lists_known_ones_with_did_you_mean(tmp_path):
    _, sweep = load_rank_search(write(tmp_path, sweep={"target_sets": ["qkov"]}))
    with pytest.raises(SweepError) as caught:
        resolve_target_sets(sweep, from_config("bert-tiny", num_labels=2))
    message = str(caught.value)
    assert caught.value.key == "sweep.target_sets.0"
    assert "unknown target set 'qkov' for a bert model" in message
    assert "'qkvo'" in message.split("Known sets")[0]  # the did-you-mean
    assert "'all-linear'" in message and "'mlp'" in message and "'qv'" in message


def test_named_sets_map_per_family_and_explicit_lists_pass_through(tmp_path):
    sweep = SweepConfig.from_dict({"ranks": [1], "target_sets": ["qv", "mlp", ["query", "key"], {"mine": "all-linear"}]})
    bert = resolve_target_sets(sweep, from_config("bert-tiny", num_labels=2))
    llama = resolve_target_sets(sweep, from_config("llama-tiny"))
    assert [t.name for t in bert] == ["qv", "mlp", "query+key", "mine"]
    assert bert[0].targets == ("query", "value") and llama[0].targets == ("q_proj", "v_proj")
    assert llama[1].targets == ("gate_proj", "up_proj", "down_proj")
    assert bert[2].targets == ("query", "key") and bert[3].targets == "all-linear"


def test_bert_mlp_set_leaves_the_attention_output_alone():
    from peftjax.methods.lora import LoraConfig
    from peftjax.rank_search.config import adapted_modules

    model = from_config("bert-tiny", num_labels=2)
    mlp = resolve_target_sets(SweepConfig.from_dict({"ranks": [1], "target_sets": ["mlp"]}), model)[0]
    paths = [m.path for m in adapted_modules(model, LoraConfig(targets=["query"]), mlp, 0)]
    assert paths and all(p.endswith(("intermediate.dense", "layer.0.output.dense", "layer.1.output.dense"))
                         for p in paths)
    assert not any("attention" in p for p in paths) and len(paths) == 4


def test_metric_the_task_does_not_produce(tmp_path):
    with pytest.raises(SweepError) as caught:
        load_rank_search(write(tmp_path, sweep={"metric": "eval_accuracy"}))
    assert caught.value.key == "sweep.metric"
    assert "'eval_accuracy' is not produced by this task; it produces ['test_accuracy', 'test_loss']" in str(
        caught.value)
    with pytest.raises(SweepError, match=r"sweep\.metric: 'test_acuracy' .* Did you mean 'test_accuracy'\?"):
        load_rank_search(write(tmp_path, sweep={"metric": "test_acuracy"}))
    # Tuning rates picks on select_metric: it must exist too.
    with pytest.raises(SweepError, match=r"sweep\.select_metric: 'eval_accuracy' is not produced"):
        load_rank_search(write(tmp_path, sweep={"learning_rates": [1e-3, 3e-3]}))


def test_other_bad_sweep_sections(tmp_path):
    with pytest.raises(SweepError, match=r"sweep\.rank: unknown key; did you mean 'sweep\.ranks'\?"):
        load_rank_search(write(tmp_path, sweep={"rank": [1]}))
    with pytest.raises(SweepError, match=r"sweep: a rank-search config needs a 'sweep:' section"):
        load_rank_search(write(tmp_path, sweep=None))
    with pytest.raises(SweepError, match=r"sweep\.learning_rates: a per-rank mapping needs exactly the swept ranks "
                                         r"\[1, 2\]: missing \[2\]"):
        load_rank_search(write(tmp_path, sweep={"learning_rates": {1: 1e-3}}))
    with pytest.raises(SweepError, match=r"sweep\.mode: 'parallel' is not a mode"):
        load_rank_search(write(tmp_path, sweep={"mode": "parallel"}))
    with pytest.raises(SweepError, match=r"methods: a rank search varies one LoRA method; the config's methods "
                                         r"are \['ia3'\]"):
        load_rank_search(write(tmp_path, methods=[{"type": "ia3", "targets": ["value"]}]))
    with pytest.raises(ConfigError, match=r"train\.batch_sze"):  # the experiment part is checked as for train
        load_rank_search(write(tmp_path, train={"batch_sze": 4}))
