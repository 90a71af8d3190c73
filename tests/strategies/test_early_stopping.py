"""Early stopping and reduce-on-plateau through the runner (a one-layer bert-tiny on the
synthetic task, evaluated every step): the run stops after ``patience`` evaluations without
a better eval loss and ends with the best state, bit for bit; the learning rate is cut on
the plateau; the run as a kill after a checkpoint leaves it, resumed, stops at the same step
with the same state, counters and plateau state. Then ``peftjax fisher`` on the trained adapter, and
its file loaded by EWC onto the same model and refused by another."""

from __future__ import annotations

import json
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from safetensors.numpy import load_file

import peftjax
from peftjax.cli import _load, main
from peftjax.models import from_config
from peftjax.strategies.ewc import load_fisher
from peftjax.train.runner import RESULT_FILE, build_model, run

CONFIG = {
    "model": {"name": "bert-tiny", "options": {"num_hidden_layers": 1}},
    "methods": [{"type": "full"}],
    "strategies": [{"type": "early_stopping", "patience": 2, "monitor": "loss"},
                   {"type": "reduce_on_plateau", "patience": 1, "factor": 0.5, "monitor": "loss"}],
    "data": {"source": "synthetic:sentiment", "eval_split": "eval", "max_length": 8, "bucket_lengths": [8],
             "max_train_rows": 64, "max_eval_rows": 32},
    "optim": {"learning_rate": 3e-2},
    "schedule": {"decay": "constant"},
    "train": {"batch_size": 16, "steps": 30, "eval_every": 1, "checkpoint_every": 1, "keep": 40, "log_every": 1},
}


def train(folder: pathlib.Path, *, resume: bool = False) -> dict:
    folder.mkdir(exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(folder / "out")}))
    return run(_load(str(path), []), resume=resume, progress=False)


def checkpoint(out: pathlib.Path, step: int) -> tuple[dict, dict]:
    manager = ocp.CheckpointManager((out / "checkpoints").absolute())
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                             meta=ocp.args.JsonRestore()))
    manager.close()
    return restored["state"], restored["meta"]


def leaves(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def adapter(out: pathlib.Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    folder = tmp_path_factory.mktemp("whole")
    return folder, train(folder)


def test_the_run_stops_after_patience_evaluations_and_ends_with_the_best_state(whole):
    folder, result = whole
    out = folder / "out"
    memory = checkpoint(out, result["steps"])[1]["strategies"]["early_stopping"]
    best_step = memory["best_step"]
    assert result["steps"] < 30 and result["stopped"].startswith("early_stopping: eval loss did not improve in 2")
    assert memory["bad_evals"] == 2 and result["steps"] == best_step + 2
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["eval_loss"] for r in evals if "eval_loss" in r}
    assert memory["best"] == min(losses.values()) == losses[best_step]
    best_state, _ = checkpoint(out, best_step)
    best = {".".join(str(getattr(k, "key", k)) for k in p[:-1]): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(best_state["trainable"])[0]}
    final = adapter(out)
    assert best.keys() == final.keys()
    assert all(np.array_equal(best[k], final[k]) for k in best), "the final state is the best one, bitwise"
    assert result["metrics"]["eval_loss"] == pytest.approx(memory["best"], rel=1e-6)
    scales = [r["reduce_on_plateau_scale"] for r in evals if "reduce_on_plateau_scale" in r]
    assert len(scales) == result["steps"] and scales[-1] < 1.0, "the rate was cut on the plateau"


def killed_after(source: pathlib.Path, step: int, target: pathlib.Path) -> None:
    """``source``'s run as a process killed right after step ``step``'s checkpoint leaves it:
    the later checkpoints, metrics lines and the final adapter and result not yet written."""
    shutil.copytree(source, target)
    for folder in (target / "checkpoints").iterdir():
        if folder.name.isdigit() and int(folder.name) > step:
            shutil.rmtree(folder)
    shutil.rmtree(target / "adapter")
    (target / RESULT_FILE).unlink()
    lines = (target / "metrics.jsonl").read_text().splitlines()
    (target / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))


def test_counters_survive_a_kill_and_resume(whole, tmp_path):
    reference_folder, reference = whole
    # Killed after the first evaluation without improvement: its counters are in that checkpoint.
    killed_after(reference_folder / "out", reference["steps"] - 1, tmp_path / "out")
    resumed = train(tmp_path, resume=True)
    assert resumed["steps"] == reference["steps"] and resumed["stopped"] == reference["stopped"]
    expected, got = adapter(reference_folder / "out"), adapter(tmp_path / "out")
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    state, meta = checkpoint(tmp_path / "out", resumed["steps"])
    reference_state, reference_meta = checkpoint(reference_folder / "out", reference["steps"])
    assert meta["strategies"] == reference_meta["strategies"]
    plateau = {k: v for k, v in leaves(state["opt_state"]).items() if "scale" in k or "plateau_count" in k}
    assert plateau and plateau.keys() <= leaves(reference_state["opt_state"]).keys()
    assert all(np.array_equal(v, leaves(reference_state["opt_state"])[k]) for k, v in plateau.items())


def test_fisher_command_writes_a_file_ewc_loads_onto_its_model_only(whole, capsys):
    folder, _ = whole
    fisher = folder / "fisher.safetensors"
    assert main(["fisher", str(folder / "config.yaml"), f"output_dir={folder / 'out'}", "train.eval_batch_size=4",
                 "--checkpoint", str(folder / "out" / "adapter"), "--out", str(fisher), "--examples", "6"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["examples"] == 6 and printed["labels"] == "model"
    model = build_model(_load(str(folder / "config.yaml"), []), 2)
    peftjax.apply(model, peftjax.FullFineTuningConfig())
    values, anchors = load_fisher(fisher, model)
    assert not [k for k in values if k.startswith("classifier.")], "the head is task A's alone"
    assert all(np.all(v >= 0) for v in values.values()) and any(np.any(v > 0) for v in values.values())
    trained = adapter(folder / "out")
    assert all(np.array_equal(anchors[k], trained[k]) for k in anchors), "anchors are the trained weights"
    other = from_config("bert-tiny", num_labels=2)  # two layers: it has every path of the file, and more
    peftjax.apply(other, peftjax.FullFineTuningConfig())
    with pytest.raises(peftjax.PeftError, match=r"was computed for a BertForSequenceClassification that is not this "
                       r"BertForSequenceClassification: .* config differences \['num_hidden_layers: 1 vs 2'\]"):
        load_fisher(fisher, other)
