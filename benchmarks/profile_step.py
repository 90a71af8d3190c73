"""Where a training step's time goes, peftjax against PyTorch + HF PEFT, op by op.

Builds both sides exactly as ``compare_hf_peft.py`` does (same checkpoint, method, batch,
sequence length, dropout off), warms them up, then profiles ``--steps`` steps of each:

* peftjax: ``jax.profiler`` trace, read back with xprof's trace viewer; every compiled HLO
  instruction's time is grouped as a matmul (by output shape) or as a fusion (by the ops
  inside it), and put in a category by the model code that made it (``hlo_tools.where``):
  attention is what ``peftjax.models.common``'s attention compiled to, forward and backward;
* PyTorch: ``torch.profiler``, self CPU time per aten op; attention is the
  scaled-dot-product kernels (and ``bmm`` / softmax, should its math path run).

    python benchmarks/profile_step.py --method lora --batch 32 --seq 64 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comparison import Source, make_batch, set_targets, uptime  # noqa: E402
from hf_side import HFSide  # noqa: E402
from hlo_tools import ATTENTION, FREE, HloModule, Instruction, where  # noqa: E402
from peftjax_side import PeftjaxSide  # noqa: E402

import jax  # noqa: E402
import torch  # noqa: E402

from peftjax.models import common  # noqa: E402

GROUPS_SHOWN = 15
CATEGORIES = ("matmuls outside attention", "attention", "FFN activation (GELU, bias)", "other")


def categorise_aten(op: str) -> str:
    """One of CATEGORIES for an aten op name."""
    if op in ("aten::mm", "aten::addmm"):
        return CATEGORIES[0]
    if "attention" in op or "softmax" in op or op == "aten::bmm":
        return CATEGORIES[1]
    if "gelu" in op:
        return CATEGORIES[2]
    return CATEGORIES[3]


def categorise_hlo(instruction: Instruction) -> str:
    """One of CATEGORIES for a compiled instruction, by the model code that made it."""
    region, component = where(instruction)
    if region == "layer" and component.split(" | ")[1].startswith(ATTENTION):
        return CATEGORIES[1]
    if instruction.kind == "matmul":
        return CATEGORIES[0]
    if region == "layer" and "intermediate" in component:
        return CATEGORIES[2]
    return CATEGORIES[3]


def group(instruction: Instruction) -> str:
    """'matmul f32[2048,384]' or 'fused add,exponential,... f32[...]'."""
    if instruction.kind == "matmul":
        return f"matmul {instruction.shape}"
    ops = sorted(instruction.body_opcodes - FREE - {"broadcast"})
    return f"fused {','.join(ops) or instruction.opcode} {instruction.shape}"


def profile_peftjax(side, steps: int) -> tuple[dict[str, float], dict[str, float]]:
    """Milliseconds per step by HLO instruction group, and by category."""
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        for _ in range(steps):
            side.step()
        jax.profiler.stop_trace()
        from xprof.convert import raw_to_tool_data

        (trace_file,) = glob.glob(f"{folder}/plugins/profile/*/*.xplane.pb")
        events = json.loads(raw_to_tool_data.xspace_to_tool_data([trace_file], "trace_viewer", {})[0])["traceEvents"]
    module = HloModule(side.compiled.as_text())
    groups: collections.Counter = collections.Counter()
    categories = dict.fromkeys(CATEGORIES, 0.0)
    for event in events:
        instruction = module.instruction(event["name"]) if event.get("ph") == "X" else None
        if instruction is not None:
            ms = event.get("dur", 0) / 1e3 / steps
            groups[group(instruction)] += ms
            categories[categorise_hlo(instruction)] += ms
    return dict(groups.most_common()), categories


def profile_torch(side, steps: int) -> dict[str, float]:
    """Milliseconds per step by aten op (self time)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            side.step()
    totals = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages() if e.self_cpu_time_total > 0}
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("lora", "full"), default="lora")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--attention", choices=("lean", "explicit"), default="lean",
                        help="peftjax's attention without dropout: lean_backward.attention (what the models run) "
                             "or the explicit softmax (what they ran before)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    options = types.SimpleNamespace(model="minilm", method=args.method, dtype="fp32", rank=8, alpha=16.0, targets=None,
                                    dropout=False, batch=args.batch, seq=args.seq)
    source = Source.resolve("minilm")
    set_targets(options, source)
    batch = make_batch(options, source)
    if args.attention == "explicit":
        common.dot_product_attention = lambda q, k, v, mask, *, dropout: common.explicit_attention(
            q, k, v, mask, dropout=dropout)
    result = {"config": vars(options) | {"steps": args.steps, "attention": args.attention}, "load_before": uptime()}
    for side_class in (PeftjaxSide, HFSide):
        side = side_class(options, source, batch)
        for _ in range(2):
            side.step()
        if side_class is PeftjaxSide:
            groups, by_category = profile_peftjax(side, args.steps)
        else:
            groups = profile_torch(side, args.steps)
            by_category = dict.fromkeys(CATEGORIES, 0.0)
            for name, ms in groups.items():
                by_category[categorise_aten(name)] += ms
        result[side.name] = {"total_ms_per_step": sum(groups.values()), "categories_ms_per_step": by_category,
                             "groups_ms_per_step": groups}
        print(f"\n{side.name}: {sum(groups.values()):.0f} ms per step in compiled ops / aten ops")
        print("  " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in by_category.items()))
        for name, ms in list(groups.items())[:GROUPS_SHOWN]:
            print(f"  {ms:8.1f} ms  {name}")
    result["load_after"] = uptime()
    result["targets"] = list(options.targets)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
