"""docs/config.md cannot drift: its schema tables equal the config dataclasses, every YAML
block in it loads, and its three complete examples (local csv files, a causal LM on .txt
files, an image folder) work on small files of the layout they describe: the causal LM trains
for two steps through the runner, the other two build everything a run builds and trace
their train step."""

from __future__ import annotations

import csv
import math
import pathlib
import re

import jax
import numpy as np
import pytest
import yaml
from PIL import Image

import peftjax
from peftjax.config import load_config
from peftjax.methods.base import config_from_dict
from peftjax.models import PRESETS
from peftjax.models.names import PACKAGED_CHECKPOINTS
from peftjax.rank_search.config import load_rank_search
from peftjax.strategies import strategy_from_dict
from peftjax.strategies.base import step_loss
from peftjax.train import runner
from peftjax.train.session import MAIN
from peftjax.train.runner import run
from schema_tables import documented_tables, expected_rows, schema_classes

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "config.md"
TEXT = DOC.read_text()
BLOCKS = re.findall(r"```yaml\n(.*?)```", TEXT, re.S)
# What a partial example (one section) is merged into to make a whole config.
BASE = {
    "name": "docs", "model": {"name": "bert-tiny"}, "methods": [{"type": "lora", "targets": ["query", "value"]}],
    "data": {"source": "synthetic:sentiment", "eval_split": "eval", "test_split": "test"}, "train": {"steps": 1},
}  # fmt: skip
FAST = ["train.steps=2", "train.batch_size=4", "train.eval_batch_size=4", "train.eval_every=0"]


def test_every_table_equals_its_dataclass():
    tables = documented_tables(TEXT)
    classes = schema_classes()
    assert sorted(tables) == sorted(classes), "a section, method type or strategy without its table (or a stale one)"
    for name, cls in classes.items():
        assert tables[name] == expected_rows(name, cls), f"the table of {name} differs from {cls.__name__}"


def test_the_names_table_lists_every_preset_packaged_checkpoint_and_method():
    names = TEXT.split("## The file")[0]
    shipped = [n for n, cls in peftjax.registered_methods().items() if cls.__module__.startswith("peftjax.")]
    missing = [n for n in [*PRESETS, "minilm", *shipped] if f"`{n}`" not in names]
    assert not missing and "minilm" in PACKAGED_CHECKPOINTS


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_every_yaml_block_loads(index, tmp_path):
    tree = yaml.safe_load(BLOCKS[index])
    whole = "model" in tree and "data" in tree
    if not whole:
        tree = {**BASE, **tree}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    if "sweep" in tree:
        config, sweep = load_rank_search(path)
        assert sweep.ranks == tuple(tree["sweep"]["ranks"])
    else:
        config = load_config(path, method_validator=config_from_dict, strategy_validator=strategy_from_dict)
    assert config.name == tree["name"]


def _write_example_data(root: pathlib.Path) -> None:
    reviews = root / "data" / "reviews"
    reviews.mkdir(parents=True)
    for split, count in (("train", 16), ("dev", 8)):
        with (reviews / f"{split}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["review", "stars"])
            for i in range(count):
                writer.writerow([f"a {'wonderful' if i % 2 else 'dreadful'} film, number {i}", "good" if i % 2 else "bad"])
    notes = root / "data" / "notes"
    notes.mkdir(parents=True)
    lines = [f"note {i}: the meeting moved to room {i % 7}, bring the {('red', 'blue')[i % 2]} folder." for i in range(80)]
    (notes / "train.txt").write_text("\n".join(lines) + "\n\n")
    (notes / "valid.txt").write_text("\n".join(lines[:30]))
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label, shape in enumerate(("circle", "square")):
            folder = root / "data" / "shapes" / split / shape
            folder.mkdir(parents=True)
            for i in range(4):  # 48x48, not the model's 32x32: the loader resizes to the model's size
                pixels = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8) // (label + 1)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def example_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("examples")
    _write_example_data(root)
    return root


def _example(name: str, example_dir: pathlib.Path, monkeypatch):
    block = next(b for b in BLOCKS if f"name: {name}\n" in b)
    monkeypatch.chdir(example_dir)
    path = example_dir / f"{name}.yaml"
    path.write_text(block)
    return load_config(path, FAST, method_validator=config_from_dict, strategy_validator=strategy_from_dict)


def test_the_causal_lm_example_trains(example_dir, monkeypatch):
    """Two steps through the runner: .txt files, the default text column, perplexity. (Also the
    suite's causal LM through the runner.)"""
    result = run(_example("notes_llama_tiny", example_dir, monkeypatch), progress=False)
    metrics = result["metrics"]
    assert result["steps"] == 2 and 0 < metrics["eval_loss"] < 10 and "eval_accuracy" in metrics
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]))  # exp(mean token loss)
    assert result["config"]["data"]["text_columns"] == ["text"]  # the default for causal LM


@pytest.mark.parametrize("name, rows, image_size", [("reviews_bert_tiny", (16, 8), None), ("shapes_vit_tiny", (8, 8), 32)])
def test_the_classification_examples_build_their_train_step(name, rows, image_size, example_dir, monkeypatch):
    """Everything a run does before its first step, on the files of the layout described (csv
    columns named in the config, string labels; an image folder by class), and the train
    step traced on their first batch (compiling it is the runner tests' business)."""
    config = runner.with_model_defaults(_example(name, example_dir, monkeypatch))
    prep = runner.prepare(config)
    assert prep.task.num_labels == 2 and (len(prep.task["train"]), len(prep.task["eval"])) == rows
    assert config.data.image_size == image_size  # vit-tiny's 32, not the files' 48
    state = peftjax.TrainState.create(prep.model, prep.optimizer)
    step = peftjax.make_train_step(step_loss(config.data.task, prep.strategies))
    _, metrics = jax.eval_shape(step, state, {MAIN: next(iter(prep.train_loader))})
    assert metrics["loss"].shape == () and np.dtype(metrics["loss"].dtype) == np.float32
