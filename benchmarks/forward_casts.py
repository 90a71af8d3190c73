"""Where XLA's count of the unmerged forward overhead leaves the analytic formula: the casts.

For LoRA and IA3 on Llama presets (abstract: shapes only, nothing allocated), in fp32 and
in bf16 compute over fp32 parameters: XLA's forward FLOPs with the adapters unmerged
minus without, the formula of ``analytic.forward_overhead``, their gap, and the
elements of every ``convert`` in the optimized HLO (fusions included) with the
adapters minus without. XLA's cost analysis counts a FLOP per converted element, so a
gap that equals the extra converts is the casts and nothing else.

    python benchmarks/forward_casts.py --json benchmarks/results/forward_casts.json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import jax  # noqa: E402
from flax import nnx  # noqa: E402
from hlo_tools import HloModule  # noqa: E402

from peftjax.bench import analytic  # noqa: E402
from peftjax.bench.methods import method_config  # noqa: E402
from peftjax.bench.suite import BenchSpec, ModelBuilder  # noqa: E402
from peftjax.core.inject import apply  # noqa: E402
from peftjax.train.tasks import call_model  # noqa: E402


def flops_and_converts(model: nnx.Module, inputs: dict) -> tuple[float, int]:
    copy = nnx.eval_shape(lambda m: m, model)
    copy.eval()
    graphdef, state = nnx.split(copy)
    compiled = jax.jit(lambda state, inputs: call_model(nnx.merge(graphdef, state), inputs)).lower(state, inputs)
    compiled = compiled.compile()
    converted = 0
    for body in HloModule(compiled.as_text()).computations.values():
        for instruction in body:
            if instruction.opcode == "convert":
                dims = re.findall(r"\[([\d,]*)\]", instruction.shape)[0]
                converted += math.prod(int(d) for d in dims.split(",") if d)
    return float(compiled.cost_analysis()["flops"]), converted


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="llama-tiny,llama-1b")
    parser.add_argument("--methods", default="lora:rank=4,lora,lora:rank=16,ia3")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for model in args.models.split(","):
        for dtype in ("fp32", "bf16"):
            builder = ModelBuilder(BenchSpec(model=model, methods=(), batch=args.batch, seq=args.seq, dtype=dtype,
                                             abstract=True))  # fmt: skip
            inputs = {k: v for k, v in builder.batch(concrete=False).items() if k != "labels"}
            base_flops, base_converts = flops_and_converts(nnx.eval_shape(builder), inputs)
            for method in args.methods.split(","):
                adapted = nnx.eval_shape(lambda: apply(builder(), method_config(method, builder.config.model_type)))
                flops, converts = flops_and_converts(adapted, inputs)
                formula, _ = analytic.forward_overhead(adapted, args.batch * args.seq)
                row = {"model": model, "dtype": dtype, "method": method, "xla_overhead_flops": flops - base_flops,
                       "analytic_flops": formula, "gap_flops": flops - base_flops - formula,
                       "extra_converted_elements": converts - base_converts}  # fmt: skip
                rows.append(row)
                print(f"{model} {dtype} {method}: XLA {row['xla_overhead_flops'] / 1e9:.4f} GFLOP, formula "
                      f"{formula / 1e9:.4f}, gap {row['gap_flops'] / 1e9:.4f}, extra converts "
                      f"{row['extra_converted_elements'] / 1e9:.4f} G elements")  # fmt: skip
    result = {"batch": args.batch, "seq": args.seq, "param_dtype": "fp32", "jax": jax.__version__, "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
