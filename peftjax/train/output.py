"""A run's output folder: writable, held by one run at a time, and read on restart.

``OutputLock`` keeps two runs out of one folder: ``OUTPUT/.lock`` holds the
owner's pid and host under an exclusive ``flock``, which the kernel drops
when the owner dies, so the lock of a killed run is taken over with a notice.
``start_point`` decides, from what the folder holds, whether a run starts
afresh or resumes, so that one command line serves the first start and
every restart: ``--resume`` in a folder without a checkpoint starts from
scratch, and the leftovers of a run that died before its first checkpoint
never block the next one.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import shutil
import socket
import warnings

import jax

from peftjax.config import ExperimentConfig
from peftjax.errors import CheckpointError, OutputLockedError, PeftWarning, RunError
from peftjax.train.checkpoint import Checkpointer, checkpoint_steps

RESULT_FILE = "result.json"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".lock"
# What a run writes before its first checkpoint; removed when a run starts afresh.
RUN_FILES = ("metrics.jsonl", "tensorboard", "best", "adapter", RESULT_FILE)


def writable_output_dir(config: ExperimentConfig) -> pathlib.Path:
    """The config's output folder, created and probed before any slow work."""
    out = pathlib.Path(config.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"  # one per process: several may share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise RunError(f"output_dir {str(out)!r} is not writable ({err.strerror}); set output_dir=... to a writable folder") from None
    return out


def _owner(text: str) -> tuple[int | None, str]:
    pid, _, host = text.strip().partition(" ")
    return (int(pid) if pid.isdigit() else None), host


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class OutputLock:
    """An exclusive lock on ``folder`` for as long as the ``with`` block runs
    (process 0 alone takes it when several processes share a run)."""

    def __init__(self, folder: pathlib.Path) -> None:
        self.path = pathlib.Path(folder) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        if jax.process_index() == 0:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            previous = os.read(fd, 200).decode(errors="replace")
            pid, owner_host = _owner(previous)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                held = err.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
                # A file system without flock: the pid decides, where it can be checked.
                if held or pid is not None and (owner_host != host or _alive(pid)):
                    raise OutputLockedError(
                        f"output_dir {str(self.path.parent)!r} is in use by process {pid} on {owner_host or 'this host'} "
                        f"(lock file {self.path}); wait for that run to end or stop it, or set output_dir=... to "
                        "another folder") from None
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                break
            os.close(fd)  # the owner removed the file as we locked it: lock the new one
        if pid is not None and pid != os.getpid():
            warnings.warn(f"taking over the lock {self.path} of process {pid}, which is no longer running",
                          PeftWarning, stacklevel=3)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {host}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: saved -> current`` for every dotted key whose values differ (list items by index)."""
    as_dict = lambda x: dict(enumerate(x)) if isinstance(x, list) else x  # noqa: E731
    saved, current = as_dict(saved), as_dict(current)
    found = []
    for key in sorted(set(saved) | set(current), key=str):
        a, b = as_dict(saved.get(key)), as_dict(current.get(key))
        if isinstance(a, dict) and isinstance(b, dict):
            found += config_differences(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" != "output_dir":
            found.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return found


def start_point(out: pathlib.Path, config: ExperimentConfig, *, resume: bool) -> bool:
    """Whether the run resumes from a checkpoint in ``out`` (else it starts afresh).

    Refuses a folder that holds a run unless ``resume``, and one whose
    checkpoints were written by another config. With ``resume`` and no
    checkpoint yet, the run starts from scratch with a notice.
    """
    steps = checkpoint_steps(out / CHECKPOINTS)
    finished = (out / RESULT_FILE).exists()
    if (steps or finished) and not resume:
        raise RunError(f"{out} already holds a run; pass --resume to continue it, or set output_dir=... to another folder")
    if steps:
        _check_same_config(out, config, steps)
        return True
    if finished:
        raise RunError(f"{out} holds a finished run without checkpoints; set output_dir=... to another folder")
    if resume:
        warnings.warn(f"--resume: no checkpoint in {out / CHECKPOINTS} yet; starting from scratch", PeftWarning,
                      stacklevel=3)
    leftovers = [name for name in (*RUN_FILES, CHECKPOINTS) if (out / name).exists()]
    if leftovers and jax.process_index() == 0:
        if not resume:
            warnings.warn(f"{out} holds the files of a run that stopped before its first checkpoint "
                          f"({', '.join(leftovers)}); starting afresh", PeftWarning, stacklevel=3)
        for name in leftovers:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return False


def _check_same_config(out: pathlib.Path, config: ExperimentConfig, steps: list[int]) -> None:
    checkpointer = Checkpointer(out / CHECKPOINTS, keep=len(steps))
    try:
        metas = (checkpointer.saved_meta(step) for step in reversed(steps))
        saved = next((meta["config"] for meta in metas if meta and "config" in meta), None)
    finally:
        checkpointer.close()
    current = json.loads(json.dumps(config.to_dict(), default=str))  # as the checkpoint's JSON holds it
    differences = config_differences(saved, current) if saved is not None else []
    if differences:
        raise CheckpointError(
            f"{out / CHECKPOINTS} holds checkpoints of another config ({'; '.join(differences[:5])}); "
            "resume with the config that wrote them, or set output_dir=... to another folder")


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line a killed run left half-written."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class RunLog:
    """A run's ``config.yaml``, ``metrics.jsonl`` and TensorBoard events, written
    by process 0 alone. A resumed run (``step`` > 0) first drops the records
    after ``step`` that a run stopped after its last checkpoint left (it
    writes them again), and a last line a killed run left half-written."""

    def __init__(self, out: pathlib.Path, config: ExperimentConfig, step: int) -> None:
        self._file = self._writer = None
        if jax.process_index() != 0:
            return
        from tensorboardX import SummaryWriter

        (out / "config.yaml").write_text(config.to_yaml())
        path = out / "metrics.jsonl"
        if step and path.exists():
            kept = [line for line in path.read_text().splitlines(keepends=True) if _logged_step(line) <= step]
            path.write_text("".join(kept))
        self._file = path.open("a")
        self._writer = SummaryWriter(str(out / "tensorboard"))

    def write(self, record: dict) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._writer.close()
