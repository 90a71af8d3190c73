"""The same experiment in PyTorch with transformers + HF PEFT, for comparison.

Reads the same config.yaml and takes its batches from peftjax's data loader,
so both frameworks train on the same token ids, in the same order, with the
same batch size, epochs, optimizer (AdamW, weight decay, clipping) and
warmup-then-linear schedule. Writes ``hf_peft_result.json`` beside the config,
in the schema of peftjax's ``result.json``.

    .venv/bin/python experiments/sst2_minilm_lora/hf_peft_train.py [--steps N]
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import time
from importlib.metadata import version

import numpy as np
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import BertForSequenceClassification, get_linear_schedule_with_warmup

from peftjax.config import load_config
from peftjax.data import load_data, load_tokenizer

HERE = pathlib.Path(__file__).resolve().parent


def to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    keys = ("input_ids", "attention_mask", "token_type_ids")
    return {k: torch.from_numpy(batch[k]).long() for k in keys if k in batch}


@torch.no_grad()
def evaluate(model, loader) -> dict[str, float]:
    model.eval()
    correct = loss_sum = count = 0.0
    for batch in loader:
        logits = model(**to_torch(batch)).logits.float()
        labels, weights = torch.from_numpy(batch["labels"]).long(), torch.from_numpy(batch["weights"])
        losses = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
        correct += float(((logits.argmax(-1) == labels).float() * weights).sum())
        loss_sum += float((losses * weights).sum())
        count += float(weights.sum())
    model.train()
    return {"accuracy": correct / count, "loss": loss_sum / count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(HERE / "config.yaml"))
    parser.add_argument("--out", default=str(HERE / "hf_peft_result.json"))
    parser.add_argument("--steps", type=int, default=None, help="stop early (smoke runs)")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = load_config(args.config)
    started = time.perf_counter()
    folder = config.model.checkpoint_dir()
    task = load_data(config.data, load_tokenizer(folder))
    loop, optim = config.train, config.optim
    loader = task.train_loader(loop.batch_size, seed=loop.seed)
    total = args.steps or math.ceil(loop.epochs * loader.steps_per_epoch)

    model = BertForSequenceClassification.from_pretrained(str(folder), num_labels=task.num_labels)
    lora = config.method_dicts()[0]
    peft_config = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora["rank"], lora_alpha=lora["alpha"],
                             target_modules=list(lora["targets"]), lora_dropout=0.0)
    model = get_peft_model(model, peft_config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=optim.learning_rate, betas=(optim.b1, optim.b2), eps=optim.eps,
                                  weight_decay=optim.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, config.schedule.warmup_for(total), total)
    model.train()
    batches = loader.iterate()
    for step in range(1, total + 1):
        batch = next(batches)
        loss = model(**to_torch(batch), labels=torch.from_numpy(batch["labels"]).long()).loss
        loss.backward()
        if optim.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(trainable, optim.max_grad_norm)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % loop.log_every == 0:
            print(f"step {step}/{total} loss {loss.item():.4f}", flush=True)

    metrics = {}
    for split in ("eval", "test"):
        found = evaluate(model, task.eval_loader(loop.eval_batch_size, split))
        metrics.update({f"{split}_{k}": v for k, v in found.items()})
    n_trainable = sum(p.numel() for p in trainable)
    result = {
        "config": config.to_dict(),
        "params": {"trainable": n_trainable, "total": sum(p.numel() for p in model.parameters())},
        "metrics": metrics,
        "best_step": None,
        "steps": total,
        "wall_time_s": time.perf_counter() - started,
        "peak_memory_bytes": None,
        "versions": {"python": platform.python_version(), "device": "cpu",
                     **{name: version(name) for name in ("torch", "transformers", "peft")}},
    }
    pathlib.Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
