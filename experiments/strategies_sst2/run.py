"""Six transfer-learning recipes on MiniLM + SST-2 with the same budget, three seeds each.

    nice -n 10 .venv/bin/python experiments/strategies_sst2/run.py

Each arm is base.yaml with its entry of arms.yaml merged in, trained by the same
runner as ``peftjax train`` (runs/strategies_sst2/<arm>/seed<N>/, a finished run is
reused when the script is started again). Then, once per arm, XLA's count of the
compiled train step at batch 16 x 64 tokens: FLOPs and memory plan, per stage for
gradual unfreezing. Writes results.json and results.md next to this file.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import statistics
import sys
import time

import jax
import numpy as np
import yaml

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

from peftjax.bench.analytic import compiled_memory  # noqa: E402
from peftjax.cli import _load  # noqa: E402
from peftjax.strategies.base import step_loss  # noqa: E402
from peftjax.train import runner  # noqa: E402
from peftjax.train.state import TrainState, make_train_step  # noqa: E402

SEEDS = (0, 1, 2)


def merged(base: dict, arm: dict) -> dict:
    out = dict(base)
    for key, value in arm.items():
        out[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return out


def config_for(arm: str, seed: int, out: pathlib.Path, overrides=()):
    base = yaml.safe_load((HERE / "base.yaml").read_text())
    tree = merged(base, yaml.safe_load((HERE / "arms.yaml").read_text())[arm])
    folder = out / arm
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({**tree, "name": f"strategies_sst2_{arm}"}, sort_keys=False))
    return _load(str(path), [f"train.seed={seed}", f"output_dir={folder / f'seed{seed}'}", *overrides])


def train(arm: str, seed: int, out: pathlib.Path, log, overrides=()) -> dict:
    config = config_for(arm, seed, out, overrides)
    if (finished := runner.finished_result(config)) is not None:
        return finished
    shutil.rmtree(config.output_dir, ignore_errors=True)  # an interrupted run or another config's: start again
    log(f"train {arm} seed {seed}")
    result = runner.run(config, progress=False)
    log(f"  test accuracy {result['metrics']['test_accuracy']:.4f}, {result['wall_time_s']:.0f} s")
    return result


def long_batch(prep: runner.Prepared) -> dict:
    """A training batch of the longest bucket (16 x 64), as the step sees it."""
    loader = prep.train_loader
    for indices in loader.epoch_plan(0):
        batch = loader.batch(indices)
        if batch["input_ids"].shape[1] == prep.info.config.data.max_length:
            return batch
    raise RuntimeError("no batch of the longest bucket")


def xla_counts(arm: str, out: pathlib.Path, overrides=()) -> dict:
    """XLA's FLOPs and memory plan of the compiled step, per stage of the run."""
    config = config_for(arm, SEEDS[0], out / "xla", overrides)
    prep = runner.prepare(config)
    batch = {"train": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), long_batch(prep))}
    step = make_train_step(step_loss(config.data.task, prep.strategies))
    starts = sorted({0, *[s for own in prep.stage_starts for s in own]})
    stages = []
    for index, start in enumerate(starts):
        steps = (starts[index + 1] if index + 1 < len(starts) else prep.total_steps) - start
        state = TrainState.create(prep.model, prep.optimizer_at(start + 1))
        compiled = step.lower(state, batch).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        memory = compiled_memory(compiled)
        stages.append({"from_step": start + 1, "steps": steps, "flops": float(cost["flops"]),
                       "memory_plan_bytes": memory["total"], "trainable": len(state.tx.trainable_paths)})
    total = sum(s["steps"] for s in stages)
    return {"stages": stages, "mean_flops": sum(s["flops"] * s["steps"] for s in stages) / total,
            "max_memory_plan_bytes": max(s["memory_plan_bytes"] for s in stages)}


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "runs" / "strategies_sst2"))
    parser.add_argument("--arms", nargs="*", default=list(yaml.safe_load((HERE / "arms.yaml").read_text())))
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--override", nargs="*", default=[], help="key=value for every run (a smoke test)")
    args = parser.parse_args()
    out = pathlib.Path(args.out)
    started = time.time()

    def log(line: str) -> None:
        print(time.strftime("%H:%M:%S"), line, flush=True)

    rows = {}
    for arm in args.arms:
        results = [train(arm, seed, out, log, args.override) for seed in args.seeds]
        log(f"xla counts {arm}")
        counts = xla_counts(arm, out, args.override)
        accuracy = [r["metrics"]["test_accuracy"] for r in results]
        rows[arm] = {
            "test_accuracy": accuracy,
            "test_accuracy_mean_std": mean_std(accuracy),
            "seeds": args.seeds,
            "trainable_params": results[0]["params"]["trainable"],
            "total_params": results[0]["params"]["total"],
            "wall_time_s": [r["wall_time_s"] for r in results],
            "xla": counts,
        }
    payload = {"seeds": args.seeds, "overrides": args.override, "arms": rows, "versions": runner.versions(), "script_wall_s": time.time() - started}
    target = HERE if not args.override else out
    (target / "results.json").write_text(json.dumps(payload, indent=2))
    lines = [f"| arm | test accuracy (mean ± std, {len(args.seeds)} seeds) | trainable params | step GFLOPs (16 x 64) "
             "| XLA memory plan (MB) | wall time per run (s, mean) |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for arm, row in rows.items():
        mean, std = row["test_accuracy_mean_std"]
        lines.append(f"| {arm} | {mean:.4f} ± {std:.4f} | {row['trainable_params']:,} "
                     f"| {row['xla']['mean_flops'] / 1e9:.1f} | {row['xla']['max_memory_plan_bytes'] / 1e6:.0f} "
                     f"| {np.mean(row['wall_time_s']):.0f} |")
    (target / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
