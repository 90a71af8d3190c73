"""Resumable checkpoints with orbax: the state that changes, never the frozen base.

A checkpoint holds the trainable parameters, the optimizer state, the
non-parameter state (RNG counters), the step, and the data loader's position,
so a resumed run takes exactly the steps the interrupted one would have.
Orbax writes each checkpoint to a temporary folder and renames it when
complete, and keeps the newest ``keep``; an interrupted save leaves no folder
that looks complete.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

from peftjax.train.state import TrainState


def _saved_part(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state, "rest": state.rest}


class Checkpointer:
    """Periodic, atomic, keep-N checkpoints of a run in ``folder``."""

    def __init__(self, folder: str | pathlib.Path, *, keep: int):
        self.folder = pathlib.Path(folder).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.folder, options=options)

    def save(self, state: TrainState, loader_position: dict[str, int], extra: dict[str, Any]) -> None:
        step = int(state.step)
        meta = {"loader": loader_position, **extra}
        args = ocp.args.Composite(state=ocp.args.StandardSave(_saved_part(state)), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)
        self._manager.wait_until_finished()

    @staticmethod
    def saved_steps(folder: str | pathlib.Path) -> list[int]:
        """The steps of the complete checkpoints in ``folder`` (none if it does not exist)."""
        return sorted(ocp.utils.checkpoint_steps(pathlib.Path(folder).absolute()))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
        """``state`` (freshly built from the same config) with the latest
        checkpoint's arrays, and the checkpoint's metadata."""
        step = self._manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.folder} to resume from")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved_part(state))
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
        restored = self._manager.restore(step, args=args)
        saved = restored["state"]
        state = state.replace(
            step=saved["step"], trainable=saved["trainable"], opt_state=saved["opt_state"], rest=saved["rest"]
        )
        return state, dict(restored["meta"])

    def close(self) -> None:
        self._manager.close()
