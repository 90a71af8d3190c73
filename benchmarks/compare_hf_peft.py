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
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

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
from peftjax.bench.suite import resolve_model, run_compiled  # noqa: E402
from peftjax.models import from_config, from_pretrained  # noqa: E402
from peftjax.train.tasks import loss_and_stats  # noqa: E402
from peftjax.variables import AdapterParam  # noqa: E402

LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01
DTYPES = {"fp32": (jnp.float32, torch.float32), "bf16": (jnp.bfloat16, torch.bfloat16)}
# config.json keys, which are also peftjax's config field names.
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout")


class Task(NamedTuple):  # not dataclasses: they need the module in sys.modules, and the tests load this file bare
    """What both sides train for one model family, in each framework's terms."""

    name: str
    head: str  # peftjax's head (``from_pretrained(task=...)``)
    loss: str  # ``loss_and_stats`` key
    hf_class: str  # transformers class
    peft_task_type: str
    num_labels: int | None
    lora_targets: str
    qlora_targets: str | None  # None: no QLoRA comparison for this family
    also_train: tuple[str, ...] = ()  # what HF PEFT's task_type puts in modules_to_save


TASKS = {
    "bert": Task("bert-sequence-classification", "sequence-classification", "classification",
                 "BertForSequenceClassification", "SEQ_CLS", 2, "query,value", None, (r"classifier\..*",)),
    # bitsandbytes quantises every linear layer but lm_head; QLoRA on all of them quantises the same set here.
    "llama": Task("llama-causal-lm", "causal-lm", "causal_lm", "LlamaForCausalLM", "CAUSAL_LM", None,
                  "q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
}  # fmt: skip


class Source(NamedTuple):
    """The model both sides build: a checkpoint folder, or a peftjax preset (random weights)."""

    config: Any  # peftjax's config of the model
    folder: Path | None
    task: Task

    @classmethod
    def resolve(cls, name: str) -> Source:
        config, folder = resolve_model(name)
        if config.model_type not in TASKS:
            raise SystemExit(f"--model {name!r}: model_type {config.model_type!r}; this comparison supports "
                             f"{', '.join(TASKS)}")
        if folder is None and config.model_type != "llama":
            raise SystemExit(f"--model {name!r}: of the presets only the Llama ones (llama-tiny, llama-1b, "
                             "llama-8b) are wired to HF; for BERT pass 'minilm' or a checkpoint folder")
        return cls(config, folder, TASKS[config.model_type])

    def hf_config(self) -> dict[str, Any]:
        """transformers' config dict: the checkpoint's own, or the preset's peftjax config written as one."""
        if self.folder is not None:
            return json.loads((self.folder / "config.json").read_text())
        return self.config.to_hf_dict()

    def dropout_overrides(self, keep: bool) -> dict[str, float]:
        """The model's dropout rates, or 0 for each (both sides get the same)."""
        return {} if keep else {k: 0.0 for k in DROPOUT_KEYS if k in self.hf_config()}


def make_batch(args, source: Source) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    vocab = source.config.vocab_size
    ids = rng.integers(min(1000, vocab // 2), vocab, (args.batch, args.seq)).astype(np.int64)
    # Causal LM: labels are the inputs; each side shifts them by one inside its loss.
    labels = rng.integers(0, source.task.num_labels, (args.batch,)).astype(np.int64) if source.task.num_labels else ids
    return {"input_ids": ids, "attention_mask": np.ones((args.batch, args.seq), np.int64), "labels": labels}


def check_qlora_requirements(args, source: Source) -> None:
    """Stops before anything is built when the HF side of QLoRA cannot run here."""
    if args.method != "qlora":
        return
    if source.task.qlora_targets is None:
        raise SystemExit(f"--method qlora: wired for Llama models only, not {source.config.model_type!r}")
    missing = []
    if not torch.cuda.is_available():
        missing.append("CUDA (torch.cuda.is_available() is False)")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("bitsandbytes (not installed)")
    if missing:
        raise SystemExit(f"--method qlora: the HF side (bitsandbytes 4-bit) needs CUDA and bitsandbytes; missing here: "
                         f"{', '.join(missing)}. Run on a GPU machine after `pip install bitsandbytes`.")


def sync_torch(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def dtype_names(arrays) -> list[str]:
    return sorted({str(a.dtype).removeprefix("torch.") for a in arrays})


# ----------------------------------------------------------------------------
# The two sides: each has step() (which returns its loss), forward(), and facts about itself.
# ----------------------------------------------------------------------------


def peftjax_method(args, task: Task) -> peftjax.MethodConfig:
    if args.method == "full":
        return peftjax.FullFineTuningConfig()
    config = peftjax.QLoraConfig if args.method == "qlora" else peftjax.LoraConfig
    return config(rank=args.rank, alpha=args.alpha, targets=args.targets, also_train=task.also_train)


def upcast_adapters(model: nnx.Module) -> None:
    """HF PEFT's ``autocast_adapter_dtype``: float32 adapter weights over a bf16 model
    (peftjax's models give adapters their layer's ``param_dtype``)."""
    for _, variable in nnx.iter_graph(model):
        if isinstance(variable, AdapterParam) and variable[...].dtype != jnp.float32:
            variable.set_value(variable[...].astype(jnp.float32))


def peftjax_model(args, source: Source) -> nnx.Module:
    """The model in training mode with the method applied (works under ``nnx.eval_shape``)."""
    task, dtype = source.task, DTYPES[args.dtype][0]
    kwargs = dict(task=task.head, num_labels=task.num_labels, dtype=dtype, param_dtype=dtype)
    overrides = source.dropout_overrides(args.dropout)
    if source.folder is None:
        model = from_config(source.config, **kwargs, **overrides)
    else:
        model = from_pretrained(source.folder, ignore_mismatched_sizes=True, config_overrides=overrides or None,
                                **kwargs)
    model.train()
    peftjax.apply(model, peftjax_method(args, task))
    upcast_adapters(model)
    return model


class PeftjaxSide:
    name = "peftjax"

    def __init__(self, args, source: Source, batch: dict[str, np.ndarray]):
        model = peftjax_model(args, source)
        tx = peftjax.make_optimizer(model, optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY))
        self.counts = peftjax.count_params(model, tx.labels)
        self.state = peftjax.TrainState.create(model, tx)
        self.param_dtypes = {"trainable": dtype_names(jax.tree.leaves(self.state.trainable)),
                             "frozen": dtype_names(jax.tree.leaves(self.state.frozen))}
        self.batch = {k: jnp.asarray(v, jnp.int32) for k, v in batch.items()}
        loss = loss_and_stats(source.task.loss)
        self.compiled = peftjax.make_train_step(lambda m, b: loss(m, b)).lower(self.state, self.batch).compile()
        graphdef = self.state.graphdef

        def forward(trainable, frozen, rest, batch):
            return loss(nnx.merge(graphdef, trainable, frozen, rest), batch)[0]

        self.forward_fn = jax.jit(forward)
        device = jax.devices()[0]
        self.device = f"cpu ({os.cpu_count()} cores)" if device.platform == "cpu" else device.device_kind

    def step(self) -> jax.Array:
        """One step; returns its loss (of the parameters before the update), left on the device."""
        self.state, metrics = run_compiled(self.compiled, self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        return metrics["loss"]

    def forward(self) -> None:
        s = self.state
        jax.block_until_ready(self.forward_fn(s.trainable, s.frozen, s.rest, self.batch))

    def peak_memory(self) -> int | None:
        stats = jax.devices()[0].memory_stats()
        return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def hf_model(args, source: Source, device: torch.device) -> torch.nn.Module:
    """The transformers model with HF PEFT's adapters, if any (on ``device`` only when quantised or a preset)."""
    model = hf_base_model(args, source, device)
    if args.method == "full":
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                            target_modules=list(args.targets), task_type=source.task.peft_task_type))


def hf_base_model(args, source: Source, device: torch.device) -> torch.nn.Module:
    """The transformers model in ``--dtype``."""
    import transformers

    cls = getattr(transformers, source.task.hf_class)
    dtype = DTYPES[args.dtype][1]
    kwargs = {"dtype": dtype, **source.dropout_overrides(args.dropout)}
    if source.task.num_labels:
        kwargs["num_labels"] = source.task.num_labels
    if args.method == "qlora":
        quantization = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp:
            folder = source.folder
            if folder is None:  # bitsandbytes quantises while loading, so a preset goes through a folder
                config = cls.config_class(**source.hf_config())
                cls._from_config(config, dtype=dtype).save_pretrained(tmp)
                folder = tmp
            return cls.from_pretrained(folder, quantization_config=quantization,
                                       device_map={"": device.index or 0}, **kwargs)
    if source.folder is None:
        kwargs.pop("dtype")
        # Initialised on the device in its final dtype: no float32 or host copy to count at the peak.
        with device:
            return cls._from_config(cls.config_class(**{**source.hf_config(), **kwargs}), dtype=dtype)
    return cls.from_pretrained(source.folder, **kwargs)


def logical_numel(parameter: torch.nn.Parameter) -> int:
    """The float size of a parameter (bitsandbytes packs two 4-bit weights a byte; its quant_state keeps the shape)."""
    state = getattr(parameter, "quant_state", None)
    return math.prod(state.shape) if state is not None else parameter.numel()


class HFSide:
    name = "hf_peft"

    def __init__(self, args, source: Source, batch: dict[str, np.ndarray]):
        from transformers.utils import logging

        logging.disable_progress_bar()
        self.torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(0)
        model = hf_model(args, source, self.torch_device)
        self.attn_implementation = model.config._attn_implementation
        if args.method != "qlora":  # a 4-bit model is already where its loader's device_map put it
            model = model.to(self.torch_device)
        self.model = model.train()
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        # Trainable: requires_grad. Total: the base model's own (PEFT's copy of the head is not a new parameter of it).
        base = self.model.get_base_model() if args.method != "full" else self.model
        total = sum(logical_numel(p) for n, p in base.named_parameters() if "original_module" not in n)
        self.counts = peftjax.ParamCount(sum(p.numel() for p in trainable), total)
        self.param_dtypes = {"trainable": dtype_names(trainable),
                             "frozen": dtype_names(p for p in self.model.parameters() if not p.requires_grad)}
        self.optimizer = torch.optim.AdamW(trainable, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        self.batch = {k: torch.as_tensor(v, device=self.torch_device) for k, v in batch.items()}
        cuda = self.torch_device.type == "cuda"
        self.device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"

    def step(self) -> torch.Tensor:
        """One step; returns its loss (of the parameters before the update), left on the device."""
        loss = self.model(**self.batch).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync_torch(self.torch_device)
        return loss.detach()

    def forward(self) -> None:
        self.model(**self.batch).loss.item()
        sync_torch(self.torch_device)

    def peak_memory(self) -> int | None:
        return int(torch.cuda.max_memory_allocated()) if self.torch_device.type == "cuda" else None


def build_sides(args) -> tuple[Source, list]:
    """Both sides, built after the checks that need nothing built."""
    source = Source.resolve(args.model)
    args.targets = tuple(t.strip() for t in (args.targets or default_targets(args, source.task)).split(","))
    check_qlora_requirements(args, source)
    batch = make_batch(args, source)
    return source, [PeftjaxSide(args, source, batch), HFSide(args, source, batch)]


def default_targets(args, task: Task) -> str:
    return task.qlora_targets if args.method == "qlora" and task.qlora_targets else task.lora_targets


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
