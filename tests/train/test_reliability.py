"""Runs that survive signals, kills, corrupt checkpoints, a full disk and a second run in the same folder."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from peftjax.cli import main
from peftjax.config import load_config
from peftjax.errors import AdapterError, CheckpointError, OutputLockedError, PeftWarning
from peftjax.train.checkpoint import CORRUPT_DIR, checkpoint_steps
from peftjax.train.output import LOCK_FILE, OutputLock
from peftjax.train.runner import run

TINY = {
    "name": "tiny",
    "model": {"name": "bert-tiny"},
    "methods": [{"type": "lora", "targets": ["query", "value"], "rank": 4, "alpha": 8,
                 "also_train": [r"classifier\..*"]}],
    "data": {"source": "synthetic:sentiment", "task": "classification", "eval_split": None, "test_split": None,
             "text_columns": ["sentence"], "label_column": "label", "max_length": 16, "bucket_lengths": [16],
             "max_train_rows": 512},
    "optim": {"name": "adamw", "learning_rate": 3e-3},
    "train": {"batch_size": 16, "steps": 40, "eval_every": 0, "checkpoint_every": 10, "keep": 3, "log_every": 1},
}


def write_config(path: pathlib.Path, out: pathlib.Path, **train) -> pathlib.Path:
    config = {**TINY, "output_dir": str(out), "train": {**TINY["train"], **train}}
    path.write_text(yaml.safe_dump(config))
    return path


def adapter(out: pathlib.Path) -> dict[str, np.ndarray]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert np.array_equal(a[key], b[key]), key


def steps_logged(out: pathlib.Path) -> list[int]:
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["step"] for line in lines if line.strip()]


def train_command(config: pathlib.Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "peftjax.cli", "train", str(config), "--quiet", "--resume"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended before {what}:\n{process.stderr.read()}")
        assert time.time() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def test_one_resume_command_survives_a_kill_before_the_first_checkpoint_and_a_sigterm(tmp_path, finished_run):
    """The same ``peftjax train CONFIG --resume`` line, run three times: killed with
    SIGKILL before its first checkpoint, then stopped by SIGTERM between two
    checkpoints (both as subprocesses), then to the end. The adapter equals an uninterrupted run's, bit
    for bit, and metrics.jsonl holds every step once."""
    out = tmp_path / "out"
    config = write_config(tmp_path / "config.yaml", out)

    first = train_command(config)  # config.yaml is written after the set-up, just before step 1
    wait_for(lambda: (out / "config.yaml").exists(), first, "config.yaml")
    first.kill()
    first.communicate()
    assert checkpoint_steps(out / "checkpoints") == [], "killed too late: a checkpoint was written"
    assert (out / LOCK_FILE).exists()  # the dead run's lock, to be taken over

    second = train_command(config)
    wait_for(lambda: max(steps_logged(out), default=0) >= 13, second, "step 13")
    second.send_signal(signal.SIGTERM)
    _, stderr = second.communicate(timeout=120)
    assert second.returncode == 143, stderr
    assert "no checkpoint in" in stderr and "starting from scratch" in stderr
    assert "taking over the lock" in stderr and f"process {first.pid}" in stderr
    stopped = int(stderr.split("stopped by SIGTERM after step ")[1].split(";")[0])
    assert 13 <= stopped < 40 and stopped % 10, stderr  # a step between two regular checkpoints
    assert f"checkpoint {out / 'checkpoints' / str(stopped)};" in stderr and "Traceback" not in stderr
    assert checkpoint_steps(out / "checkpoints")[-1] == stopped

    assert main(["train", str(config), "--quiet", "--resume"]) == 0  # the third time in this process: cheaper
    assert steps_logged(out) == list(range(1, 41))

    assert_bitwise_equal(adapter(out), finished_run[1])
    assert not (out / LOCK_FILE).exists()


def test_a_second_signal_exits_at_once(tmp_path):
    script = textwrap.dedent("""
        import os, signal, time
        from peftjax.train.preemption import StopSignals

        with StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            print("asked to stop:", stop.requested(1), flush=True)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
            print("still running", flush=True)
    """)
    started = time.time()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stdout == "asked to stop: True\n" and time.time() - started < 30
    assert "SIGTERM: stopping after this step" in done.stderr and "second SIGINT: exiting now" in done.stderr


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 40-step run, uninterrupted, with checkpoints at steps 20, 30 and 40, and its adapter."""
    folder = tmp_path_factory.mktemp("finished")
    config = load_config(write_config(folder / "config.yaml", folder / "out"))
    run(config, progress=False)
    return config, adapter(folder / "out")


def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, finished_run):
    finished, expected = finished_run
    out = tmp_path / "out"
    shutil.copytree(finished.output_dir, out)  # the finished run's checkpoints, 20, 30 and 40, without training again
    config = load_config(write_config(tmp_path / "config.yaml", out))
    for blob in (out / "checkpoints" / "40" / "state").rglob("d/*"):  # the arrays' data, cut short
        blob.write_bytes(blob.read_bytes()[: len(blob.read_bytes()) // 2])
    with pytest.warns(PeftWarning, match=rf"checkpoint {out / 'checkpoints' / '40'} cannot be read back; moved to "
                                         rf"{out / CORRUPT_DIR / '40'}, resuming from step 30"):
        result = run(config, resume=True, progress=False)
    assert result["steps"] == 40 and checkpoint_steps(out / "checkpoints") == [20, 30, 40]
    assert_bitwise_equal(adapter(out), expected)


def test_resume_refuses_another_configs_checkpoints(tmp_path, finished_run):
    config, _ = finished_run
    other = load_config(write_config(tmp_path / "config.yaml", pathlib.Path(config.output_dir)), ["methods.0.rank=8"])
    before = sorted(p.name for p in pathlib.Path(config.output_dir).iterdir())
    with pytest.raises(CheckpointError, match=r"holds checkpoints of another config \(methods\.0\.rank: 4 -> 8\)"):
        run(other, resume=True, progress=False)
    assert sorted(p.name for p in pathlib.Path(config.output_dir).iterdir()) == before


def test_a_live_run_holds_its_output_folder_and_a_dead_ones_lock_is_taken_over(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    config = load_config(write_config(tmp_path / "config.yaml", out))
    with OutputLock(out):
        with pytest.raises(OutputLockedError, match=rf"output_dir '{out}' is in use by process {os.getpid()} on .*"
                                                    r"set output_dir=\.\.\. to another folder"):
            run(config, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]
    assert not (out / LOCK_FILE).exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / LOCK_FILE).write_text(f"{dead.pid} {os.uname().nodename}\n")
    with pytest.warns(PeftWarning, match=f"taking over the lock .* of process {dead.pid}, which is no longer running"):
        with OutputLock(out) as lock:
            assert lock.path.read_text().split()[0] == str(os.getpid())


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch, finished_run):
    from orbax.checkpoint._src.handlers import json_checkpoint_handler

    _, expected = finished_run
    original = json_checkpoint_handler.JsonCheckpointHandler._save_fn
    calls = []

    async def full_at_the_second_save(self, x, directory):
        calls.append(directory)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))
        return await original(self, x, directory)

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", full_at_the_second_save)
    out = tmp_path / "out"
    config = load_config(write_config(tmp_path / "config.yaml", out))
    with pytest.raises(CheckpointError, match=r"cannot write checkpoint step 20 to .*No space left on device.*"
                                              r"the previous checkpoint, step 10, is intact"):
        run(config, progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["10"]
    assert not (out / "result.json").exists() and not (out / "adapter").exists()
    assert not (out / LOCK_FILE).exists()
    monkeypatch.undo()
    run(config, resume=True, progress=False)
    assert_bitwise_equal(adapter(out), expected)


def test_a_full_disk_or_unwritable_folder_during_save_adapter_keeps_the_previous_adapter(tmp_path, monkeypatch, toy):
    import jax.numpy as jnp

    import peftjax
    from peftjax.core import adapter_io

    peftjax.apply(toy, peftjax.LoraConfig(rank=2, targets=["query"]))
    folder = peftjax.save_adapter(toy, tmp_path / "adapter")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    toy.layers[0].query.lora_b[...] = jnp.ones_like(toy.layers[0].query.lora_b[...])

    def disk_full(tensors, filename, *args, **kwargs):
        pathlib.Path(filename).write_bytes(b"\0" * 10)  # a write that got partway
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(adapter_io, "save_file", disk_full)
    with pytest.raises(AdapterError, match=rf"cannot write the adapter to {folder} \(No space left on device\); "
                                           "an earlier adapter there is left as it was"):
        peftjax.save_adapter(toy, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert_bitwise_equal(load_file(str(folder / "adapter_model.safetensors")), saved)
    with pytest.raises(AdapterError, match=r"cannot write the adapter to /proc/peftjax-adapter"):
        peftjax.save_adapter(toy, "/proc/peftjax-adapter")
