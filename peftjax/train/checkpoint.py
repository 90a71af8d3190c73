"""Resumable checkpoints with orbax: the state that changes, never the frozen base.

A checkpoint holds the trainable parameters, the optimizer state, the
non-parameter state (RNG counters), the step, the data loader's position and
the run's config, so a resumed run takes exactly the steps the interrupted
one would have, and a folder of another config's checkpoints is refused.
Orbax writes each checkpoint to a temporary folder and renames it when
complete, and keeps the newest ``keep``; an interrupted save leaves no folder
that looks complete. A save that fails (a full disk) removes what it wrote and
raises ``CheckpointError``; the earlier checkpoints stay as they were. A
checkpoint that cannot be read back (a disk error, a file cut short) is moved
to ``corrupt_checkpoints/`` beside the folder, with a warning, when an older
one restores; the run goes on from that one.
"""

from __future__ import annotations

import pathlib
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from peftjax.errors import CheckpointError, PeftWarning
from peftjax.train.state import TrainState

CORRUPT_DIR = "corrupt_checkpoints"


def _saved_part(state: TrainState) -> dict[str, Any]:
    return {"step": state.step, "trainable": state.trainable, "opt_state": state.opt_state, "rest": state.rest}


def checkpoint_steps(folder: str | pathlib.Path) -> list[int]:
    """The steps of the complete checkpoints in ``folder``, oldest first (none if it does not exist)."""
    return sorted(ocp.utils.checkpoint_steps(pathlib.Path(folder)))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class Checkpointer:
    """Periodic, atomic, keep-N checkpoints of a run in ``folder``."""

    def __init__(self, folder: str | pathlib.Path, *, keep: int):
        self.folder = pathlib.Path(folder).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.folder, options=options)
        self._failed: int | None = None

    def save(self, state: TrainState, loader_position: dict[str, int], extra: dict[str, Any]) -> pathlib.Path:
        """Writes the checkpoint of ``state`` and returns its folder."""
        step = int(state.step)
        meta = {"loader": loader_position, **extra}
        args = ocp.args.Composite(state=ocp.args.StandardSave(_saved_part(state)), meta=ocp.args.JsonSave(meta))
        try:
            self._manager.save(step, args=args, force=True)
            self._manager.wait_until_finished()
        except Exception as err:  # noqa: BLE001 - orbax wraps I/O errors in several types; all mean "not written"
            self._failed = step
            self._settle()
            self._remove_partial(step)
            previous = [s for s in self.steps() if s != step]
            kept = f"the previous checkpoint, step {previous[-1]}, is intact" if previous else "no earlier checkpoint exists"
            raise CheckpointError(
                f"cannot write checkpoint step {step} to {self.folder} ({_first_line(err)}); {kept}. "
                "Free disk space or make the folder writable, then run the same command with --resume."
            ) from None
        return self.folder / str(step)

    def _settle(self) -> None:
        """Waits for orbax's background writers of a failed save: one still running
        after the error could recreate the temporary folder once it is removed."""
        try:
            self._manager.wait_until_finished()
        except Exception:  # noqa: BLE001, S110 - the save's failure is being reported already
            pass

    def _remove_partial(self, step: int) -> None:
        if jax.process_index() != 0:
            return
        for path in self.folder.iterdir():  # the step's folder and orbax's temporary ones (STEP.orbax-...-tmp-N)
            if path.name == str(step) or path.name.startswith(f"{step}."):
                shutil.rmtree(path, ignore_errors=True)

    def steps(self) -> list[int]:
        return checkpoint_steps(self.folder)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def saved_meta(self, step: int) -> dict[str, Any] | None:
        """The metadata of checkpoint ``step``, or None when it cannot be read."""
        try:
            return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
        except Exception:  # noqa: BLE001 - unreadable for whatever reason: the caller skips it
            return None

    def restore(self, fresh: Callable[[int], TrainState]) -> tuple[TrainState, dict[str, Any]]:
        """The newest checkpoint that reads back, as ``fresh(step)`` (a state built
        from the same config for that step) with the saved arrays, and its
        metadata. Newer ones that do not read back are moved aside with a warning."""
        failures: list[tuple[int, str]] = []
        for step in reversed(self.steps()):
            state = fresh(step)
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _saved_part(state))
            args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore())
            try:
                restored = self._manager.restore(step, args=args)
            except Exception as err:  # noqa: BLE001 - a checkpoint that cannot be read, for any reason, is skipped
                failures.append((step, _first_line(err)))
                continue
            self._set_aside([s for s, _ in failures], step)
            saved = restored["state"]
            state = state.replace(
                step=saved["step"], trainable=saved["trainable"], opt_state=saved["opt_state"], rest=saved["rest"]
            )
            return state, dict(restored["meta"])
        if not failures:
            raise CheckpointError(f"no checkpoint in {self.folder} to resume from")
        listed = "; ".join(f"step {s}: {why}" for s, why in failures)
        raise CheckpointError(f"no checkpoint in {self.folder} can be read back ({listed}). They are left as they "
                              "are; move the folder away to start afresh.")

    def _set_aside(self, steps: list[int], used: int) -> None:
        for step in steps:
            target = self.folder.parent / CORRUPT_DIR / str(step)
            warnings.warn(f"checkpoint {self.folder / str(step)} cannot be read back; moved to {target}, "
                          f"resuming from step {used}", PeftWarning, stacklevel=3)
            if jax.process_index() == 0:
                target.parent.mkdir(exist_ok=True)
                shutil.rmtree(target, ignore_errors=True)
                (self.folder / str(step)).rename(target)
        if steps:
            self._manager.reload()

    def close(self) -> None:
        self._manager.close()
        if self._failed is not None:  # what orbax's threads wrote after the failure
            self._remove_partial(self._failed)
