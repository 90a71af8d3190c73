"""What both sides of a peftjax / HF PEFT comparison share, with neither framework imported.

``compare_hf_peft.py`` runs both sides in one process; the memory and scaling scripts
run each in a fresh process of its own (``peftjax_side.py`` imports only JAX,
``hf_side.py`` only PyTorch), so that one framework's libraries never count in the
other's resident memory. A ``Source`` travels to such a process as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

# Before JAX / transformers read them. Share a GPU with PyTorch: JAX would otherwise reserve 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

LEARNING_RATE, WEIGHT_DECAY = 1e-4, 0.01
DTYPES = ("fp32", "bf16")
# config.json keys, which are also peftjax's config field names.
DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout")


class Task(NamedTuple):  # not dataclasses: they need the module in sys.modules, and the tests load files bare
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
    "bert": Task("bert-sequence-classification", "classification", "classification",
                 "BertForSequenceClassification", "SEQ_CLS", 2, "query,value", None, (r"classifier\..*",)),
    # bitsandbytes quantises every linear layer but lm_head; QLoRA on all of them quantises the same set here.
    "llama": Task("llama-causal-lm", "causal_lm", "causal_lm", "LlamaForCausalLM", "CAUSAL_LM", None,
                  "q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
}  # fmt: skip


class Counts(NamedTuple):
    trainable: int
    total: int


class Source(NamedTuple):
    """The model both sides build: a checkpoint folder, or a peftjax preset (random weights)."""

    config: Any  # peftjax's config of the model (None in a process without peftjax)
    folder: Path | None
    task: Task
    hf: dict[str, Any]  # transformers' config dict: the checkpoint's own, or the preset's written as one

    @classmethod
    def resolve(cls, name: str) -> Source:
        from peftjax.bench.suite import resolve_model

        config, folder = resolve_model(name)
        if config.model_type not in TASKS:
            raise SystemExit(f"--model {name!r}: model_type {config.model_type!r}; this comparison supports "
                             f"{', '.join(TASKS)}")
        if folder is None and config.model_type != "llama":
            raise SystemExit(f"--model {name!r}: of the presets only the Llama ones (llama-tiny, llama-1b, "
                             "llama-8b) are wired to HF; for BERT pass 'minilm' or a checkpoint folder")
        hf = json.loads((folder / "config.json").read_text()) if folder is not None else config.to_hf_dict()
        return cls(config, folder, TASKS[config.model_type], hf)

    def hf_config(self) -> dict[str, Any]:
        return self.hf

    def dropout_overrides(self, keep: bool) -> dict[str, float]:
        """The model's dropout rates, or 0 for each (both sides get the same)."""
        return {} if keep else {k: 0.0 for k in DROPOUT_KEYS if k in self.hf}

    def to_json(self) -> str:
        """What a process of one side needs to rebuild this source (the HF side without peftjax)."""
        task = next(k for k, v in TASKS.items() if v == self.task)
        return json.dumps({"folder": None if self.folder is None else str(self.folder), "task": task, "hf": self.hf})

    @classmethod
    def from_json(cls, text: str, *, config: Any = None) -> Source:
        found = json.loads(text)
        folder = None if found["folder"] is None else Path(found["folder"])
        return cls(config, folder, TASKS[found["task"]], found["hf"])


def set_targets(args, source: Source) -> None:
    """``args.targets`` as a tuple of module names: as given (comma-separated), or the family's default."""
    task = source.task
    default = task.qlora_targets if args.method == "qlora" and task.qlora_targets else task.lora_targets
    targets = args.targets or default
    args.targets = tuple(t.strip() for t in targets.split(",")) if isinstance(targets, str) else tuple(targets)


def make_batch(args, source: Source) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    vocab = source.hf["vocab_size"]
    ids = rng.integers(min(1000, vocab // 2), vocab, (args.batch, args.seq)).astype(np.int64)
    # Causal LM: labels are the inputs; each side shifts them by one inside its loss.
    labels = rng.integers(0, source.task.num_labels, (args.batch,)).astype(np.int64) if source.task.num_labels else ids
    return {"input_ids": ids, "attention_mask": np.ones((args.batch, args.seq), np.int64), "labels": labels}


def dtype_names(arrays) -> list[str]:
    return sorted({str(a.dtype).removeprefix("torch.") for a in arrays})


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
