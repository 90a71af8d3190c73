"""Catastrophic forgetting: SST-2 (task A) then imdb-vs-yelp (task B) on one MiniLM encoder.

    nice -n 10 .venv/bin/python experiments/forgetting/run.py

Per seed: train A (task_a.yaml: full fine-tuning, A's head); measure A's test accuracy;
compute A's diagonal Fisher on 1,000 of A's training rows (``peftjax fisher``); save A's
encoder without its head as a checkpoint folder; train B on it with a new head, once per
arm of arms.yaml (plain full fine-tuning, L2-SP, EWC, LoRA); then put A's head back on
each B encoder and measure A's test accuracy again. Runs live in runs/forgetting/ (a
finished run is reused when the script is started again); results.json and results.md
are written next to this file.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import time

import numpy as np
import pandas as pd
import yaml
from safetensors.numpy import load_file, save_file

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from peftjax.cli import _load, main as peftjax_main  # noqa: E402
from peftjax.core.adapter_io import WEIGHTS_FILE, load_adapter  # noqa: E402
from peftjax.data import shared_data_dir  # noqa: E402
from peftjax.models.loading import save_pretrained  # noqa: E402
from peftjax.train import runner  # noqa: E402
from peftjax.train.sharding import make_mesh  # noqa: E402
from peftjax.train.tasks import evaluate, loss_and_stats  # noqa: E402

SEEDS = (0, 1, 2)
FISHER_EXAMPLES = 1000
HEAD = ("classifier.kernel", "classifier.bias")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
LOSS = loss_and_stats("classification")  # one function: its jitted evaluation compiles once


def log(line: str) -> None:
    print(time.strftime("%H:%M:%S"), line, flush=True)


def write_domains(folder: pathlib.Path) -> None:
    """imdb (0) vs yelp (1): 2,000 sentences, one permutation by numpy seed 0, 1,500 / 500."""
    source = shared_data_dir() / "sentiment_domains"
    frames = [pd.read_csv(source / f"{name}.tsv", sep="\t", quoting=3, keep_default_na=False).assign(label=label)
              for label, name in enumerate(("imdb", "yelp"))]
    table = pd.concat(frames, ignore_index=True)[["sentence", "label"]]
    table = table.iloc[np.random.default_rng(0).permutation(len(table))].reset_index(drop=True)
    folder.mkdir(parents=True, exist_ok=True)
    table.iloc[:1500].to_csv(folder / "train.tsv", sep="\t", index=False, quoting=3)
    table.iloc[1500:].to_csv(folder / "test.tsv", sep="\t", index=False, quoting=3)


def config(path: pathlib.Path, overrides: list[str], arm: dict | None = None, name: str | None = None):
    tree = yaml.safe_load(path.read_text())
    for key, value in (arm or {}).items():
        tree[key] = {**tree.get(key, {}), **value} if isinstance(value, dict) else value
    if name:
        tree["name"] = name
    resolved = pathlib.Path(overrides[0].split("=", 1)[1]).with_suffix(".yaml")  # beside the run's folder
    resolved.parent.mkdir(parents=True, exist_ok=True)
    resolved.write_text(yaml.safe_dump(tree, sort_keys=False))
    return _load(str(resolved), overrides)


def trained(cfg) -> dict:
    if (finished := runner.finished_result(cfg)) is not None:
        return finished
    shutil.rmtree(cfg.output_dir, ignore_errors=True)  # an interrupted run or another config's: start again
    log(f"train {cfg.name} -> {cfg.output_dir}")
    result = runner.run(cfg, progress=False)
    log(f"  test accuracy {result['metrics']['test_accuracy']:.4f}, {result['wall_time_s']:.0f} s")
    return result


def export_encoder(cfg_a, folder: pathlib.Path) -> pathlib.Path:
    """A's trained model as a checkpoint folder without A's head, with MiniLM's tokenizer."""
    if (folder / "model.safetensors").exists():
        return folder
    task, _ = runner.load_task(cfg_a)
    model = load_adapter(runner.build_model(cfg_a, task.num_labels), pathlib.Path(cfg_a.output_dir) / "adapter")
    save_pretrained(model, folder)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if not k.startswith("classifier.")}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer = cfg_a.model.tokenizer_dir()
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)
    return folder


def accuracy_on_a(task_a, cfg_a, cfg_b, head: dict[str, np.ndarray], *, trained_on_b: bool = True) -> float:
    """A's test accuracy of B's trained encoder (or, not ``trained_on_b``, of the encoder B
    starts from) carrying A's head."""
    model = runner.build_model(cfg_b, 2)
    if trained_on_b:
        model = load_adapter(model, pathlib.Path(cfg_b.output_dir) / "adapter")
    model.classifier.kernel[...] = head["classifier.kernel"]
    model.classifier.bias[...] = head["classifier.bias"]
    scores = evaluate(model, task_a.eval_loader(cfg_a.train.eval_batch_size, "test"), LOSS, make_mesh())
    return scores["accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "forgetting"))
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--override", nargs="*", default=[], help="key=value for every run (a smoke test)")
    args = parser.parse_args()
    out = pathlib.Path(args.out).absolute()
    domains = out / "domains"
    write_domains(domains)
    arms = yaml.safe_load((HERE / "arms.yaml").read_text())
    rows: dict[str, dict[str, list]] = {arm: {"a_before": [], "a_after": [], "b": [], "b_wall_s": []} for arm in arms}
    fisher_s, exported = [], []
    for seed in args.seeds:
        cfg_a = config(HERE / "task_a.yaml", [f"output_dir={out / 'task_a' / f'seed{seed}'}", f"train.seed={seed}",
                                              *args.override])
        result_a = trained(cfg_a)
        before = result_a["metrics"]["test_accuracy"]
        head = {k: v for k, v in load_file(str(pathlib.Path(cfg_a.output_dir) / "adapter" / WEIGHTS_FILE)).items()
                if k in HEAD}
        fisher = out / "task_a" / f"fisher_seed{seed}.safetensors"
        if not fisher.exists():
            log(f"fisher seed {seed}")
            started = time.perf_counter()
            code = peftjax_main(["fisher", str(pathlib.Path(cfg_a.output_dir).with_suffix(".yaml")),
                                 f"output_dir={cfg_a.output_dir}", f"train.seed={seed}", "train.eval_batch_size=8",
                                 *args.override, "--checkpoint", str(pathlib.Path(cfg_a.output_dir) / "adapter"),
                                 "--out", str(fisher), "--examples", str(FISHER_EXAMPLES)])
            assert code == 0, "peftjax fisher failed"
            fisher_s.append(time.perf_counter() - started)
        encoder = export_encoder(cfg_a, out / "task_a" / f"encoder_seed{seed}")
        task_a, _ = runner.load_task(cfg_a)
        for arm, spec in arms.items():
            spec = yaml.safe_load(yaml.safe_dump(spec).replace("{fisher}", str(fisher)))
            cfg_b = config(HERE / "task_b.yaml", [f"output_dir={out / arm / f'seed{seed}'}", f"train.seed={seed}",
                                                  f"model.path={encoder}", f"data.source={domains}", *args.override],
                           spec, name=f"forgetting_b_{arm}")
            if arm == next(iter(arms)):  # the saved encoder with A's head is task A's model
                exported.append([before, accuracy_on_a(task_a, cfg_a, cfg_b, head, trained_on_b=False)])
            result_b = trained(cfg_b)
            row = rows[arm]
            row["a_before"].append(before)
            row["a_after"].append(accuracy_on_a(task_a, cfg_a, cfg_b, head))
            row["b"].append(result_b["metrics"]["test_accuracy"])
            row["b_wall_s"].append(result_b["wall_time_s"])
            log(f"  {arm} seed {seed}: A {before:.4f} -> {row['a_after'][-1]:.4f}, B {row['b'][-1]:.4f}")
    write_results(rows, args, fisher_s, exported, out)


def mean_std(values) -> str:
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.4f}"


def write_results(rows, args, fisher_s, exported, out: pathlib.Path) -> None:
    payload = {"seeds": args.seeds, "overrides": args.override, "fisher_examples": FISHER_EXAMPLES,
               "fisher_wall_s": fisher_s, "a_accuracy_trained_vs_saved_encoder": exported, "arms": rows,
               "versions": runner.versions()}
    target = HERE if not args.override else out
    (target / "results.json").write_text(json.dumps(payload, indent=2))
    lines = ["| B trained with | A accuracy before B | A accuracy after B | forgetting (points) | B accuracy |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for arm, row in rows.items():
        drop = [100 * (b - a) for b, a in zip(row["a_before"], row["a_after"])]
        lines.append(f"| {arm} | {mean_std(row['a_before'])} | {mean_std(row['a_after'])} | "
                     f"{statistics.mean(drop):.1f} ± {statistics.stdev(drop) if len(drop) > 1 else 0.0:.1f} | "
                     f"{mean_std(row['b'])} |")
    (target / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
