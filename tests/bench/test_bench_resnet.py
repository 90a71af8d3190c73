"""``peftjax bench`` on a ResNet (resnet-tiny, abstract): the methods that apply to a CNN,
XLA's forward FLOPs against the convolutions' own count, and the adapters' contents."""

import json

import pytest

from peftjax import apply
from peftjax.bench.methods import method_config
from peftjax.cli import main
from peftjax.core.counting import count_params
from peftjax.errors import PeftError
from peftjax.models import PRESETS, from_config

BATCH, SIDE = 4, 32
CONFIG = PRESETS["resnet-tiny"]


def valid_taps(size: int, kernel: int, stride: int, pad: int) -> tuple[int, int]:
    """(output size, kernel taps that land inside the input summed over the output positions), one axis."""
    out = (size + 2 * pad - kernel) // stride + 1
    return out, sum(1 for i in range(out) for j in range(kernel) if 0 <= i * stride - pad + j < size)


def conv_and_head_flops() -> int:
    """2 FLOPs per multiply-add of every convolution (taps on the zero padding excluded, as XLA
    counts them) and of the 2-label head, for resnet-tiny's basic layers on BATCH images."""
    side, taps = valid_taps(SIDE, 7, 2, 3)
    flops = 2 * BATCH * taps**2 * CONFIG.num_channels * CONFIG.embedding_size
    side = (side + 2 - 3) // 2 + 1  # the stem's 3x3 stride-2 max pool
    width = CONFIG.embedding_size
    for stage, out in enumerate(CONFIG.hidden_sizes):
        stride = 1 if stage == 0 else 2
        new_side, first = valid_taps(side, 3, stride, 1)
        _, second = valid_taps(new_side, 3, 1, 1)
        flops += 2 * BATCH * (first**2 * width * out + second**2 * out * out)
        if width != out or stride != 1:
            flops += 2 * BATCH * valid_taps(side, 1, stride, 0)[1] ** 2 * width * out
        side, width = new_side, out
    return flops + 2 * BATCH * width * 2


def batch_norms() -> tuple[int, int]:
    """(channels, count) of resnet-tiny's batch norms: the stem's, two per basic layer, and
    one per projection shortcut (every stage but the first, which keeps width and resolution)."""
    channels, count, width = CONFIG.embedding_size, 1, CONFIG.embedding_size
    for stage, (out, depth) in enumerate(zip(CONFIG.hidden_sizes, CONFIG.depths)):
        channels, count = channels + 2 * out * depth, count + 2 * depth
        if stage > 0 or width != out:
            channels, count = channels + out, count + 1
        width = out
    return channels, count


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "rows.json"
    assert main(["bench", "--model", "resnet-tiny", "--methods", "full,linear_probe,lora",
                 "--batch", str(BATCH), "--image-size", str(SIDE), "--abstract", "--json", str(out)]) == 0
    return {row["method"]: row for row in json.loads(out.read_text())}


def test_forward_flops_are_the_convolutions_plus_a_few_percent(rows):
    """XLA's forward count is the multiply-adds of the convolutions and the head, plus the
    batch norms, activations and pooling (a few percent)."""
    forward = rows["full"]["forward_flops_base"]
    assert 1.0 < forward / conv_and_head_flops() < 1.06
    assert rows["full"]["step_flops"] > 2.5 * forward  # forward + activation and weight gradients


def test_methods_that_apply_to_a_cnn(rows):
    assert rows["lora"]["status"] == "skipped" and "convolutions" in rows["lora"]["reason"]
    channels, norms = batch_norms()
    full, probe = rows["full"], rows["linear_probe"]
    assert probe["trainable_params"] == CONFIG.hidden_sizes[-1] * 2 + 2
    # A linear probe freezes every batch norm: its step is the inference forward pass plus the head.
    assert probe["step_flops"] < 1.01 * probe["forward_flops_base"]
    assert probe["compiled_memory_bytes"] < full["compiled_memory_bytes"] / 2
    # Adapters hold what trains and the running statistics that change: none for the probe,
    # every batch norm's mean, variance and counter (float32 / int32) when the batch norms train.
    assert probe["adapter_bytes"] == 4 * probe["trainable_params"]
    assert full["adapter_bytes"] == 4 * full["trainable_params"] + 4 * (2 * channels + norms)


@pytest.mark.parametrize("method, per_channel", [("bitfit", 1), ("ln_tuning", 2)])
def test_bitfit_and_ln_tuning_tune_the_batch_norms(method, per_channel):
    """BitFit: every batch norm's bias and the head's; LN tuning: every batch norm's scale and bias."""
    model = apply(from_config("resnet-tiny", num_labels=2, abstract=True), method_config(method, "resnet"))
    head_bias = 2 if method == "bitfit" else 0
    assert count_params(model).trainable == per_channel * batch_norms()[0] + head_bias


def test_text_tasks_and_transformer_methods_do_not_fit_a_resnet(capsys):
    with pytest.raises(PeftError, match="convolutions"):
        method_config("ia3", "resnet")
    assert main(["bench", "--model", "resnet-tiny", "--methods", "full", "--task", "classification", "--abstract"]) != 0
    assert "does not fit a resnet" in capsys.readouterr().err
