"""``make demo``: fine-tune the pretrained MiniLM encoder with LoRA for sentiment.

The embedded default picks its data in this order and says which it used:
SST-2 from ``../shared/data/sst2`` when present, else ``glue``/``sst2`` from
the Hugging Face hub when it is reachable, else the Amazon review sentences
that ship inside peftjax (``peftjax/data/bundled/amazon_reviews``: 800
training and 200 test sentences from the UCI "Sentiment Labelled Sentences"
data set, CC BY 4.0; see the README there). Every run fine-tunes the real
pretrained MiniLM-L6 (installed by ``make setup``), so every run learns.
What it prints at the end is read from the run's own results.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket

from peftjax.config import ExperimentConfig
from peftjax.data import sst2_path
from peftjax.train.runner import run

OUTPUT = "runs/demo"
BUNDLED_REVIEWS = pathlib.Path(__file__).parent / "data" / "bundled" / "amazon_reviews"


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def default_config(output_dir: str = OUTPUT) -> tuple[ExperimentConfig, str]:
    """The demo's experiment and a sentence saying which data it uses."""
    lora = {"type": "lora", "targets": ["query", "value"], "rank": 8, "alpha": 16, "also_train": [r"classifier\..*"]}
    learning_rate = 1e-3
    train = {"batch_size": 32, "steps": 150, "eval_every": 75, "checkpoint_every": 75, "log_every": 25}
    text = {"text_columns": ["sentence"], "label_column": "label", "max_length": 64, "group_by_length": True}
    if (sst2_path() / "train.tsv").is_file():
        data = {"source": "shared:sst2", "train_split": "train.tsv", "eval_split": "dev.tsv", "test_split": "test.tsv",
                "max_train_rows": 4800, "max_eval_rows": 872, **text}
        said = f"SST-2 from {sst2_path()} (4,800 training rows, 150 steps)"
    elif _hub_reachable():
        data = {"source": "hub:glue", "subset": "sst2", "train_split": "train", "eval_split": "validation",
                "max_train_rows": 4800, **text}
        said = "SST-2 from the Hugging Face hub (glue/sst2)"
    else:
        # Short sentences (96% fit in 32 tokens): one batch shape, so one compilation.
        data = {"source": str(BUNDLED_REVIEWS), "train_split": "train.tsv", "test_split": "test.tsv", **text,
                "max_length": 32, "bucket_lengths": [32], "group_by_length": False}
        train = {"batch_size": 16, "steps": 60, "eval_every": 0, "checkpoint_every": 30, "log_every": 10}
        learning_rate = 3e-3  # 60 steps: a higher rate than SST-2's 150
        said = ("the 800 Amazon review sentences bundled with peftjax (no SST-2 found, hub unreachable; "
                f"UCI Sentiment Labelled Sentences, CC BY 4.0, in {BUNDLED_REVIEWS}), 60 steps")
    config = ExperimentConfig.from_dict({
        "name": "demo", "output_dir": output_dir, "model": {"name": "minilm"}, "methods": [lora],
        "data": {"task": "classification", **data},
        "optim": {"name": "adamw", "learning_rate": learning_rate, "weight_decay": 0.01},
        "schedule": {"warmup_ratio": 0.06, "decay": "linear"}, "train": train,
    })
    return config, said


def loss_trend(output_dir: str) -> str:
    """What metrics.jsonl says the training loss did, from its first logged step to its last."""
    records = [json.loads(line) for line in (pathlib.Path(output_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
    (first_step, first), (last_step, last) = losses[0], losses[-1]
    direction = "fell" if last < first else "did not fall"
    return f"training loss {direction}: {first:.3f} at step {first_step} -> {last:.3f} at step {last_step}"


def main(output_dir: str = OUTPUT) -> dict:
    config, said = default_config(output_dir)
    print(f"peftjax demo: {config.model.name} + LoRA(query, value, r={config.methods[0]['rank']}) on {said}\n")
    shutil.rmtree(output_dir, ignore_errors=True)  # the demo always starts afresh
    result = run(config)
    print(f"\nfinal metrics: { {k: round(v, 4) for k, v in result['metrics'].items()} }")
    print(f"{loss_trend(output_dir)} ({output_dir}/metrics.jsonl)")
    print(f"adapter: {output_dir}/adapter; result: {output_dir}/result.json")
    return result


if __name__ == "__main__":
    main()
