"""What each of ``peftjax.models.lean_backward``'s backward passes saves, on the MiniLM step.

The models differentiate the exact GELU, LayerNorm/RMSNorm and attention (without
attention dropout) by hand-written VJPs that keep only what the derivative needs. Here
the step of the HF PEFT comparison (MiniLM-L6, batch 32 x 64, fp32; LoRA(q, v, r=8)
and full fine-tuning) is compiled from abstract states with each of them switched back
to JAX's own differentiation of the same forward operations, one at a time, and all at
once; plus the models as they were before (JAX's differentiation everywhere, attention
by ``jax.nn.dot_product_attention``). For every variant: XLA's memory plan, its FLOP and
bytes-accessed counts, and the buffers live at the plan's peak by term (as
``floor_check.py`` reads them), beside the floor.

    python benchmarks/lean_backward.py --json benchmarks/results/minilm_lean_backward.json
    python benchmarks/summarize.py lean benchmarks/results/minilm_lean_backward.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import floor_check  # noqa: E402
import jax  # noqa: E402
from flax import nnx  # noqa: E402
from hlo_tools import HloModule  # noqa: E402

from peftjax.bench import analytic, floor  # noqa: E402
from peftjax.bench.methods import method_config  # noqa: E402
from peftjax.bench.suite import BenchSpec, ModelBuilder, build_state  # noqa: E402
from peftjax.models import common, lean_backward  # noqa: E402
from peftjax.train.state import make_train_step  # noqa: E402
from peftjax.train.tasks import loss_and_stats  # noqa: E402

PARTS = ("gelu", "norms", "attention")


@contextlib.contextmanager
def differentiated_by_jax(parts: tuple[str, ...], *, attention_by_jax_nn: bool = False):
    """While inside, the models differentiate ``parts`` the way JAX does, from the same
    forward operations (attention: ``explicit_attention`` without dropout); with
    ``attention_by_jax_nn``, attention is ``jax.nn.dot_product_attention`` (the models before)."""
    saved = (common.ACTIVATIONS["gelu"], lean_backward.LayerNorm.__call__, lean_backward.RMSNorm.__call__,
             common.dot_product_attention)  # fmt: skip
    try:
        if "gelu" in parts:
            common.ACTIVATIONS["gelu"] = functools.partial(jax.nn.gelu, approximate=False)
        if "norms" in parts:
            lean_backward.LayerNorm.__call__ = nnx.LayerNorm.__call__
            lean_backward.RMSNorm.__call__ = nnx.RMSNorm.__call__
        if attention_by_jax_nn:
            common.dot_product_attention = lambda q, k, v, mask, *, dropout: jax.nn.dot_product_attention(
                q, k, v, mask=mask[:, None])
        elif "attention" in parts:
            common.dot_product_attention = common.explicit_attention
        yield
    finally:
        (common.ACTIVATIONS["gelu"], lean_backward.LayerNorm.__call__, lean_backward.RMSNorm.__call__,
         common.dot_product_attention) = saved  # fmt: skip


def variants() -> dict[str, dict]:
    """Name -> ``differentiated_by_jax`` arguments."""
    found = {
        "before: JAX differentiates all three, attention by jax.nn.dot_product_attention":
            dict(parts=PARTS, attention_by_jax_nn=True),
        "JAX differentiates all three": dict(parts=PARTS),
    }  # fmt: skip
    for part in PARTS:
        found[f"lean {part} only"] = dict(parts=tuple(p for p in PARTS if p != part))
    found["lean: all three (the models now)"] = dict(parts=())
    return found


def compile_variant(builder: ModelBuilder, method: str, switches: dict) -> dict:
    with differentiated_by_jax(**switches):
        state = build_state(builder, method_config(method, builder.config.model_type))
        inputs = builder.batch(concrete=False)
        loss = loss_and_stats(builder.task)
        with tempfile.TemporaryDirectory() as folder:
            step = make_train_step(lambda m, b: loss(m, b), compiler_options={"xla_dump_to": folder})
            compiled = step.lower(state, inputs).compile()
            peak = floor_check.peak_by_term(Path(folder), HloModule(compiled.as_text()))
    cost = compiled.cost_analysis()
    activations = floor.activation_floor(state.model(), state.tx.labels, batch=builder.spec.batch,
                                         seq=builder.spec.seq, compute_dtype=builder.dtype, causal_lm=False)
    return {
        "xla_plan": analytic.compiled_memory(compiled), "xla_peak_by_term": peak,
        "flops": float(cost["flops"]), "transcendentals": float(cost.get("transcendentals", 0.0)),
        "bytes_accessed": float(cost["bytes accessed"]),
        "floor": floor.memory_floor(state, inputs, activations["total"]), "floor_activations": activations,
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm", choices=sorted(floor_check.MODELS))
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    batch, seq, dtype = floor_check.MODELS[args.model]
    result = {"jax": jax.__version__, "model": args.model, "batch": batch, "seq": seq, "dtype": dtype, "methods": {}}
    for method in args.methods.split(","):
        builder = ModelBuilder(BenchSpec(model=args.model, methods=(method,), batch=batch, seq=seq, dtype=dtype,
                                         abstract=True))  # fmt: skip
        rows = result["methods"][method] = {}
        for name, switches in variants().items():
            rows[name] = row = compile_variant(builder, method, switches)
            print(f"{method} | {name}: XLA plan {row['xla_plan']['total'] / 1e6:,.1f} MB "
                  f"(temps {row['xla_plan']['temp'] / 1e6:,.1f}), {row['flops'] / 1e9:,.2f} GFLOP, "
                  f"{row['bytes_accessed'] / 1e9:,.2f} GB accessed", file=sys.stderr)  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
