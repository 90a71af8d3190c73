"""What bitsandbytes' NF4 layout costs here: QLoRA on MiniLM with the kernels
stored in torch's (out, in) order (peftjax's layout, bitsandbytes' blocks)
against the (in, out) order of an ``nnx.Linear`` kernel (peftjax's layout
before it followed bitsandbytes).

Both models are MiniLM-L6 with QLoRA (r=8, double quantisation) on every
linear layer but the head; only the order in which ``NF4Linear`` stores and
dequantises the kernel differs (the (in, out) model swaps in a subclass whose
``storage_order`` keeps the kernel's own axes). For each, XLA's cost analysis
of the compiled training step (FLOPs, bytes accessed) and its memory plan,
then the two steps timed interleaved, A B B A ..., so that load on the shared
CPU falls on both alike; the per-pair ratio's median is reported.

    python benchmarks/nf4_layout.py --json benchmarks/results/nf4_layout.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import peftjax
from peftjax.bench.suite import resolve_model
from peftjax.methods import qlora
from peftjax.models import from_pretrained


class InputMajorNF4Linear(qlora.NF4Linear):
    """NF4 blocks along the (in, out) kernel's output axis."""

    @staticmethod
    def storage_order(layout) -> str:
        return layout.kernel_spec


@contextlib.contextmanager
def nf4_layer(cls):
    """QLoRA quantises with ``cls`` inside the block."""
    original = qlora.NF4Linear
    qlora.NF4Linear = cls
    try:
        yield
    finally:
        qlora.NF4Linear = original


def build(folder, layer_cls, batch):
    model = from_pretrained(folder, task="classification", num_labels=2, config_overrides={
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})  # fmt: skip
    with nf4_layer(layer_cls):
        peftjax.apply(model, peftjax.QLoraConfig(rank=8, alpha=16.0, targets="all-linear"))
    assert all(type(w.base) is layer_cls for _, w in peftjax.iter_wrappers(model))

    def loss(m, b):
        logits = m(b["input_ids"], b["attention_mask"]).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits, b["labels"]).mean()

    state = peftjax.TrainState.create(model, peftjax.make_optimizer(model, optax.adamw(1e-4)))
    step = peftjax.make_train_step(loss)
    compiled = step.lower(state, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    memory = compiled.memory_analysis()
    hlo = compiled.as_text()
    counts = {
        "step_flops": float(cost["flops"]),
        "step_bytes_accessed": float(cost["bytes accessed"]),
        "temp_bytes": int(memory.temp_size_in_bytes),
        "argument_bytes": int(memory.argument_size_in_bytes),
        # Ops in the optimised program: a layout XLA could not absorb into the dots shows as transposes or copies.
        "hlo_ops": {op: len(re.findall(rf"= \S+ {op}\(", hlo)) for op in ("dot", "transpose", "copy", "fusion")},
    }
    return state, step, counts


def timed(step, state, batch):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])
    return state, time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=20, help="timed step pairs")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    _, folder = resolve_model("minilm")
    key = jax.random.key(0)
    batch = {
        "input_ids": jax.random.randint(key, (args.batch, args.seq), 1000, 30000),
        "attention_mask": jnp.ones((args.batch, args.seq), jnp.int32),
        "labels": jax.random.randint(jax.random.fold_in(key, 1), (args.batch,), 0, 2),
    }
    layouts = {"out_in": qlora.NF4Linear, "in_out": InputMajorNF4Linear}
    runs = {name: list(build(folder, cls, batch)) for name, cls in layouts.items()}
    for name, run in runs.items():
        for _ in range(args.warmup):
            run[0], _ = timed(run[1], run[0], batch)
    times = {name: [] for name in layouts}
    for pair in range(args.pairs):
        order = list(layouts) if pair % 2 == 0 else list(layouts)[::-1]
        for name in order:
            runs[name][0], seconds = timed(runs[name][1], runs[name][0], batch)
            times[name].append(seconds)
    ratios = [a / b for a, b in zip(times["out_in"], times["in_out"], strict=True)]
    result = {
        "command": "python benchmarks/nf4_layout.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "model": "minilm (MiniLM-L6), QLoRA r=8 all-linear, double quantisation, fp32",
        "batch": args.batch, "seq": args.seq, "pairs": args.pairs,
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "load_average_1min_after": os.getloadavg()[0], "jax": jax.__version__,
        "layouts": {
            name: {**runs[name][2], "median_step_s": statistics.median(times[name]), "step_s": times[name]}
            for name in layouts
        },
        "median_ratio_out_in_over_in_out": statistics.median(ratios),
        "ratio_quartiles": statistics.quantiles(ratios, n=4),
    }  # fmt: skip
    for name in layouts:
        row = result["layouts"][name]
        print(
            f"{name:7s} step GFLOP {row['step_flops'] / 1e9:9.3f}  "
            f"GB accessed {row['step_bytes_accessed'] / 1e9:7.3f}  "
            f"temp MB {row['temp_bytes'] / 1e6:8.1f}  HLO ops {row['hlo_ops']}  "
            f"median step {row['median_step_s'] * 1e3:7.1f} ms"
        )
    quartiles = ", ".join(f"{q:.3f}" for q in result["ratio_quartiles"])
    print(
        f"per-pair time ratio (out, in) / (in, out): median {result['median_ratio_out_in_over_in_out']:.3f}, "
        f"quartiles {quartiles}; load average after: {result['load_average_1min_after']:.1f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
