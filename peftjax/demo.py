"""``make demo``: fine-tune the pretrained MiniLM encoder with LoRA on SST-2.

The embedded default picks its data in this order and says which it used:
SST-2 from ``../shared/data/sst2`` when present, else ``glue``/``sst2`` from
the Hugging Face hub when it is reachable, else the small built-in synthetic
task (with the tiny BERT preset, so nothing at all is downloaded).
"""

from __future__ import annotations

import os
import shutil
import socket

from peftjax.config import ExperimentConfig
from peftjax.data import sst2_path
from peftjax.train.runner import run

OUTPUT = "runs/demo"


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def default_config() -> tuple[ExperimentConfig, str]:
    """The demo's experiment and a sentence saying which data it uses."""
    lora = {"type": "lora", "targets": ["query", "value"], "rank": 8, "alpha": 16, "also_train": [r"classifier\..*"]}
    train = {"batch_size": 32, "steps": 150, "eval_every": 75, "checkpoint_every": 75, "log_every": 25}
    text = {"text_columns": ["sentence"], "label_column": "label", "max_length": 64, "group_by_length": True}
    if (sst2_path() / "train.tsv").is_file():
        data = {"source": "shared:sst2", "train_split": "train.tsv", "eval_split": "dev.tsv", "test_split": "test.tsv",
                "max_train_rows": 4800, "max_eval_rows": 872, **text}
        model, said = "minilm", f"SST-2 from {sst2_path()} (4,800 training rows, 150 steps)"
    elif _hub_reachable():
        data = {"source": "hub:glue", "subset": "sst2", "train_split": "train", "eval_split": "validation",
                "max_train_rows": 4800, **text}
        model, said = "minilm", "SST-2 from the Hugging Face hub (glue/sst2)"
    else:
        data = {"source": "synthetic:sentiment", "eval_split": "eval", "test_split": "test", **text, "max_length": 32}
        model, said = "bert-tiny", "the built-in synthetic sentiment task (no SST-2 found, hub unreachable)"
        lora["rank"], train["steps"] = 4, 300
    config = ExperimentConfig.from_dict({
        "name": "demo", "output_dir": OUTPUT, "model": {"name": model}, "methods": [lora],
        "data": {"task": "classification", **data},
        "optim": {"name": "adamw", "learning_rate": 1e-3, "weight_decay": 0.01},
        "schedule": {"warmup_ratio": 0.06, "decay": "linear"}, "train": train,
    })
    return config, said


def main() -> None:
    config, said = default_config()
    print(f"peftjax demo: {config.model.name} + LoRA(query, value, r={config.methods[0]['rank']}) on {said}\n")
    shutil.rmtree(OUTPUT, ignore_errors=True)  # the demo always starts afresh
    result = run(config)
    print(f"\nfinal metrics: { {k: round(v, 4) for k, v in result['metrics'].items()} }")
    print(f"loss by step (falling): {OUTPUT}/metrics.jsonl; adapter: {OUTPUT}/adapter; result: {OUTPUT}/result.json")


if __name__ == "__main__":
    main()
