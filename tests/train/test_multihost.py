"""Two ``peftjax --distributed`` processes on localhost, 2 CPU devices each, as two hosts would run.

JAX's CPU collectives (gloo) carry the all-reduces between the processes, and
its coordination service their heartbeats and the preemption notice. One
test, three pairs of processes on one config, with a single process on the 4
devices beside them:

* SIGTERM to process 1: both processes stop after the same step, checkpoint
  and exit 143 (JAX's preemption sync point);
* the same command with ``--resume``: the pair trains to the end, and its
  adapter equals the single process's within 1e-5;
* SIGKILL to process 1 of a new pair: process 0 stops within the heartbeat
  timeout plus a margin, with JAX's message naming the dead peer, instead of
  waiting in a collective for ever.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

HEARTBEAT_S = 10
CONFIG = {
    "name": "two-hosts",
    "model": {"name": "bert-tiny"},
    "methods": [{"type": "lora", "targets": ["query", "value"], "rank": 4, "alpha": 8,
                 "also_train": [r"classifier\..*"]}],
    "data": {"source": "synthetic:sentiment", "task": "classification", "text_columns": ["sentence"],
             "label_column": "label", "max_length": 16, "bucket_lengths": [16], "max_train_rows": 512},
    "optim": {"name": "adamw", "learning_rate": 3e-3},
    "train": {"batch_size": 16, "steps": 24, "eval_every": 0, "checkpoint_every": 8, "keep": 3, "log_every": 1},
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    flags = " ".join([os.environ.get("XLA_FLAGS", ""), f"--xla_force_host_platform_device_count={devices}"])
    return {**os.environ, "XLA_FLAGS": flags.strip(), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def started():
    """The processes a test starts; any still running when it ends (a failed assertion) are killed."""
    processes: list[subprocess.Popen] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def _start(started, args: list[str], devices: int, log) -> subprocess.Popen:
    started.append(subprocess.Popen([sys.executable, "-m", "peftjax.cli", *args], env=_env(devices), stdout=log,
                                    stderr=subprocess.STDOUT, text=True))
    return started[-1]


def _pair(started, config, out, tmp_path, name: str, *extra: str) -> list[subprocess.Popen]:
    port = _free_port()
    logs = [(tmp_path / f"{name}-{i}.log").open("w") for i in range(2)]
    return [_start(started, ["--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                    str(i), "--heartbeat-timeout", str(HEARTBEAT_S), "train", str(config), f"output_dir={out}",
                    *extra, "--quiet"], 2, logs[i]) for i in range(2)]


def _log(tmp_path, name: str, index: int) -> str:
    return (tmp_path / f"{name}-{index}.log").read_text()


def _wait_for_step(out, processes, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and any(json.loads(line)["step"] >= step for line in metrics.read_text().splitlines())):
        assert all(p.poll() is None for p in processes), "a process ended early"
        assert time.time() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.1)


def test_two_processes_train_as_one_stop_together_and_stop_when_a_peer_dies(tmp_path, started):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    with (tmp_path / "single.log").open("w") as log:
        single = _start(started, ["train", str(config), f"output_dir={tmp_path / 'single'}", "--quiet"], 4, log)
        out = tmp_path / "pair"

        first = _pair(started, config, out, tmp_path, "first")
        _wait_for_step(out, first, 10)
        first[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=180) for p in first]
        stops = [line for i in range(2) for line in _log(tmp_path, "first", i).splitlines()
                 if line.startswith("peftjax: stopped by SIGTERM after step ")]
        assert codes == [143, 143] and len(stops) == 2 and stops[0] == stops[1], (codes, stops)
        assert "checkpoint" in stops[0] and (out / "checkpoints" / stops[0].split("step ")[1].split(";")[0]).is_dir()

        resumed = _pair(started, config, out, tmp_path, "resumed", "--resume")
        assert [p.wait(timeout=300) for p in resumed] == [0, 0], _log(tmp_path, "resumed", 0)[-3000:]
        assert single.wait(timeout=300) == 0, (tmp_path / "single.log").read_text()[-3000:]
    pair, alone = load_file(str(out / "adapter" / "adapter_model.safetensors")), \
        load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert pair.keys() == alone.keys()
    for key in pair:
        np.testing.assert_allclose(pair[key], alone[key], atol=1e-5, rtol=0, err_msg=key)

    out = tmp_path / "dies"
    dying = _pair(started, config, out, tmp_path, "dies", "train.steps=100000")
    _wait_for_step(out, dying, 3)
    dying[1].kill()
    killed_at = time.time()
    code = dying[0].wait(timeout=HEARTBEAT_S + 110)
    waited = time.time() - killed_at
    message = _log(tmp_path, "dies", 0)
    assert code != 0 and waited < HEARTBEAT_S + 60, (code, waited)
    assert "another task died" in message and ("heartbeat" in message or "leader" in message), message[-3000:]
