"""What XLA compiles a MiniLM training step into, per layer: the evidence that needs no clock.

Builds the peftjax step of ``compare_hf_peft.py`` (MiniLM-L6, batch 32 x 64, fp32, dropout off,
LoRA(query, value, r=8) and full fine-tuning), compiles it with the process's XLA
options (``XLA_FLAGS`` is recorded) and reads the optimized HLO (``hlo_tools.py``).
Each instruction is traced through its Python stack to the model code that made it,
so the layers' share can be divided by the layer count. Counted, per layer and per
phase (forward, backward, outside the derivative):

* instructions by kind (phase ``outside`` is the optimizer update and work on frozen
  values alone, which has no derivative): matmul (a fusion with a dot, mostly YNNPACK's), layout (a copy
  or transpose, alone or fused into an elementwise loop), reduce, elementwise;
* the bytes each reads and writes (operands + output): elementwise and layout work on
  a CPU is bound by them;
* the attention products: their operand shapes, layouts and dimension numbers.

The two attention paths are compiled side by side: ``lean`` (``lean_backward.attention``,
what the models run without attention dropout) and ``explicit`` (the written-out softmax
as JAX differentiates it, kept for attention dropout). The same counts are made for the attention and GELU
programs ``cpu_kernels.py`` times alone, to set the in-step op groups beside them.

Last, which threads exist and which of them burn CPU during three steps (a census,
not a timing: CPU seconds per thread name).

    python benchmarks/step_hlo.py --json benchmarks/results/minilm_step_hlo.json
    python benchmarks/summarize.py hlo benchmarks/results/minilm_step_hlo.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import cpu_kernels  # noqa: E402
from comparison import LEARNING_RATE, WEIGHT_DECAY, Source, make_batch, set_targets  # noqa: E402
from peftjax_side import peftjax_model  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from hlo_tools import ATTENTION, HloModule, Instruction, where  # noqa: E402

import peftjax  # noqa: E402
from peftjax.models import common  # noqa: E402
from peftjax.train.tasks import loss_and_stats  # noqa: E402

PHASES = ("forward", "backward", "outside")
KINDS = ("matmul", "layout", "reduce", "elementwise")


def explicit_attention(q, k, v, mask, *, dropout):
    return common.explicit_attention(q, k, v, mask, dropout=dropout)


def census(instructions: list[Instruction], divide: int = 1) -> dict:
    """Count and bytes by phase and kind (divided by ``divide``, the layer count)."""
    table = {phase: {kind: {"count": 0, "bytes": 0} for kind in KINDS} for phase in PHASES}
    for i in instructions:
        cell = table[i.phase][i.kind]
        cell["count"] += 1
        cell["bytes"] += i.operand_bytes + i.output_bytes
    for phase in table.values():
        for cell in phase.values():
            cell["count"] /= divide
            cell["bytes"] /= divide
    return table


def dot_line(instruction: Instruction) -> str:
    """The dot inside a matmul fusion: operand shapes with layouts, dimension numbers."""
    for inner in instruction.body or [instruction]:
        if inner.opcode == "dot":
            operands = [_shape_in(instruction, name) for name in inner.operands]
            dims = " ".join(part for part in inner.rest.split(", ") if "_dims=" in part)
            return f"{inner.shape} = dot({', '.join(operands)}) {dims}"
    return instruction.shape


def _shape_in(instruction: Instruction, name: str) -> str:
    for inner in instruction.body:
        if inner.name == name:
            return inner.shape
    return name


def analyse(module: HloModule, layers: int) -> dict:
    placed = [(i, *where(i)) for i in module.instructions]
    in_layers = [i for i, region, _ in placed if region == "layer"]
    by_region = collections.defaultdict(list)
    for i, region, _ in placed:
        by_region[region].append(i)
    components = collections.defaultdict(list)
    for i, region, component in placed:
        if region == "layer":
            components[component].append(i)
    attention = [i for i, region, c in placed if region == "layer" and c.split(" | ")[1].startswith(ATTENTION)]
    layout = collections.Counter()
    for i, region, component in placed:
        if region == "layer" and i.kind == "layout":
            ops = "+".join(sorted(i.body_opcodes))
            layout[f"{i.phase} | {component} | {ops} {i.shape}"] += 1
    return {
        "instructions": len(module.instructions),
        "per_region": {r: census(v) for r, v in by_region.items()},
        "per_layer": census(in_layers, layers),
        "per_layer_by_component": {c: census(v, layers) for c, v in sorted(components.items())},
        "layout_ops_per_layer": {k: v / layers for k, v in sorted(layout.items())},
        "attention_matmuls_per_layer": dict(collections.Counter(
            f"{i.phase}: {dot_line(i)}" for i in attention if i.kind == "matmul"
        ).most_common()),  # fmt: skip
        "layers": layers,
        "ops_traced_to_source": sum(1 for i, _, _ in placed if i.stack) / max(len(placed), 1),
    }


def build_step(method: str, attention: str):
    """The compiled MiniLM step of compare_hf_peft.py, with ``attention`` = lean or explicit."""
    args = types.SimpleNamespace(model="minilm", method=method, dtype="fp32", batch=32, seq=64, rank=8, alpha=16.0,
                                 targets=None, dropout=False)
    source = Source.resolve("minilm")
    set_targets(args, source)
    saved = common.dot_product_attention
    if attention == "explicit":
        common.dot_product_attention = explicit_attention
    try:
        model = peftjax_model(args, source)
        tx = peftjax.make_optimizer(model, optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY))
        state = peftjax.TrainState.create(model, tx)
        batch = {k: jnp.asarray(v, jnp.int32) for k, v in make_batch(args, source).items()}
        loss = loss_and_stats(source.task.loss)
        compiled = peftjax.make_train_step(lambda m, b: loss(m, b)).lower(state, batch).compile()
    finally:
        common.dot_product_attention = saved
    return compiled, state, batch, source.config.num_hidden_layers


def isolated_programs() -> dict[str, HloModule]:
    """cpu_kernels.py's attention and GELU programs (forward + backward, one layer's shapes)."""
    b, t, n, h, f = cpu_kernels.BATCH, cpu_kernels.SEQ, cpu_kernels.HEADS, cpu_kernels.HEAD_DIM, cpu_kernels.FFN
    q = k = v = jax.ShapeDtypeStruct((b, t, n, h), jnp.float32)
    mask = jnp.ones((b, t, t), bool)
    off = nnx.Dropout(0.0, rngs=nnx.Rngs(0))
    programs = {
        "attention, explicit": lambda q, k, v: common.explicit_attention(q, k, v, mask, dropout=off),
        "attention, lean (lean_backward.attention)": lambda q, k, v: common.dot_product_attention(
            q, k, v, mask, dropout=off),
    }  # fmt: skip
    found = {}
    for name, fn in programs.items():
        found[name] = HloModule(_fwd_bwd(fn).lower(q, k, v).compile().as_text())
    x = jax.ShapeDtypeStruct((b, t, f), jnp.float32)
    found["GELU exact (erf)"] = HloModule(_fwd_bwd(common.activation("gelu")).lower(x).compile().as_text())
    return found


def _fwd_bwd(fn):
    """As cpu_kernels.jax_forward_backward: the output and the input gradients of <output, cotangent>."""

    def both(*args):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(jnp.ones_like(out))

    return jax.jit(both)


def thread_census(compiled, state, batch, steps: int = 3) -> dict:
    """CPU seconds per thread name over ``steps`` steps, and the threads that exist."""
    from peftjax.bench.suite import run_compiled

    state, metrics = run_compiled(compiled, state, batch)
    jax.block_until_ready(metrics)

    def cpu_by_thread() -> dict[int, tuple[str, float]]:
        found = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
                fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            found[int(tid)] = (name, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
        return found

    before, start = cpu_by_thread(), time.perf_counter()
    for _ in range(steps):
        state, metrics = run_compiled(compiled, state, batch)
        jax.block_until_ready(metrics)
    wall, after = time.perf_counter() - start, cpu_by_thread()
    busy = collections.Counter()
    for tid, (name, seconds) in after.items():
        busy[f"{name} (main)" if tid == os.getpid() else name] += seconds - before.get(tid, (name, 0.0))[1]
    return {
        "threads_by_name": dict(collections.Counter(name for name, _ in after.values())),
        "cpu_s_per_step_by_thread_name": {k: round(v / steps, 3) for k, v in busy.most_common() if v > 0},
        "wall_s_per_step": round(wall / steps, 3),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "load_avg": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = {
        "config": {"model": "minilm", "batch": 32, "seq": 64, "dtype": "fp32", "dropout": False,
                   "lora": "query,value r=8 alpha=16"},
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "settings": {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")},
        "versions": {"jax": jax.__version__, "numpy": np.__version__},
        "steps": {},
    }  # fmt: skip
    for method in args.methods.split(","):
        for attention in ("lean", "explicit"):
            compiled, state, batch, layers = build_step(method, attention)
            cost = compiled.cost_analysis()
            row = analyse(HloModule(compiled.as_text()), layers)
            row["xla_flops"] = float(cost["flops"])
            row["xla_bytes_accessed"] = float(cost["bytes accessed"])
            row["memory_temp_bytes"] = int(compiled.memory_analysis().temp_size_in_bytes)
            if attention == "lean":
                row["threads"] = thread_census(compiled, state, batch)
            result["steps"][f"{method}, {attention}"] = row
            print(f"{method}, {attention}: {row['instructions']} instructions, per layer "
                  + ", ".join(f"{p} {sum(c['count'] for c in row['per_layer'][p].values()):.0f}" for p in PHASES),
                  file=sys.stderr)  # fmt: skip
    result["isolated"] = {}
    for name, module in isolated_programs().items():
        result["isolated"][name] = {"instructions": len(module.instructions), "census": census(module.instructions),
                                    "matmuls": [dot_line(i) for i in module.instructions if i.kind == "matmul"]}
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
