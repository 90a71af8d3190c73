"""Every extension point of the runner, used at once by one strategy written here
through the public API, in runs of a tiny BERT on the synthetic task.

``ProbeStrategy`` attaches a module of its own (a domain probe and a counter the
step carries), asks for a second data stream, adds a loss term on both streams'
pooled features, keeps LoRA frozen until step 3 (a two-stage label schedule),
gives its probe a learning-rate multiplier, wraps the optimizer in
``optax.contrib.reduce_on_plateau`` (which needs the loss as ``value``), and
records every boundary hook in the memory checkpoints keep. A run that a hook
interrupts after step 5, resumed from its step-3 checkpoint, ends bitwise where
the whole run ends.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import yaml
from flax import nnx
from safetensors.numpy import load_file

import peftjax
from peftjax import FROZEN
from peftjax.cli import _load
from peftjax.config import DataConfig
from peftjax.train.runner import run

TRACES: list[int] = []  # one entry per compilation of the step's loss
CRASH_AT: list[int] = []  # a step at which on_step raises, when set


class Crash(RuntimeError):
    pass


class Seen(nnx.Variable):
    """How many steps the loss term has run in (state the step carries)."""


class Probe(nnx.Module):
    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.domain = nnx.Linear(hidden, 1, rngs=rngs)
        self.seen = Seen(jnp.zeros((), jnp.int32))


@peftjax.register_strategy("probe_test")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ProbeStrategy(peftjax.Strategy):
    unfreeze_at: int = 3
    weight: float = 0.1

    def setup(self, model, *, rngs):
        return Probe(model.config.hidden_size, rngs=rngs)

    def streams(self):
        return {"target": DataConfig(source="synthetic:sentiment", max_length=16, bucket_lengths=(16,),
                                     max_train_rows=128, row_selection="sample", row_seed=1)}

    def stage_starts(self, info):
        return (self.unfreeze_at,)

    def label_rules(self, model, stage):
        return [(r"training_strategies\.probe_test\..*", "probe")] + ([(r".*\.lora_[ab]", FROZEN)] if stage == 0 else [])

    def lr_multipliers(self, stage):
        return {"probe": 2.0}

    def optimizer(self, tx, info):
        return optax.chain(tx, optax.contrib.reduce_on_plateau(patience=100))

    def loss(self, ctx):
        TRACES.append(1)
        probe = ctx.module(self)
        probe.seen[...] += 1
        source, target = ctx.features(), ctx.features("target")
        logits = probe.domain(jnp.concatenate([source, target]))[:, 0]
        domains = jnp.concatenate([jnp.zeros(len(source)), jnp.ones(len(target))])
        term = self.weight * optax.sigmoid_binary_cross_entropy(logits, domains).mean()
        return term, {"gap": jnp.sum((source.mean(0) - target.mean(0)) ** 2)}

    def on_start(self, run):
        memory = run.memory[self.strategy]
        memory["starts"] = memory.get("starts", 0) + 1

    def on_step(self, run, metrics):
        if CRASH_AT and run.step == CRASH_AT[0]:
            raise Crash(run.step)
        run.memory[self.strategy].setdefault("steps", []).append(run.step)

    def on_epoch(self, run, epoch):
        run.memory[self.strategy].setdefault("epochs", []).append(epoch)

    def on_eval(self, run, scores):
        run.memory[self.strategy].setdefault("evals", []).append([run.step, scores["accuracy"]])


CONFIG = {
    "model": {"name": "bert-tiny"},
    "methods": [{"type": "lora", "targets": ["query", "value"], "rank": 2, "also_train": [r"classifier\..*"]}],
    "strategies": [{"type": "probe_test"}],
    "data": {"source": "synthetic:sentiment", "eval_split": "eval", "max_length": 16, "bucket_lengths": [16],
             "max_train_rows": 64, "max_eval_rows": 32},
    "optim": {"learning_rate": 1e-2},
    "train": {"batch_size": 16, "steps": 6, "eval_every": 3, "checkpoint_every": 3, "keep": 2, "log_every": 1},
}


def train(folder: pathlib.Path, *, resume: bool = False) -> pathlib.Path:
    folder.mkdir(exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "output_dir": str(folder / "out")}))
    run(_load(str(path), []), resume=resume, progress=False)
    return folder / "out"


def checkpoint(out: pathlib.Path, step: int) -> tuple[dict, dict]:
    manager = ocp.CheckpointManager((out / "checkpoints").absolute())
    args = ocp.args.Composite(state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore())
    restored = manager.restore(step, args=args)
    manager.close()
    return restored["state"], restored["meta"]


def leaves_by_path(tree) -> dict[str, object]:
    return {jax.tree_util.keystr(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def leaf_paths(tree) -> list[str]:
    return list(leaves_by_path(tree))


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    TRACES.clear()
    out = train(tmp_path_factory.mktemp("whole"))
    return out, len(TRACES)


def test_every_hook_ran_and_its_memory_is_in_the_checkpoint(whole):
    out, traces = whole
    assert traces == 2, "the step compiled once per stage"
    state, meta = checkpoint(out, 6)
    memory = meta["strategies"]["probe_test"]
    assert memory["starts"] == 1 and memory["steps"] == [1, 2, 3, 4, 5, 6]
    assert memory["epochs"] == [0]  # 64 rows in batches of 16: epoch 0 ends after step 4
    assert [step for step, _ in memory["evals"]] == [3, 6]
    assert meta["streams"] == {"target": {"epoch": 0, "step_in_epoch": 6}} and meta["loader"]["epoch"] == 1
    assert int(np.asarray(state["rest"]["training_strategies"]["probe_test"]["seen"]["value"])) == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "probe_test_gap" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6] and all(r["probe_test_loss"] > 0 for r in steps)
    plateau = [leaf for path, leaf in leaves_by_path(state["opt_state"]).items() if "best_value" in path]
    assert len(plateau) == 1 and np.isfinite(float(np.asarray(plateau[0]))), "the loss reached it as value="


def test_lora_trains_only_from_its_stage_and_gets_its_optimizer_state_then(whole):
    out, _ = whole
    before, _ = checkpoint(out, 3)
    after, _ = checkpoint(out, 6)
    assert not [p for p in leaf_paths(before["trainable"]) + leaf_paths(before["opt_state"]) if "lora" in p]
    assert [p for p in leaf_paths(after["trainable"]) if "lora" in p]
    assert [p for p in leaf_paths(after["opt_state"]) if "lora" in p]
    assert "probe_test" in before["trainable"]["training_strategies"], "the probe trains from the start"
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert not [k for k in adapter if "training_strategies" in k], "adapter files hold the methods' state alone"
    assert all(bool(np.any(v != 0)) for k, v in adapter.items() if k.endswith("lora_b"))


def test_an_interrupted_run_resumes_through_stages_streams_and_memory_bitwise(whole, tmp_path):
    reference, _ = whole
    CRASH_AT[:] = [5]
    try:
        with pytest.raises(Crash):
            train(tmp_path)
    finally:
        CRASH_AT.clear()
    assert sorted(int(p.name) for p in (tmp_path / "out" / "checkpoints").iterdir() if p.name.isdigit()) == [3]
    out = train(tmp_path, resume=True)
    expected = load_file(str(reference / "adapter" / "adapter_model.safetensors"))
    got = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert expected.keys() == got.keys() and all(np.array_equal(expected[k], got[k]) for k in expected)
    _, meta = checkpoint(out, 6)
    _, reference_meta = checkpoint(reference, 6)
    memory, reference_memory = meta["strategies"]["probe_test"], reference_meta["strategies"]["probe_test"]
    assert memory.pop("starts") == 2 and reference_memory.pop("starts") == 1
    assert memory == reference_memory and meta["streams"] == reference_meta["streams"]
