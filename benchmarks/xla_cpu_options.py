"""XLA CPU options on the MiniLM training step, timed in interleaved rounds in one process.

The step of ``compare_hf_peft.py`` (MiniLM-L6, batch 32 x 64, fp32, dropout off) is
compiled once per variant: XLA's default, each option in ``VARIANTS`` (passed as
per-executable ``compiler_options``, so all variants live in one process), and the
explicit attention path (the written-out softmax as JAX differentiates it, which the
models ran before ``lean_backward.attention``). With ``--hf`` (default), HF PEFT's step joins the rotation as the reference.
Every variant trains its own copy of the same initial state.

Each round times ``--steps`` steps of every variant, in an order rotated from round to
round, so drifting machine speed hits all alike; the reported time is the median of all
timed steps, with its ratio to XLA's default and to HF PEFT. Also recorded per variant:
which kernel library XLA handed each fusion to (``__ynn_fusion``, ``__xnn_fusion``,
oneDNN), the CPU seconds per step by thread name (does anything besides XLA's two
intra-op threads burn CPU?), and the loss after the last step (options that keep the
numerics give the default's loss).

This needs a quiet machine: on a shared one the medians move by more than the variants differ.

    python benchmarks/xla_cpu_options.py --method lora --json benchmarks/results/minilm_xla_cpu_options_lora.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import statistics
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comparison import LEARNING_RATE, WEIGHT_DECAY, Source, make_batch, set_targets, uptime  # noqa: E402
from peftjax_side import peftjax_model  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import peftjax  # noqa: E402
from peftjax.bench.suite import run_compiled  # noqa: E402
from peftjax.models import common  # noqa: E402
from peftjax.train.tasks import loss_and_stats  # noqa: E402

_FUSION = "LIBRARY_FUSION_TYPE_"
VARIANTS = {
    "default": {},
    "eigen single-threaded": {"xla_cpu_multi_thread_eigen": False},
    "fast math": {"xla_cpu_enable_fast_math": True},
    "no YNNPACK (XLA's own dots)": {"xla_cpu_experimental_ynn_fusion_type": ""},
    "YNNPACK dots + elementwise + reduce": {
        "xla_cpu_experimental_ynn_fusion_type": f"{_FUSION}DOT,{_FUSION}ELTWISE,{_FUSION}REDUCE"},
    "XNNPACK dots": {"xla_cpu_experimental_ynn_fusion_type": "", "xla_cpu_experimental_xnn_fusion_type": f"{_FUSION}DOT"},
    "oneDNN dots": {"xla_cpu_experimental_ynn_fusion_type": "",
                    "xla_cpu_experimental_onednn_fusion_type": f"{_FUSION}DOT"},
    "concurrency-optimized scheduler": {"xla_cpu_enable_concurrency_optimized_scheduler": True},
    "prefer 512-bit vectors": {"xla_cpu_prefer_vector_width": 512},
}  # fmt: skip
EXPLICIT = "explicit attention (before the switch)"


class Variant:
    """One compiled step and its own train state."""

    def __init__(self, name: str, options: dict, model, batch, loss, *, explicit: bool = False):
        self.name, self.options = name, options
        tx = peftjax.make_optimizer(model, optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY))
        self.state = peftjax.TrainState.create(model, tx)
        self.batch = batch
        saved = common.dot_product_attention
        if explicit:
            common.dot_product_attention = lambda q, k, v, mask, *, dropout: common.explicit_attention(
                q, k, v, mask, dropout=dropout)
        try:
            step = peftjax.make_train_step(lambda m, b: loss(m, b), compiler_options=options)
            self.compiled = step.lower(self.state, batch).compile()
        finally:
            common.dot_product_attention = saved
        text = self.compiled.as_text()
        self.libraries = dict(collections.Counter(re.findall(r'"kind":"(__\w+)"', text)))
        self.libraries["onednn custom calls"] = len(re.findall(r'custom_call_target="__onednn', text))
        self.loss = None

    def step(self) -> None:
        self.state, metrics = run_compiled(self.compiled, self.state, self.batch)
        jax.block_until_ready((self.state, metrics))
        self.loss = float(metrics["loss"])


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far by thread name (the main thread apart)."""
    found: collections.Counter = collections.Counter()
    for tid in os.listdir("/proc/self/task"):
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found[f"{name} (main)" if int(tid) == os.getpid() else name] += (int(fields[11]) + int(fields[12])) / os.sysconf(
            "SC_CLK_TCK")
    return dict(found)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", help="comma-separated names from VARIANTS (default: all)")
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="leave HF PEFT out of the rotation")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    options = types.SimpleNamespace(model="minilm", method=args.method, dtype="fp32", batch=32, seq=64, rank=8,
                                    alpha=16.0, targets=None, dropout=False)  # fmt: skip
    source = Source.resolve("minilm")
    set_targets(options, source)
    numpy_batch = make_batch(options, source)
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in numpy_batch.items()}
    model, loss = peftjax_model(options, source), loss_and_stats(source.task.loss)
    chosen = args.variants.split(",") if args.variants else list(VARIANTS)
    runners, failed = [], {}
    for name in chosen:
        try:
            runners.append(Variant(name, VARIANTS[name], model, batch, loss))
        except Exception as err:  # an option this jaxlib rejects: recorded, not fatal
            failed[name] = str(err).splitlines()[0]
    runners.append(Variant(EXPLICIT, {}, model, batch, loss, explicit=True))
    if args.hf:
        from hf_side import HFSide

        hf = HFSide(options, source, numpy_batch)
        hf.name, hf.libraries, hf.options = "HF PEFT (PyTorch)", {}, {}
        runners.append(hf)
    load_before = uptime()
    for runner in runners:
        for _ in range(2):
            runner.step()
    times = {r.name: [] for r in runners}
    cpu = {r.name: collections.Counter() for r in runners}
    for index in range(args.rounds):
        order = runners[index % len(runners):] + runners[: index % len(runners)]
        for runner in order:
            before = thread_cpu()
            for _ in range(args.steps):
                start = time.perf_counter()
                runner.step()
                times[runner.name].append(time.perf_counter() - start)
            after = thread_cpu()
            cpu[runner.name].update({k: v - before.get(k, 0.0) for k, v in after.items()})
        print(f"round {index}: " + ", ".join(f"{n} {statistics.median(t[-args.steps:]) * 1e3:.0f} ms"
                                             for n, t in times.items()), file=sys.stderr)  # fmt: skip
    default = statistics.median(times["default"]) if "default" in times else None
    reference = statistics.median(times["HF PEFT (PyTorch)"]) if args.hf else None
    rows = {}
    for runner in runners:
        median = statistics.median(times[runner.name])
        steps = len(times[runner.name])
        rows[runner.name] = {
            "options": runner.options, "median_step_s": median, "step_times_s": times[runner.name],
            "vs_default": median / default if default else None, "vs_hf_peft": median / reference if reference else None,
            "libraries": runner.libraries,
            "cpu_s_per_step_by_thread": {k: round(v / steps, 3) for k, v in cpu[runner.name].most_common() if v > 0},
            "loss_after": getattr(runner, "loss", None),
        }  # fmt: skip
    result = {"config": vars(options) | {"steps": args.steps, "rounds": args.rounds, "targets": list(options.targets)},
              "variants": rows, "rejected": failed, "load": {"before": load_before, "after": uptime()},
              "jax": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}  # fmt: skip
    for name, row in rows.items():
        print(f"{name:40s} {row['median_step_s'] * 1e3:7.1f} ms  vs default {row['vs_default'] or float('nan'):.3f}  "
              f"vs HF {row['vs_hf_peft'] or float('nan'):.3f}  {row['libraries']}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
