"""Data-parallel, FSDP and gradient accumulation give the single-device numbers.

Runs tests/train/multidevice_check.py in a subprocess with 8 simulated CPU
devices (the flag must be set before JAX starts).
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

CHECK = pathlib.Path(__file__).with_name("multidevice_check.py")


@pytest.fixture(scope="module")
def report():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env = {**os.environ, "XLA_FLAGS": flags, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(CHECK)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_data_parallel_and_fsdp_losses_equal_single_device(report):
    assert len(report["single"]) == 10
    np.testing.assert_allclose(report["data_parallel"], report["single"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(report["fsdp"], report["single"], atol=1e-5, rtol=0)
    assert report["single"][-1] < report["single"][0]
    assert report["adapter_gap_dp"] <= 1e-5 and report["adapter_gap_fsdp"] <= 1e-5


def test_fsdp_shards_the_base_and_the_adapter_follows(report):
    assert "fsdp" in report["kernel_spec"] and report["kernel_sharding"] == report["kernel_spec"]
    assert report["lora_a_spec"] == report["kernel_spec"], "LoRA A is split on the input axis like its kernel"


def test_gradient_accumulation_equals_one_big_batch(report):
    assert abs(report["accumulated_loss"] - report["whole_loss"]) <= 1e-5
    assert report["accumulation_gap"] <= 1e-5
