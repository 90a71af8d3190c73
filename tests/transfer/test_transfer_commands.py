"""The transfer commands end to end: ``few-shot`` and ``negative-transfer`` on a tiny
BERT (runs of two steps, resumable), ``similarity`` and ``advise`` on small local
files with a tiny BERT encoder (random weights, MiniLM's tokenizer: the statistics
only need features that tell the inputs apart; MiniLM's own similarities are the
domain-adaptation experiment's), and their bad input."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import yaml

from peftjax import models
from peftjax.cli import _load, main
from peftjax.data import synthetic_sentiment
from peftjax.transfer import grid

TINY = {
    "model": {"name": "bert-tiny"},
    "data": {"source": "synthetic:sentiment", "max_length": 16, "bucket_lengths": [16], "holdout_rows": 64},
    "optim": {"learning_rate": 1e-2},
    "train": {"batch_size": 4, "steps": 2, "log_every": 1},
}


def write(path, tree) -> str:
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_few_shot_trains_every_arm_k_and_seed_and_resumes(tmp_path, capsys, monkeypatch):
    config = write(tmp_path / "few.yaml", {**TINY, "output_dir": str(tmp_path / "out"), "few_shot": {
        "shots": [2, 4], "seeds": [3],
        # The negative-transfer test below trains the same method on the same shapes: one compilation for both.
        "arms": {"probe": {"methods": [{"type": "linear_probe"}], "optim.learning_rate": 1e-3}}}})
    assert main(["few-shot", config, "--quiet"]) == 0
    payload = json.loads((tmp_path / "out" / "few_shot.json").read_text())
    assert len(payload["rows"]) == 2 and (tmp_path / "out" / "few_shot.png").stat().st_size > 0
    assert [(r["arm"], r["shots"], r["runs"]) for r in payload["summary"]] == [("probe", 2, 1), ("probe", 4, 1)]
    run = tmp_path / "out" / "runs" / "armprobe-shots4-seed3"
    trained = yaml.safe_load((run / "config.yaml").read_text())
    assert trained["data"]["shots_per_class"] == 4 and trained["data"]["row_seed"] == 3
    assert trained["train"]["seed"] == 3 and trained["optim"]["learning_rate"] == 1e-3
    assert not (run / "checkpoints").exists(), "a grid keeps results, not checkpoints"
    assert "| K per class | probe |" in capsys.readouterr().out

    def no_training(*args, **kwargs):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr("peftjax.train.runner.run", no_training)
    assert main(["few-shot", config, "--quiet"]) == 0  # every cell is read back


def test_few_shot_with_k_larger_than_a_class_fails_before_training(tmp_path, capsys):
    config = write(tmp_path / "few.yaml", {**TINY, "output_dir": str(tmp_path / "out"),
                                           "few_shot": {"shots": [4, 5000], "arms": {"probe": {}}}})
    assert main(["few-shot", config]) == 2
    assert "shots_per_class=5000 is more than a class has" in capsys.readouterr().err
    assert not (tmp_path / "out" / "runs").exists()


def test_negative_transfer_compares_pretrained_and_random_weights(tmp_path, capsys):
    saved = models.from_config("bert-tiny", task="sequence-classification", num_labels=2, seed=1)
    models.save_pretrained(saved, tmp_path / "checkpoint")
    config = write(tmp_path / "nt.yaml", {**TINY, "output_dir": str(tmp_path / "out"),
                                          "model": {"name": "tiny", "path": str(tmp_path / "checkpoint")},
                                          "methods": [{"type": "linear_probe"}]})
    assert main(["negative-transfer", config, "--seeds", "0,1", "--quiet"]) == 0
    result = json.loads((tmp_path / "out" / "negative_transfer.json").read_text())
    assert [r["init"] for r in result["rows"]] == ["pretrained", "pretrained", "random", "random"]
    assert np.allclose(result["gain"]["gains"], np.subtract(result["pretrained"], result["random"]))
    assert result["gain"]["verdict"] in capsys.readouterr().out
    randomly = yaml.safe_load((tmp_path / "out" / "runs" / "initrandom-seed1" / "config.yaml").read_text())
    assert randomly["model"]["init"] == "random" and randomly["train"]["seed"] == 1
    assert main(["negative-transfer", write(tmp_path / "preset.yaml", {**TINY, "output_dir": str(tmp_path / "p"),
                                                                        "methods": [{"type": "full"}]})]) == 2
    assert "no pretrained checkpoint" in capsys.readouterr().err


# --------------------------------------------------------------------------
# similarity and advise, on a tiny encoder.
# --------------------------------------------------------------------------

SHOP = ["order {} shipped in {} days", "the invoice lists {} items at {} dollars", "ticket {} was closed after {} calls",
        "warehouse {} holds {} pallets"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory, minilm_path) -> str:
    """A checkpoint folder: bert-tiny with MiniLM's vocabulary and tokenizer files."""
    folder = tmp_path_factory.mktemp("encoder")
    models.save_pretrained(models.from_config("bert-tiny", vocab_size=30522, seed=0), folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(os.path.join(minilm_path, name), folder)
    return str(folder)


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Three small TSV files: two halves of the synthetic sentiment sentences, and
    sentences of another kind (and another label set in a fourth file)."""
    folder = tmp_path_factory.mktemp("domains")
    texts, labels = synthetic_sentiment("train", 320)
    rng = np.random.default_rng(0)
    other = [SHOP[i % 4].format(*rng.integers(1, 999, 2)) for i in range(160)]

    def tsv(name, rows):
        (folder / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
        return write(folder / f"{name}.yaml", {"source": str(folder), "train_split": name, "max_length": 32,
                                                "bucket_lengths": [32]})

    return {"first": tsv("first.tsv", zip(texts[:160], labels[:160])),
            "second": tsv("second.tsv", zip(texts[160:], labels[160:])),
            "other": tsv("other.tsv", zip(other, [i % 2 for i in range(160)])),
            "three": tsv("three.tsv", zip(other, [i % 3 for i in range(160)]))}


def similarity(a, b, encoder, capsys) -> dict:
    assert main(["similarity", a, b, "--examples", "160", "--model", encoder]) == 0
    return json.loads(capsys.readouterr().out)


def test_similarity_is_near_zero_within_a_dataset_and_large_across(datasets, encoder, capsys):
    # 160 rows a side: with 80, a cross-validated domain error is too noisy to call "near 0".
    within = similarity(datasets["first"], datasets["second"], encoder, capsys)
    across = similarity(datasets["first"], datasets["other"], encoder, capsys)
    assert abs(within["proxy_a_distance"]) < 0.5 and across["proxy_a_distance"] > 1.5
    assert across["mmd2"] > 5 * within["mmd2"] > 0


def test_advise_writes_a_ready_experiment_with_its_reasons(datasets, encoder, tmp_path, capsys):
    out = tmp_path / "advised.yaml"
    assert main(["advise", datasets["other"], "--source", datasets["first"], "--unlabelled", "--examples", "160",
                 "--model", encoder, "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["recommendation"].endswith("+ dann") and printed["setting"]["similarity"] == "distant"
    text = out.read_text()
    assert text.startswith("# peftjax advise") and "#  - no target labels and a distant source" in text
    config = _load(str(out), [])
    assert [s["type"] for s in config.strategies] == ["dann"] and config.data.train_split == "first.tsv"
    assert config.strategies[0]["target"]["train_split"] == "other.tsv"
    assert main(["advise", datasets["first"], "--model", encoder, "--out", str(tmp_path / "few.yaml")]) == 0
    assert json.loads(capsys.readouterr().out)["recommendation"] == "lora (query, value)"  # 80 per class: small


def test_advise_refuses_a_source_with_another_label_set(datasets, encoder, tmp_path, capsys):
    assert main(["advise", datasets["three"], "--source", datasets["first"], "--model", encoder,
                 "--out", str(tmp_path / "x.yaml")]) == 2
    assert "domain transfer needs one label set" in capsys.readouterr().err
    assert not (tmp_path / "x.yaml").exists()


def test_grid_cells_name_their_folders_by_key():
    cell = grid.Cell({"arm": "lora", "shots": 4, "seed": 0}, {})
    assert cell.folder == "armlora-shots4-seed0"
