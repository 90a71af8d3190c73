"""Where a training step's time goes, peftjax against PyTorch + HF PEFT, op by op.

Builds both sides exactly as ``compare_hf_peft.py`` does (same checkpoint, method, batch,
sequence length, dropout off), warms them up, then profiles ``--steps`` steps of each:

* peftjax: ``jax.profiler`` trace, read back with xprof's trace viewer; every compiled HLO
  instruction's time is grouped as a matmul (by output shape) or as an elementwise / reduce
  fusion (by the ops inside it);
* PyTorch: ``torch.profiler``, self CPU time per aten op.

    python benchmarks/profile_step.py --method lora --batch 32 --seq 64 --json out.json
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import compare_hf_peft as compare  # noqa: E402
import jax  # noqa: E402
import torch  # noqa: E402

GROUPS_SHOWN = 15
CATEGORIES = ("matmuls outside attention", "attention", "FFN activation (GELU, bias)", "other")


def categorise(group: str, intermediate_size: int, heads_axis: str) -> str:
    """One of CATEGORIES for an HLO group or aten op name. XLA's attention ops are the ones
    with a heads axis in their shape; its FFN activation ops are elementwise on the
    intermediate width."""
    if group in ("aten::mm", "aten::addmm"):
        return CATEGORIES[0]
    if "attention" in group or "softmax" in group or heads_axis in group:
        return CATEGORIES[1]
    if group.startswith("matmul"):
        return CATEGORIES[0]
    if "gelu" in group or (group.startswith("fused") and f",{intermediate_size}]" in group):
        return CATEGORIES[2]
    return CATEGORIES[3]


def _instructions(hlo_text: str) -> dict[str, str]:
    """Instruction name -> its line, for every instruction of the compiled module."""
    found = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)", line)
        if match:
            found.setdefault(match.group(1), match.group(2))
    return found


def _group(name: str, line: str, hlo_text: str) -> str:
    """'matmul f32[2048,384]' or 'fused add,exponential,... f32[...]'."""
    shape = line.split(" ")[0]
    callee = re.search(r"calls=%?([\w.\-]+)", line)
    body = hlo_text[hlo_text.find(callee.group(1) + " "):].split("\n}")[0] if callee else line
    if " dot(" in body:
        return f"matmul {shape}"
    ops = set(re.findall(r"= \S+ (\w[\w\-]*)\(", body)) - {"parameter", "bitcast", "constant", "broadcast"}
    return f"fused {','.join(sorted(ops)) or name.split('.')[0]} {shape}"


def profile_peftjax(side, steps: int) -> dict[str, float]:
    """Milliseconds per step by HLO instruction group."""
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        for _ in range(steps):
            side.step()
        jax.profiler.stop_trace()
        from xprof.convert import raw_to_tool_data

        (trace_file,) = glob.glob(f"{folder}/plugins/profile/*/*.xplane.pb")
        events = json.loads(raw_to_tool_data.xspace_to_tool_data([trace_file], "trace_viewer", {})[0])["traceEvents"]
    hlo_text = side.compiled.as_text()
    instructions = _instructions(hlo_text)
    totals: collections.Counter = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and event["name"] in instructions:
            totals[_group(event["name"], instructions[event["name"]], hlo_text)] += event.get("dur", 0) / 1e3 / steps
    return dict(totals.most_common())


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
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    options = types.SimpleNamespace(method=args.method, rank=8, alpha=16, targets=("query", "value"), dropout=False,
                                    batch=args.batch, seq=args.seq)
    folder = compare.model_folder("minilm")
    batch = compare.make_batch(options, json.loads((folder / "config.json").read_text())["vocab_size"])
    model_config = json.loads((folder / "config.json").read_text())
    heads_axis = f"[{args.batch},{model_config['num_attention_heads']},"
    result = {"config": vars(options) | {"steps": args.steps}, "load_before": compare.uptime()}
    for side_class, profile in ((compare.PeftjaxSide, profile_peftjax), (compare.HFSide, profile_torch)):
        side = side_class(options, folder, batch)
        for _ in range(2):
            side.step()
        groups = profile(side, args.steps)
        by_category = dict.fromkeys(CATEGORIES, 0.0)
        for name, ms in groups.items():
            by_category[categorise(name, model_config["intermediate_size"], heads_axis)] += ms
        result[side.name] = {"total_ms_per_step": sum(groups.values()), "categories_ms_per_step": by_category,
                             "groups_ms_per_step": groups}
        print(f"\n{side.name}: {sum(groups.values()):.0f} ms per step in compiled ops / aten ops")
        print("  " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in by_category.items()))
        for name, ms in list(groups.items())[:GROUPS_SHOWN]:
            print(f"  {ms:8.1f} ms  {name}")
    result["load_after"] = compare.uptime()
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
