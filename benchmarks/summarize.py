"""Markdown tables from the committed benchmark JSON (``benchmarks/results/*.json``).

    python benchmarks/summarize.py bench benchmarks/results/bert_base_cpu.json
    python benchmarks/summarize.py compare benchmarks/results/minilm_*_vs_hf_peft.json
    python benchmarks/summarize.py nf4-layout benchmarks/results/nf4_layout.json

Every number in ``benchmarks/results/README.md`` comes out of this script, so the
summary cannot drift from the runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _num(value, spec: str, scale: float = 1.0) -> str:
    return "–" if value is None else format(value / scale, spec)


def bench_table(path: Path) -> str:
    rows = json.loads(path.read_text())
    timed = any(r.get("step_time_s") for r in rows)
    head = ["method", "trainable", "trainable %", "adapter MB", "step TFLOP", "vs full", "fwd +GFLOP (XLA / analytic)",
            "merged +", "XLA plan GB", "analytic floor GB", "XLA / floor"]
    if timed:
        head += ["step s (median)", "tokens/s", "load avg (1 min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| {r['method']} | skipped: {r.get('reason', '').split(':')[0]} |" + " |" * (len(head) - 2))
            continue
        cells = [
            r["method"], f"{r['trainable_params']:,}", f"{r['trainable_percent']:.4f}",
            _num(r["adapter_bytes"], ".3f", 1e6), _num(r["step_flops"], ".3f", 1e12),
            _num(r["flops_ratio_vs_full"], ".3f"),
            f"{_num(r['forward_overhead_flops'], '.3f', 1e9)} / {_num(r['forward_overhead_analytic'], '.3f', 1e9)}",
            _num(r["merged_overhead_flops"], ".0f"), _num(r["compiled_memory_bytes"], ".3f", 1e9),
            _num(r["analytic_floor_bytes"], ".3f", 1e9), _num(r.get("memory_ratio_compiled_vs_analytic"), ".3f"),
        ]  # fmt: skip
        if timed:
            load = r.get("load_avg_before")
            cells += [_num(r["step_time_s"], ".2f"), _num(r["tokens_per_s"], ",.0f"), _num(load and load[0], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    first = rows[0]
    lines.append("")
    lines.append(f"{first['model']} ({first['task']}), batch {first['batch']} x {first['seq']}, {first['dtype']} "
                 f"compute / {first['param_dtype']} parameters, {first['device']}, jax {first['jax']}"
                 + (", abstract" if first["abstract"] else f", median of {first['steps']} steps"))
    return "\n".join(lines)


def compare_table(paths: list[Path]) -> str:
    head = ["method", "dropout", "trainable (both)", "peftjax step s", "HF PEFT step s", "step-time ratio",
            "peftjax tokens/s", "HF tokens/s", "peftjax fwd / bwd+update s", "HF fwd / bwd+update s",
            "load (before → after)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for path in paths:
        r = json.loads(path.read_text())
        ours, theirs, cfg = r["peftjax"], r["hf_peft"], r["config"]

        def split(row):
            if "forward_time_s" not in row:
                return "–"
            return f"{row['forward_time_s']:.3f} / {row['backward_and_update_time_s']:.3f}"

        load = lambda s: s.split("load average:")[-1].strip().split(",")[0]  # noqa: E731
        lines.append("| " + " | ".join([
            cfg["method"], "on" if cfg["dropout"] else "off", f"{ours['trainable_params']:,}",
            f"{ours['step_time_s']:.3f}", f"{theirs['step_time_s']:.3f}", f"**{r['ratio']['step_time']:.3f}**",
            f"{ours['tokens_per_s']:,.0f}", f"{theirs['tokens_per_s']:,.0f}", split(ours), split(theirs),
            f"{load(r['load']['before'])} → {load(r['load']['after'])}",
        ]) + " |")  # fmt: skip
    return "\n".join(lines)


def layout_table(path: Path) -> str:
    """``benchmarks/nf4_layout.py``'s two layouts side by side."""
    r = json.loads(path.read_text())
    names = {"out_in": "(out, in), bitsandbytes'", "in_out": "(in, out), before"}
    head = ["layout", "step GFLOP (XLA)", "GB accessed (XLA)", "temporaries MB",
            "HLO dot / transpose / copy / fusion ops", "median step s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, name in names.items():
        row = r["layouts"][key]
        ops = " / ".join(str(row["hlo_ops"][op]) for op in ("dot", "transpose", "copy", "fusion"))
        lines.append(f"| {name} | {row['step_flops'] / 1e9:.3f} | {row['step_bytes_accessed'] / 1e9:.3f} | "
                     f"{row['temp_bytes'] / 1e6:.1f} | {ops} | {row['median_step_s']:.2f} |")  # fmt: skip
    low, median, high = r["ratio_quartiles"]
    lines += ["", f"Per-pair step-time ratio (out, in) / (in, out) over {r['pairs']} pairs: median {median:.3f}, "
              f"quartiles {low:.3f} and {high:.3f}; load average {r['load_average_1min_after']:.1f} ({r['device']})."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("bench", "compare", "nf4-layout"))
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    if args.kind == "bench":
        print("\n\n".join(bench_table(p) for p in args.files))
    elif args.kind == "nf4-layout":
        print("\n\n".join(layout_table(p) for p in args.files))
    else:
        print(compare_table(args.files))


if __name__ == "__main__":
    main()
