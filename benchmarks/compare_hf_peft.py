"""peftjax against PyTorch + HF PEFT: the same model, method, batch, sequence length and dtype.

Two tasks, picked by the model's ``model_type``:

* BERT (``--model minilm`` or a BERT checkpoint folder): sequence classification with
  2 labels; LoRA trains the new classifier too, i.e. HF PEFT's ``task_type="SEQ_CLS"``
  (the head goes into ``modules_to_save``) and peftjax's ``also_train=("classifier\\..*",)``.
  Default LoRA targets ``query,value``.
* Llama (a Llama checkpoint folder, or a peftjax preset: ``llama-tiny``, ``llama-1b``,
  ``llama-8b``): causal LM on random tokens with ``labels = input_ids`` (both sides
  predict token t+1 from tokens <= t and average over the batch's b x (t-1) targets).
  HF PEFT ``task_type="CAUSAL_LM"``, no head trains. Default LoRA targets
  ``q_proj,v_proj``. A preset has no weights: each side initialises randomly, HF from
  ``transformers.LlamaConfig(**peftjax_config.to_hf_dict())`` so that both build the
  same architecture from one definition (speed does not depend on the values).

Both sides train with AdamW (lr 1e-4, weight decay 0.01) on the same batch:

* ``--method lora``: LoRA(r, alpha, targets), adapter dropout 0;
* ``--method full``: every parameter trains (plain transformers on the HF side);
* ``--method qlora`` (Llama only): LoRA on a frozen NF4 base with double quantisation,
  block 64 (peftjax ``QLoraConfig`` defaults; HF: bitsandbytes ``BitsAndBytesConfig(
  load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=<--dtype>)``, whose blocks are 64 as well). bitsandbytes
  quantises every linear layer but ``lm_head`` whatever LoRA targets, and peftjax only
  the layers LoRA targets, so qlora's default targets are all seven projections: then
  both sides quantise the same weights. HF's side needs CUDA and bitsandbytes; the
  script stops before building anything when either is missing. No
  ``prepare_model_for_kbit_training`` on the HF side: it would turn on gradient
  checkpointing, which peftjax's side does not do.

``--dtype`` (default fp32) is what a user of each framework would do on a GPU:

* fp32: everything in float32 on both sides.
* bf16, LoRA/QLoRA: HF loads the model in ``torch.bfloat16``; HF PEFT then keeps the
  adapter weights in float32 (``get_peft_model``'s default ``autocast_adapter_dtype=True``,
  kept) and computes the adapter branch in float32 (it casts the branch's input to the
  adapters' dtype). peftjax computes in bf16 (``dtype=bfloat16``) and stores the model
  in bf16 (``param_dtype=bfloat16``); its models take one ``param_dtype`` for every
  parameter, adapters included, so this script casts the adapter parameters
  (``AdapterParam``) to float32 after ``apply``, as HF PEFT does. Left different: peftjax
  casts the float32 adapter weights to bf16 for the adapter branch, HF PEFT runs that
  branch in float32 (a rank-r branch: a small share of the FLOPs). A trained head
  (``also_train`` / ``modules_to_save``, BERT) stays in bf16 on both sides.
* bf16, full fine-tuning: pure bf16 parameters on both sides, AdamW moments in bf16 too
  (optax and torch both keep them in the parameters' dtype).

The parameter dtypes each side ends up with are read back from the built models and
written to the JSON ``config["param_dtypes"]``.

The trainable-parameter counts must match exactly (HF PEFT: parameters with
``requires_grad``); the script stops otherwise. Each row has ``initial_loss``: the
loss of the untrained model on the batch, from the first warm-up step (the same
weights give the same loss, a parity check when both sides load one checkpoint). Runs alternate in one process:
``--rounds`` times, ``--steps`` peftjax steps then ``--steps`` HF steps, so that a
change in machine load hits both sides alike; each side warms up first
(compilation / first-call allocation excluded) and every step is synchronised
(``block_until_ready``, ``torch.cuda.synchronize``). Reported step time is the
median over all timed steps of all rounds. Peak memory: the device's own counters on
a GPU (``jax.devices()[0].memory_stats()["peak_bytes_in_use"]``,
``torch.cuda.max_memory_allocated()``), each the high-water mark of its framework's
allocations since the process started, model building included; null on the CPU,
where both frameworks share one process and its resident-set peak cannot be split
between them.

``--breakdown`` also times each side's forward pass alone (loss, no backward), to say
where a difference comes from.

    python benchmarks/compare_hf_peft.py --model minilm --method lora --batch 32 --seq 64 --json out.json
    python benchmarks/compare_hf_peft.py --model llama-1b --method lora --dtype bf16 --batch 4 --seq 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the sides beside this file, also when it is loaded bare
from comparison import DTYPES, Source, make_batch, set_targets, timed, uptime  # noqa: E402
from hf_side import HFSide, check_qlora_requirements, hf_model  # noqa: E402, F401  (hf_model: the tests build it)
from peftjax_side import PeftjaxSide, peftjax_model  # noqa: E402, F401  (peftjax_model: the tests build it)

import jax  # noqa: E402
import torch  # noqa: E402


def build_sides(args) -> tuple[Source, list]:
    """Both sides, built after the checks that need nothing built."""
    source = Source.resolve(args.model)
    set_targets(args, source)
    check_qlora_requirements(args, source)
    batch = make_batch(args, source)
    return source, [PeftjaxSide(args, source, batch), HFSide(args, source, batch)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm",
                        help="minilm (the packaged MiniLM-L6), a BERT or Llama checkpoint folder, or a Llama preset "
                             "(llama-tiny, llama-1b, llama-8b)")
    parser.add_argument("--method", choices=("lora", "full", "qlora"), default="lora")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="see the module docstring")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations peftjax, HF")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps per side before the first round (at least 1: the first gives initial_loss)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", help="comma-separated module names (default: BERT query,value; Llama "
                                          "q_proj,v_proj, and all seven projections for qlora)")
    parser.add_argument("--dropout", action="store_true", help="keep the model's dropout rates (default: 0)")
    parser.add_argument("--breakdown", action="store_true", help="also time each side's forward pass alone")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    args.warmup = max(args.warmup, 1)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    load_before = uptime()
    source, sides = build_sides(args)
    counts = {s.name: s.counts for s in sides}
    print(f"trainable: peftjax {counts['peftjax'].trainable:,}, HF PEFT {counts['hf_peft'].trainable:,}; "
          f"total: {counts['peftjax'].total:,} / {counts['hf_peft'].total:,}", file=sys.stderr)
    assert counts["peftjax"].trainable == counts["hf_peft"].trainable, f"trainable counts differ: {counts}"

    initial_loss = {}
    for side in sides:
        initial_loss[side.name] = float(side.step())
        for _ in range(args.warmup - 1):
            side.step()
    print("initial loss: " + ", ".join(f"{k} {v:.6f}" for k, v in initial_loss.items()), file=sys.stderr)
    times = {s.name: [] for s in sides}
    rounds = []
    for index in range(args.rounds):
        medians = {}
        for side in sides:
            found = timed(side.step, args.steps)
            times[side.name] += found
            medians[side.name] = statistics.median(found)
        rounds.append({"round": index, "load_avg": list(os.getloadavg()), "median_step_s": medians})
        print(f"round {index}: " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in medians.items()), file=sys.stderr)
    forward = {}
    if args.breakdown:
        for side in sides:
            side.forward()
        for _ in range(args.rounds):
            for side in sides:
                forward.setdefault(side.name, []).extend(timed(side.forward, args.steps))

    tokens = args.batch * args.seq
    result = {}
    for side in sides:
        median = statistics.median(times[side.name])
        row = {
            "trainable_params": counts[side.name].trainable,
            "total_params": counts[side.name].total,
            "step_time_s": median,
            "step_times_s": times[side.name],
            "tokens_per_s": tokens / median,
            "peak_memory_bytes": side.peak_memory(),
            "device": side.device,
            "initial_loss": initial_loss[side.name],
        }
        if side.name in forward:
            row["forward_time_s"] = statistics.median(forward[side.name])
            row["backward_and_update_time_s"] = median - row["forward_time_s"]
        result[side.name] = row
    ours, theirs = result["peftjax"], result["hf_peft"]
    peak = (ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]
            if ours["peak_memory_bytes"] and theirs["peak_memory_bytes"] else None)
    result["ratio"] = {
        "step_time": ours["step_time_s"] / theirs["step_time_s"],
        "tokens_per_s": ours["tokens_per_s"] / theirs["tokens_per_s"],
        "peak_memory": peak,
    }
    result["config"] = {
        "model": args.model, "method": args.method, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "rounds": args.rounds, "warmup": args.warmup, "rank": args.rank, "alpha": args.alpha,
        "targets": list(args.targets), "dropout": args.dropout, "optimizer": "AdamW(lr=1e-4, weight_decay=0.01)",
        "dtype": args.dtype, "model_type": source.config.model_type, "task": source.task.name,
        "weights": "random (preset)" if source.folder is None else "checkpoint",
        "param_dtypes": {s.name: s.param_dtypes for s in sides},
        "adapter_branch_compute": ({"peftjax": "bf16 (adapter weights cast down)", "hf_peft": "fp32 (input cast up)"}
                                   if args.dtype == "bf16" and args.method != "full" else None),
        "hf_attn_implementation": sides[1].attn_implementation,
    }  # fmt: skip
    if args.method == "qlora":
        result["config"]["quantization"] = {
            "peftjax": "NF4, double quantisation, blocks of 64; the LoRA targets only",
            "hf_peft": "bitsandbytes NF4, double quantisation, blocks of 64; every linear layer but lm_head",
        }
    result["rounds"] = rounds
    result["load"] = {"before": load_before, "after": uptime()}
    result["versions"] = {"python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__,
                          "flax": __import__("flax").__version__, "peft": __import__("peft").__version__,
                          "transformers": __import__("transformers").__version__,
                          "torch_threads": torch.get_num_threads()}
    print(json.dumps({k: result[k] for k in ("ratio",)} | {
        s: {k: v for k, v in result[s].items() if k != "step_times_s"} for s in ("peftjax", "hf_peft")}, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
