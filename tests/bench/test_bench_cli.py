"""``peftjax bench`` end to end on bert-tiny, the method table, and the HF PEFT comparison script (tiny BERT and Llama).

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
        assert method_config(name, family).method == name.split(":")[0]  # the YAML type the name starts with
    assert method_config("lora:rank=32", family).rank == 32
    assert method_config("lora:rank=32", family).alpha == 64.0  # alpha follows the rank unless given
    assert method_config("lora:rank=32:alpha=8", family).alpha == 8.0


def test_unknown_method_names_are_an_error_listing_the_known_ones():
    with pytest.raises(PeftError, match="Did you mean 'ia3'.*Methods are YAML method types"):
        method_names("lora,ia4")
    with pytest.raises(PeftError, match="LoraConfig has no field"):
        method_config("lora:rnak=4", "bert")
    assert method_names("all") == list(ALL_METHODS)


def test_old_benchmark_names_still_work_with_a_notice(caplog):
    old = "lora-r8,lora-r4,houlsby,pfeiffer,parallel,prompt,prefix,lora-all-linear,qlora-all-linear"
    assert method_names(old) == ["lora", "lora:rank=4", "bottleneck", "bottleneck:variant=pfeiffer",
                                 "bottleneck:variant=parallel", "prompt_tuning", "prefix_tuning",
                                 "lora:targets=all-linear", "qlora:targets=all-linear"]
    assert "'houlsby' is spelled 'bottleneck' now" in caplog.text


def test_bench_cli_timed_rows_json_and_charts(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(["bench", "--model", "bert-tiny", "--methods", "full,lora:rank=4", "--batch", "2", "--seq", "8",
                 "--steps", "2", "--warmup", "1", "--json", str(out), "--charts", str(tmp_path / "charts")])
    assert code == 0
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["full", "lora:rank=4"]
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
    printed = capsys.readouterr().out
    assert "lora:rank=4" in printed and "columns:" in printed and "step MFLOP" in printed  # tiny: MFLOP, not 0.0


def test_bench_cli_abstract_skips_what_does_not_apply(tmp_path):
    out = tmp_path / "rows.json"
    assert main(["bench", "--model", "llama-tiny", "--methods", "bitfit,lora:rank=4", "--batch", "2", "--seq", "8",
                 "--dtype", "bf16", "--abstract", "--json", str(out)]) == 0
    bitfit, lora = json.loads(out.read_text())
    assert bitfit["status"] == "skipped" and "bias" in bitfit["reason"]  # Llama has no biases
    assert lora["step_time_s"] is None and lora["compiled_memory_bytes"] > 0
    assert 0.5 < lora["flops_ratio_vs_full"] < 0.8  # full fine-tuning's FLOPs computed for the ratio alone


def test_qlora_on_every_linear_layer_saves_its_base_storage_and_keeps_no_more_for_backward(tmp_path):
    """bf16 compute over fp32 parameters: LoRA keeps a bf16 copy of each kernel for the backward pass
    and QLoRA its bf16 dequantised kernel in the same place, so XLA's temporaries are no larger (equal
    with linear int8 block scales, 832 bytes smaller with bitsandbytes' dynamic map) and the saving
    is the frozen storage (4 bytes per weight down to NF4's ~0.52)."""
    out = tmp_path / "rows.json"
    assert main(["bench", "--model", "llama-tiny", "--methods", "lora:targets=all-linear,qlora:targets=all-linear",
                 "--batch", "2", "--seq", "8", "--dtype", "bf16", "--abstract", "--json", str(out)]) == 0
    lora, qlora = json.loads(out.read_text())
    assert lora["trainable_params"] == qlora["trainable_params"]
    assert qlora["compiled_memory"]["temp"] <= lora["compiled_memory"]["temp"]
    saved = lora["compiled_memory"]["argument"] - qlora["compiled_memory"]["argument"]
    assert saved == lora["analytic_floor"]["frozen_state"] - qlora["analytic_floor"]["frozen_state"] > 0


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


@pytest.fixture(scope="module")
def tiny_llama_checkpoint(tmp_path_factory):
    """transformers' LlamaForCausalLM of peftjax's llama-tiny preset (GQA, llama3 RoPE, tied embeddings)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers

    from peftjax.models.factory import preset_config

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(**preset_config("llama-tiny").to_hf_dict())
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def _compare_llama(folder, tmp_path, *extra):
    out = tmp_path / "compare.json"
    result = _compare_module().main(["--model", str(folder), "--batch", "2", "--seq", "8", "--steps", "1",
                                     "--rounds", "1", "--warmup", "1", "--json", str(out), *extra])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert set(result["ratio"]) == {"step_time", "tokens_per_s", "peak_memory"}
    assert result["config"]["model_type"] == "llama" and result["config"]["task"] == "llama-causal-lm"
    ours, theirs = result["peftjax"], result["hf_peft"]
    assert ours["trainable_params"] == theirs["trainable_params"] and ours["total_params"] == theirs["total_params"]
    for row in (ours, theirs):
        assert len(row["step_times_s"]) == 1 and row["tokens_per_s"] > 0 and row["peak_memory_bytes"] is None  # CPU
    return result


@pytest.mark.parametrize("method", ["lora", "full"])
def test_compare_hf_peft_llama_causal_lm_same_loss_from_the_same_checkpoint(tiny_llama_checkpoint, tmp_path, method):
    result = _compare_llama(tiny_llama_checkpoint, tmp_path, "--method", method)
    ours, theirs = result["peftjax"], result["hf_peft"]
    # Same weights, same tokens, labels = inputs shifted by one on both sides; fresh LoRA adds nothing (B = 0).
    assert ours["initial_loss"] == pytest.approx(theirs["initial_loss"], abs=1e-4)
    assert 5.0 < ours["initial_loss"] < 9.0  # about ln(vocab 1000) = 6.9 for an untrained model
    if method == "lora":  # q_proj (64 -> 64) and v_proj (64 -> 2 KV heads x 16) in 2 layers, r=8
        assert result["config"]["targets"] == ["q_proj", "v_proj"]
        assert ours["trainable_params"] == 2 * 8 * ((64 + 64) + (64 + 32))
    else:
        assert ours["trainable_params"] == ours["total_params"]
    assert result["config"]["param_dtypes"]["peftjax"] == result["config"]["param_dtypes"]["hf_peft"]


def test_compare_hf_peft_llama_bf16_lora_keeps_adapters_in_fp32_on_both_sides(tiny_llama_checkpoint, tmp_path):
    result = _compare_llama(tiny_llama_checkpoint, tmp_path, "--method", "lora", "--dtype", "bf16")
    config = result["config"]
    assert config["dtype"] == "bf16"
    for side in ("peftjax", "hf_peft"):
        assert config["param_dtypes"][side] == {"trainable": ["float32"], "frozen": ["bfloat16"]}
    assert config["adapter_branch_compute"]["hf_peft"].startswith("fp32")
    assert result["peftjax"]["initial_loss"] == pytest.approx(result["hf_peft"]["initial_loss"], abs=0.05)


def test_compare_hf_peft_llama_1b_preset_is_the_same_model_on_both_sides():
    """The item (d) model, shapes only: HF's LlamaConfig comes from peftjax's preset, and LoRA over the seven
    projections (qlora's default targets) trains and totals the same number of parameters on both sides."""
    import torch
    from flax import nnx

    import peftjax

    compare = _compare_module()
    args = compare.parse_args(["--model", "llama-1b", "--dtype", "bf16", "--method", "lora"])
    source = compare.Source.resolve(args.model)
    args.targets = tuple(source.task.qlora_targets.split(","))
    ours = peftjax.count_params(nnx.eval_shape(lambda: compare.peftjax_model(args, source)))
    theirs = compare.hf_model(args, source, torch.device("meta"))
    trainable, total = theirs.get_nb_trainable_parameters()
    assert (ours.trainable, ours.total) == (trainable, total)
    assert total > 1.2e9 and next(theirs.parameters()).dtype == torch.bfloat16


def test_compare_hf_peft_qlora_without_cuda_stops_before_building(monkeypatch):
    import torch

    compare = _compare_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU machine, also on a GPU one

    def built(*args, **kwargs):
        raise AssertionError("a side was built")

    monkeypatch.setattr(compare, "PeftjaxSide", built)
    monkeypatch.setattr(compare, "HFSide", built)
    with pytest.raises(SystemExit, match=r"needs CUDA and bitsandbytes.*pip install bitsandbytes"):
        compare.main(["--model", "llama-1b", "--method", "qlora", "--dtype", "bf16"])
