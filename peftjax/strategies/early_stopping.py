"""Early stopping: end the run after ``patience`` evaluations without
improvement, and go back to the best evaluated state.

Fine-tuning a large model on a small set overfits within a few epochs, and
the textbook guard is to watch the eval split: stop once ``monitor`` has
not improved by more than ``min_delta`` in ``patience`` evaluations in a row
(Keras' ``EarlyStopping``, Prechelt 1998). With ``restore_best`` the
trained values at the best evaluation come back before the run ends, so the
final adapter, the last checkpoint and the reported test scores are the
best state's, bit for bit.

The counters (best value and step, evaluations without improvement) live
in ``run.memory``, which every checkpoint keeps, so a resumed run stops
where the whole run would. The best state is written to
``OUTPUT/early_stopping/best.safetensors`` (atomically) at each improvement:
every parameter that trains now or that the methods train (a group that
gradual unfreezing has not reached yet is saved at its pretrained value),
and the running statistics that train.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from peftjax.core.adapter_io import adapter_state
from peftjax.core.paths import dotted
from peftjax.errors import PeftError
from peftjax.schema import require
from peftjax.strategies.base import Strategy, register_strategy
from peftjax.train.session import Run


def _by_path(tree) -> dict[str, np.ndarray]:
    """``{dotted variable path: host array}`` of a state tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {dotted(path[:-1]): np.asarray(jax.device_get(leaf)) for path, leaf in flat}


def _replaced(tree, saved: Mapping[str, np.ndarray]):
    """``tree`` with every leaf ``saved`` holds replaced, on the leaf's device and sharding."""

    def put(path, leaf):
        name = dotted(path[:-1])
        return jax.device_put(jnp.asarray(saved[name], leaf.dtype), leaf.sharding) if name in saved else leaf

    return jax.tree_util.tree_map_with_path(put, tree)


@register_strategy("early_stopping")
@dataclasses.dataclass(frozen=True, kw_only=True)
class EarlyStoppingConfig(Strategy):
    """Stop after ``patience`` evaluations without a better eval ``monitor``.

    Attributes:
      patience: evaluations in a row without improvement that end the run.
      monitor: the eval score watched: ``loss`` (lower is better) or
        ``accuracy`` (higher is better).
      min_delta: how much better a score must be to count as an improvement.
      restore_best: go back to the best evaluated state before the run ends.
    """

    patience: int = 3
    monitor: Literal["loss", "accuracy"] = "loss"
    min_delta: float = 0.0
    restore_best: bool = True

    def _validate(self) -> None:
        require(self.patience >= 1, "patience", f"must be at least 1, got {self.patience}")
        require(self.min_delta >= 0, "min_delta", f"must not be negative, got {self.min_delta}")

    def best_file(self, run: Run) -> pathlib.Path:
        return pathlib.Path(run.info.config.output_dir) / "early_stopping" / "best.safetensors"

    def on_start(self, run: Run) -> None:
        config = run.info.config
        if config.data.eval_split is None or config.train.eval_every == 0:
            raise PeftError("early_stopping watches evaluations: set data.eval_split and train.eval_every "
                            f"(now {config.data.eval_split!r} and {config.train.eval_every})")
        run.memory[self.strategy].setdefault("bad_evals", 0)

    def improves(self, value: float, best: float | None) -> bool:
        if best is None:
            return True
        return value < best - self.min_delta if self.monitor == "loss" else value > best + self.min_delta

    def on_eval(self, run: Run, scores: Mapping[str, float]) -> None:
        memory = run.memory[self.strategy]
        value = float(scores[self.monitor])
        if self.improves(value, memory.get("best")):
            memory.update(best=value, best_step=run.step, bad_evals=0)
            if self.restore_best:
                self._save(run)
            return
        memory["bad_evals"] += 1
        if memory["bad_evals"] < self.patience:
            return
        if self.restore_best:
            saved = load_file(str(self.best_file(run)))
            missing = sorted(set(_by_path(run.state.trainable)) - set(saved))
            if missing:
                raise PeftError(f"early_stopping: {self.best_file(run)} lacks trainable parameters {missing[:5]}")
            run.state = run.state.replace(trainable=_replaced(run.state.trainable, saved),
                                          rest=_replaced(run.state.rest, saved))
        run.stop(f"early_stopping: eval {self.monitor} did not improve in {self.patience} evaluations; "
                 f"best {memory['best']:.6g} at step {memory['best_step']}"
                 + (", restored" if self.restore_best else ""))

    def _save(self, run: Run) -> None:
        path = self.best_file(run)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {**adapter_state(run.model()), **_by_path(run.state.trainable)}
        staging = path.with_name(f".{path.name}.tmp")
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(staging))
        os.replace(staging, path)

