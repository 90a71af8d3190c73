"""Markdown tables from the committed benchmark JSON (``benchmarks/results/*.json``).

    python benchmarks/summarize.py bench benchmarks/results/bert_base_cpu.json
    python benchmarks/summarize.py compare benchmarks/results/minilm_*_vs_hf_peft.json
    python benchmarks/summarize.py memory|floor|lean|hlo|casts|scaling <json>
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
    images = rows[0].get("image_size") is not None
    head = ["method", "trainable", "trainable %", "adapter MB", "step TFLOP", "vs full", "fwd +GFLOP (XLA / analytic)",
            "merged +", "XLA plan GB", "memory floor GB", "XLA / floor"]
    if timed:
        head += ["step s (median)", "images/s" if images else "tokens/s", "load avg (1 min)"]
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
            throughput = _num(r["images_per_s"], ",.1f") if images else _num(r["tokens_per_s"], ",.0f")
            cells += [_num(r["step_time_s"], ".2f"), throughput, _num(load and load[0], ".1f")]
        lines.append("| " + " | ".join(cells) + " |")
    first = rows[0]
    lines.append("")
    shape = f"{first['image_size']}x{first['image_size']} images" if images else first["seq"]
    lines.append(f"{first['model']} ({first['task']}), batch {first['batch']} x {shape}, {first['dtype']} "
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


MIB = 2**20


def memory_table(path: Path) -> str:
    """memory_vs_hf_peft.py: peak resident memory per side and method (MiB), XLA's plan beside."""
    result = json.loads(path.read_text())
    head = ["method", "side", "after imports", "build peak", "training peak (VmHWM)", "training peak - imports",
            "runs (training peak)", "XLA plan (args + temps)", "peak ratio", "ratio without imports"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for method, rows in result["methods"].items():
        for side in ("peftjax", "hf_peft"):
            row = rows[side]
            plan = row.get("xla_memory_plan")
            ratio = rows["ratio"] if side == "peftjax" else None
            lines.append("| " + " | ".join([
                method, side, f"{row['rss_imports'] / MIB:,.0f}", f"{row['hwm_build'] / MIB:,.0f}",
                f"{row['hwm_train'] / MIB:,.0f}", f"{(row['hwm_train'] - row['rss_imports']) / MIB:,.0f}",
                ", ".join(f"{v / MIB:,.0f}" for v in row["hwm_train_runs"]),
                f"{plan['argument'] / MIB:,.0f} + {plan['temp'] / MIB:,.0f}" if plan else "–",
                f"**{ratio['hwm_train']:.3f}**" if ratio else "", f"{ratio['hwm_train_above_imports']:.3f}" if ratio else "",
            ]) + " |")  # fmt: skip
    cfg = result["config"]
    pairs = f"{cfg['repeats']} fresh process pair" + ("s per method (median kept)" if cfg["repeats"] > 1 else " per method")
    trimmed = ", malloc_trim after building" if cfg.get("trim_after_build") else ""
    lines.append(f"\nMiniLM-L6, batch {cfg['batch']} x {cfg['seq']}, {cfg['dtype']}, {cfg['steps']} steps per process, "
                 f"{pairs}{trimmed}, MiB")
    return "\n".join(lines)


# The methods of the gap table, by the bench's names and by those of JSON written before its YAML method names.
GAP_METHODS = ("full", "lora", "lora-r8", "vera", "ia3", "prompt_tuning", "prompt")


def floor_tables(path: Path, gap_methods: tuple[str, ...] = GAP_METHODS) -> str:
    """floor_check.py: XLA plan / floor per model, and for a few methods what XLA holds at its peak
    by term against the floor's term (MB)."""
    result = json.loads(path.read_text())
    lines = ["| model | batch x seq, dtype | methods | XLA plan >= floor | XLA plan / floor: min | median | max |",
             "|---|---|---:|---|---:|---:|---:|"]
    for model, found in result["models"].items():
        ok = [r for r in found["rows"] if r["status"] == "ok"]
        ratios = sorted(r["plan_over_floor"] for r in ok)
        lines.append(f"| {model} | {found['batch']} x {found['seq']}, {found['dtype']} | {len(ok)} | "
                     f"{'every one' if all(r['above_floor'] for r in ok) else 'NOT ALL'} | {ratios[0]:.3f} | "
                     f"{ratios[len(ratios) // 2]:.3f} | {ratios[-1]:.3f} |")  # fmt: skip
    lines += ["", "| model | method | " + " | ".join(_TERMS_HEAD) + " |", "|---|---|" + "---:|" * len(_TERMS_HEAD)]
    for model, found in result["models"].items():
        for row in found["rows"]:
            if row["status"] == "ok" and row["method"] in gap_methods:
                lines.append(f"| {model} | {row['method']} | " + " | ".join(_term_cells(row)) + " |")
    return "\n".join(lines)


# What XLA holds at its peak by term (floor_check.peak_by_term), beside the floor's share of it.
_FLOOR_OF = {
    "arguments": lambda r: r["floor"]["total"] - r["floor"]["activations"],
    "attention": lambda r: r["floor_activations"]["attention"] + r["floor_activations"]["context"],
    "norms": lambda r: r["floor_activations"]["norms"] + r["floor_activations"]["kernel_inputs"],
    "ffn": lambda r: r["floor_activations"]["ffn"],
    "adapters": lambda r: r["floor_activations"]["adapters"],
    "head": lambda r: r["floor_activations"]["head"],
}
_HELD_ONLY = ("argument copies", "backward", "optimizer update", "other")
_TERMS_HEAD = [f"{k} (XLA / floor)" for k in _FLOOR_OF] + list(_HELD_ONLY) + ["XLA peak", "XLA plan", "floor"]


def _term_cells(row: dict) -> list[str]:
    held = row["xla_peak_by_term"]
    cells = [f"{held.get(k, 0) / 1e6:,.1f} / {f(row) / 1e6:,.1f}" for k, f in _FLOOR_OF.items()]
    cells += [f"{held.get(k, 0) / 1e6:,.1f}" for k in _HELD_ONLY]
    totals = (held["total"], row["xla_plan"]["total"], row["floor"]["total"])
    return cells + [f"{total / 1e6:,.1f}" for total in totals]


def lean_tables(path: Path) -> str:
    """lean_backward.py: per method and variant, XLA's plan and counts, then what it holds at
    its peak by term against the floor (MB)."""
    result = json.loads(path.read_text())
    head = ["method", "variant", "XLA plan MB", "temporaries MB", "GFLOP (XLA)", "GB accessed (XLA)", "plan / floor"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for method, rows in result["methods"].items():
        for name, row in rows.items():
            plan = row["xla_plan"]
            lines.append(f"| {method} | {name} | {plan['total'] / 1e6:,.1f} | {plan['temp'] / 1e6:,.1f} | "
                         f"{row['flops'] / 1e9:,.2f} | {row['bytes_accessed'] / 1e9:,.2f} | "
                         f"{plan['total'] / row['floor']['total']:.3f} |")  # fmt: skip
    lines += ["", "| method | variant | " + " | ".join(_TERMS_HEAD) + " |", "|---|---|" + "---:|" * len(_TERMS_HEAD)]
    for method, rows in result["methods"].items():
        for name, row in rows.items():
            lines.append(f"| {method} | {name} | " + " | ".join(_term_cells(row)) + " |")
    lines.append(f"\n{result['model']}, batch {result['batch']} x {result['seq']}, {result['dtype']}, abstract "
                 f"(compiled, not run), jax {result['jax']}")
    return "\n".join(lines)


def hlo_table(path: Path) -> str:
    """step_hlo.py: per layer, instructions and MB read + written, forward | backward."""
    result = json.loads(path.read_text())
    kinds = ("matmul", "layout", "reduce", "elementwise")
    head = ["step, attention path"] + [f"{k}: ops / MB (fwd \\| bwd)" for k in kinds] + [
        "XLA GFLOP", "XLA bytes accessed GB", "XLA temps MB"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, row in result["steps"].items():
        cells = [name]
        for kind in kinds:
            f, b = row["per_layer"]["forward"][kind], row["per_layer"]["backward"][kind]
            cells.append(f"{f['count']:.0f} / {f['bytes'] / 1e6:.0f} \\| {b['count']:.0f} / {b['bytes'] / 1e6:.0f}")
        cells += [f"{row['xla_flops'] / 1e9:.2f}", f"{row['xla_bytes_accessed'] / 1e9:.2f}",
                  f"{row['memory_temp_bytes'] / 1e6:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def casts_table(path: Path) -> str:
    """forward_casts.py: unmerged forward overhead, XLA against the formula, and the extra converts (GFLOP)."""
    result = json.loads(path.read_text())
    lines = ["| model | compute | method | XLA overhead | formula | gap | extra converted elements (G) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['model']} | {r['dtype']} | {r['method']} | {r['xla_overhead_flops'] / 1e9:.4f} | "
                     f"{r['analytic_flops'] / 1e9:.4f} | {r['gap_flops'] / 1e9:.4f} | "
                     f"{r['extra_converted_elements'] / 1e9:.4f} |")  # fmt: skip
    lines.append(f"\nbatch {result['batch']} x {result['seq']}, {result['param_dtype']} parameters, abstract")
    return "\n".join(lines)


def scaling_table(path: Path) -> str:
    """scaling.py: every curve's points and fitted growth exponent."""
    result = json.loads(path.read_text())
    lines = ["| sweep | method | side | metric | points (x: y) | exponent k |", "|---|---|---|---|---|---:|"]
    for key, curve in sorted(result["curves"].items()):
        sweep, method, side, metric = key.split("/")
        scale, unit = (MIB, " MiB") if metric.endswith("bytes") else (1e-3, " ms")
        points = ", ".join(f"{x}: {y / scale:,.0f}{unit}" for x, y in zip(curve["x"], curve["y"], strict=True))
        k = curve.get("exponent")
        lines.append(f"| {sweep} | {method} | {side} | {metric} | {points} | {'–' if k is None else f'{k:.2f}'} |")
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


TABLES = {"memory": memory_table, "floor": floor_tables, "lean": lean_tables, "hlo": hlo_table, "casts": casts_table,
          "scaling": scaling_table, "nf4-layout": layout_table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=("bench", "compare", *TABLES))
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    if args.kind == "bench":
        print("\n\n".join(bench_table(p) for p in args.files))
    elif args.kind == "compare":
        print(compare_table(args.files))
    else:
        print("\n\n".join(TABLES[args.kind](p) for p in args.files))


if __name__ == "__main__":
    main()
