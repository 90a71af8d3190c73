"""``peftjax bench`` end to end on bert-tiny, the method table, and the HF PEFT comparison script.

Tiny models only: these check that every number is produced and where it comes from,
not what the numbers are (timings are never asserted).
"""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from peftjax.bench.methods import ALL_METHODS, method_config, method_names
from peftjax.cli import main
from peftjax.errors import PeftError

REQUIRED = (
    "method", "trainable_params", "total_params", "step_flops", "flops_ratio_vs_full", "compiled_memory_bytes",
    "analytic_floor_bytes", "step_time_s", "tokens_per_s", "device",
)  # fmt: skip
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_every_method_name_has_a_config(family):
    for name in ALL_METHODS:
        assert method_config(name, family).method  # a registered method type
    assert method_config("lora-r32", family).rank == 32
    assert method_config("lora-r32", family).alpha == 64.0


def test_unknown_method_names_are_an_error_listing_the_known_ones():
    with pytest.raises(PeftError, match="lora-rN"):
        method_names("lora,ia3")
    assert method_names("all") == list(ALL_METHODS)


def test_bench_cli_timed_rows_json_and_charts(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(["bench", "--model", "bert-tiny", "--methods", "full,lora-r4", "--batch", "2", "--seq", "8",
                 "--steps", "2", "--warmup", "1", "--json", str(out), "--charts", str(tmp_path / "charts")])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["full", "lora-r4"]
    for row in rows:
        assert all(row[key] is not None for key in REQUIRED), row
        assert row["step_time_s"] > 0 and len(row["step_times_s"]) == 2
        assert row["device_peak_bytes"] is None or row["platform"] != "cpu"
        assert row["adapter_file_bytes"] >= row["adapter_bytes"]
    full, lora = rows
    assert full["flops_ratio_vs_full"] == 1.0
    assert lora["merged_overhead_flops"] == 0
    assert lora["forward_overhead_flops"] == lora["forward_overhead_analytic"]
    assert {p.name for p in (tmp_path / "charts").iterdir()} == {
        "rows_flops.png", "rows_memory.png", "rows_throughput.png"
    }
    assert "lora-r4" in capsys.readouterr().out


def test_bench_cli_abstract_skips_what_does_not_apply(tmp_path):
    out = tmp_path / "rows.json"
    assert main(["bench", "--model", "llama-tiny", "--methods", "bitfit,lora-r4", "--batch", "2", "--seq", "8",
                 "--dtype", "bf16", "--abstract", "--json", str(out)]) == 0
    bitfit, lora = json.loads(out.read_text())
    assert bitfit["status"] == "skipped" and "bias" in bitfit["reason"]  # Llama has no biases
    assert lora["step_time_s"] is None and lora["compiled_memory_bytes"] > 0
    assert 0.5 < lora["flops_ratio_vs_full"] < 0.8  # full fine-tuning's FLOPs computed for the ratio alone


@pytest.fixture(scope="module")
def tiny_bert_checkpoint(tmp_path_factory):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    config = transformers.BertConfig(vocab_size=1200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    folder = tmp_path_factory.mktemp("tiny-bert")
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def _compare_module():
    spec = importlib.util.spec_from_file_location("compare_hf_peft", ROOT / "benchmarks" / "compare_hf_peft.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["lora", "full"])
def test_compare_hf_peft_counts_match_and_json_has_both_sides(tiny_bert_checkpoint, tmp_path, method):
    out = tmp_path / "compare.json"
    result = _compare_module().main(["--model", str(tiny_bert_checkpoint), "--method", method, "--batch", "2",
                                     "--seq", "8", "--steps", "1", "--rounds", "2", "--warmup", "1",
                                     "--breakdown", "--json", str(out)])
    assert json.loads(out.read_text())["ratio"] == result["ratio"]
    ours, theirs = result["peftjax"], result["hf_peft"]
    assert ours["trainable_params"] == theirs["trainable_params"]
    if method == "lora":  # LoRA on query and value (r=8) plus the 2-label classifier
        assert ours["trainable_params"] == 2 * 2 * 8 * (32 + 32) + 32 * 2 + 2
    for row in (ours, theirs):
        assert len(row["step_times_s"]) == 2 and row["peak_memory_bytes"] is None  # CPU
        assert {"step_time_s", "tokens_per_s", "device", "forward_time_s"} <= set(row)
    assert result["ratio"]["step_time"] == ours["step_time_s"] / theirs["step_time_s"]
    assert len(result["rounds"]) == 2
