"""XLA's compiled memory plan against the floor of ``peftjax.bench.floor``, every method, by term.

For each model and method the training step is compiled from abstract states (nothing
is allocated). XLA's plan (arguments + outputs - aliased + temporaries) must be at
least the floor. Where the gap lies comes from XLA's own buffer assignment: the step is
compiled with ``xla_dump_to``, whose live-range dump lists every buffer live at the
plan's peak; each is traced through the optimized HLO's stack frames
(``hlo_tools.py``) to the model code that made it and put in a term:

* ``arguments``: the train state and batch (the floor counts them exactly);
* ``attention``, ``norms``, ``ffn``, ``adapters``, ``head``: forward values kept for
  the backward pass, by the code that computed them (as the floor's terms; ``norms``
  includes the residual sums the norms read);
* ``argument copies``: elementwise copies of arguments (bf16 casts of float32 kernels,
  transposed layouts, dequantised kernels), which the floor never counts;
* ``backward``: values the backward pass made (gradients, their temporaries);
* ``optimizer update``, ``other``.

    python benchmarks/floor_check.py --json benchmarks/results/floor_check.json
    python benchmarks/summarize.py floor benchmarks/results/floor_check.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
from hlo_tools import ATTENTION, HloModule, Instruction, where  # noqa: E402

from peftjax.bench import analytic, floor  # noqa: E402
from peftjax.bench.methods import ALL_METHODS, method_config  # noqa: E402
from peftjax.bench.suite import BenchSpec, ModelBuilder, build_state  # noqa: E402
from peftjax.errors import PeftError  # noqa: E402
from peftjax.train.tasks import loss_and_stats  # noqa: E402
from peftjax.train.state import make_train_step  # noqa: E402

# (model, batch, seq, compute dtype): the shapes of the README's tables (bert-base: (a), llama-1b: (b)).
MODELS = {
    "bert-tiny": (4, 32, "fp32"),
    "bert-base": (8, 128, "fp32"),
    "llama-tiny": (4, 32, "bf16"),
    "llama-1b": (4, 512, "bf16"),
    "minilm": (32, 64, "fp32"),  # the HF PEFT comparison's step; not in the default run (--models minilm)
}
_PEAK = re.compile(r"Live ranges at \d+ \(peak\):\n(.*?)(?:\n\S|\Z)", re.S)
_LIVE = re.compile(r"^\s+([\w.\-]+)\{[\d,]*\}: (\d+) bytes", re.M)


def term(instruction: Instruction | None) -> str:
    """The term of a buffer live at XLA's peak (see the module docstring)."""
    if instruction is None:
        return "other"
    if instruction.opcode == "parameter":
        return "arguments"
    if instruction.phase == "backward":
        return "backward"
    module = instruction.module
    sources = [module.instruction(name) for name in instruction.operands]
    if instruction.kind != "matmul" and sources and all(s is not None and s.opcode == "parameter" for s in sources):
        return "argument copies"
    region = where(instruction)[0]
    if region in ("head and loss", "embeddings", "optimizer"):
        return {"head and loss": "head", "embeddings": "other", "optimizer": "optimizer update"}[region]
    functions = [f.function for f in instruction.stack]
    files = [f.file for f in instruction.stack]
    if any("/peftjax/methods/" in f or f.endswith("/peftjax/core/kernels.py") for f in files):
        return "adapters"
    if any(f.startswith(ATTENTION) or f.endswith("Attention.__call__") or f == "apply_rope" for f in functions):
        return "attention"
    if any("norm" in f.lower() for f in functions):
        return "norms"
    if any(f.endswith(("Intermediate.__call__", "MLP.__call__")) for f in functions):
        return "ffn"
    if region == "layer" and instruction.kind != "matmul":
        return "norms"  # the residual sums a norm reads (the layer's own code, or BERT's output block)
    return "other"


def peak_by_term(dump: Path, module: HloModule) -> dict[str, int]:
    """Bytes live at XLA's peak, by term, from the live-range dump of the step's module."""
    (report,) = [p for p in dump.glob("*cpu_after_optimizations-live-range.txt") if "_update" in p.name]
    found = _PEAK.search(report.read_text())
    terms: dict[str, int] = {}
    for name, size in _LIVE.findall(found.group(1)):
        key = term(module.instruction(name))
        terms[key] = terms.get(key, 0) + int(size)
    terms["total"] = sum(terms.values())
    return terms


def check(model: str, method: str, batch: int, seq: int, dtype: str) -> dict:
    builder = ModelBuilder(BenchSpec(model=model, methods=(method,), batch=batch, seq=seq, dtype=dtype, abstract=True))
    try:
        state = build_state(builder, method_config(method, builder.config.model_type))
    except PeftError as err:
        return {"method": method, "status": "skipped", "reason": str(err)}
    inputs = builder.batch(concrete=False)
    loss = loss_and_stats(builder.task)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        step = make_train_step(lambda m, b: loss(m, b), compiler_options={"xla_dump_to": folder})
        compiled = step.lower(state, inputs).compile()
        compile_s = time.perf_counter() - started
        module = HloModule(compiled.as_text())
        peak = peak_by_term(Path(folder), module)
    plan = analytic.compiled_memory(compiled)
    activations = floor.activation_floor(
        state.model(), state.tx.labels, batch=batch, seq=seq, compute_dtype=builder.dtype,
        causal_lm=builder.task == "causal_lm",
    )  # fmt: skip
    bound = floor.memory_floor(state, inputs, activations["total"])
    return {
        "method": method, "status": "ok", "xla_plan": plan, "floor": bound, "floor_activations": activations,
        "xla_peak_by_term": peak, "plan_over_floor": plan["total"] / bound["total"], "above_floor": plan["total"] >= bound["total"],
        "compile_s": round(compile_s, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="bert-tiny,bert-base,llama-tiny,llama-1b")
    parser.add_argument("--methods", default="all")
    parser.add_argument("--batch", type=int, help="instead of the model's batch in MODELS")
    parser.add_argument("--seq", type=int, help="instead of the model's sequence length in MODELS")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    methods = list(ALL_METHODS) if args.methods == "all" else args.methods.split(",")
    result = {"jax": jax.__version__, "models": {}}
    for model in args.models.split(","):
        batch, seq, dtype = MODELS[model]
        batch, seq = args.batch or batch, args.seq or seq
        rows = []
        for method in methods:
            row = check(model, method, batch, seq, dtype)
            rows.append(row)
            if row["status"] == "ok":
                print(f"{model} {method}: XLA {row['xla_plan']['total'] / 1e6:,.1f} MB, floor "
                      f"{row['floor']['total'] / 1e6:,.1f} MB, ratio {row['plan_over_floor']:.3f}", file=sys.stderr)
        result["models"][model] = {"batch": batch, "seq": seq, "dtype": dtype, "rows": rows}
        if args.json:  # after each model: a long run keeps what it has
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    below = [(m, r["method"]) for m, v in result["models"].items() for r in v["rows"] if r.get("above_floor") is False]
    print(f"XLA's plan below the floor: {below or 'nowhere'}")
    return result


if __name__ == "__main__":
    main()
