"""Benchmark rows as a text table, a JSON list and PNG charts."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MB = 1e6


def _fmt(value: Any, spec: str, scale: float = 1.0) -> str:
    """``value / scale`` formatted by ``spec`` (">W.Pf"), or a right-aligned "-" when missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return format("-", spec.split(".")[0].rstrip("df"))
    return format(value / scale, spec)


def _images(rows: Sequence[dict[str, Any]]) -> bool:
    return bool(rows) and rows[0].get("image_size") is not None


def _throughput(row: dict[str, Any]) -> float | None:
    """Tokens per second, or images per second for an image model."""
    return row.get("images_per_s") if row.get("image_size") is not None else row.get("tokens_per_s")


def _shape(row: dict[str, Any]) -> str:
    if row.get("image_size") is not None:
        return f"batch {row.get('batch')} x {row['image_size']}x{row['image_size']} images"
    return f"batch {row.get('batch')} x seq {row.get('seq')}"


# What each column means, printed under the table.
LEGEND = """\
columns:
  method     the YAML method type, with the benchmark's settings (type:field=value)
  trainable  parameters the optimizer updates, and their share of all parameters (%)
  adapter MB the trainable arrays' bytes: what save_adapter writes
  step {step} XLA's count for one train step (forward, backward, optimizer update); vs full = / full fine-tuning's
  fwd +{fwd} XLA's extra forward (inference) FLOPs over the base model, adapters unmerged;
             analytic = the method's formula for the same (- where none is written)
  merged +   the extra forward FLOPs left after merging (0 when the method merges)
  XLA MB     XLA's compiled memory plan for the step; floor MB = a lower bound every compiled step needs
             (its arguments, plus the activations the backward pass must keep); XLA/fl = their ratio
  step ms    median step time (compilation and warm-up excluded); {speed} = {unit} per second"""


def _flop_unit(values: Sequence[float | None]) -> tuple[str, float]:
    """GFLOP, or MFLOP when every value would print as 0.0 GFLOP (tiny models)."""
    largest = max((abs(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))), default=0)
    return ("GFLOP", 1e9) if largest == 0 or largest >= 0.05e9 else ("MFLOP", 1e6)


def table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per method: counts, FLOPs, memory (compiled vs the floor) and time, then a legend."""
    ok = [r for r in rows if r.get("status") == "ok"]
    step_unit, step_scale = _flop_unit([r["step_flops"] for r in ok])
    fwd_unit, fwd_scale = _flop_unit([v for r in ok for v in (r["forward_overhead_flops"], r["forward_overhead_analytic"],
                                                            r["merged_overhead_flops"])])
    width = max([13, *(len(r["method"]) for r in rows)])
    speed = "img/s" if _images(rows) else "tok/s"
    header = (
        f"{'method':<{width}} {'trainable':>12} {'%':>8} {'adapter MB':>10} {'step ' + step_unit:>11} {'vs full':>7} "
        f"{'fwd +' + fwd_unit:>10} {'analytic':>9} {'merged +':>9} {'XLA MB':>9} {'floor MB':>9} {'XLA/fl':>6} "
        f"{'step ms':>9} {speed:>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['method']:<{width}} skipped: {r.get('reason', '')}")
            continue
        lines.append(
            f"{r['method']:<{width}} {r['trainable_params']:>12,} {r['trainable_percent']:>8.4f} "
            f"{_fmt(r['adapter_bytes'], '>10.3f', MB)} {_fmt(r['step_flops'], '>11.1f', step_scale)} "
            f"{_fmt(r['flops_ratio_vs_full'], '>7.3f')} {_fmt(r['forward_overhead_flops'], '>10.3f', fwd_scale)} "
            f"{_fmt(r['forward_overhead_analytic'], '>9.3f', fwd_scale)} "
            f"{_fmt(r['merged_overhead_flops'], '>9.3f', fwd_scale)} "
            f"{_fmt(r['compiled_memory_bytes'], '>9.1f', MB)} {_fmt(r['analytic_floor_bytes'], '>9.1f', MB)} "
            f"{_fmt(r.get('memory_ratio_compiled_vs_analytic'), '>6.3f')} {_fmt(r['step_time_s'], '>9.1f', 1e-3)} "
            f"{_fmt(_throughput(r), '>9.1f' if _images(rows) else '>9.0f')}"
        )
    first = rows[0] if rows else {}
    lines.append(
        f"model {first.get('model')} ({first.get('task')}), {_shape(first)}, "
        f"{first.get('dtype')} compute / {first.get('param_dtype')} params, device {first.get('device')}"
        + (", abstract (no timing)" if first.get("abstract") else f", median of {first.get('steps')} steps")
    )
    lines.append(LEGEND.format(step=step_unit, fwd=fwd_unit, speed=speed, unit="images" if _images(rows) else "tokens"))
    return "\n".join(lines)


def write_json(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(list(rows), indent=2, default=str) + "\n")
    return path


def charts(rows: Sequence[dict[str, Any]], folder: str | Path, prefix: str) -> list[Path]:
    """PNG charts (matplotlib, Agg): step FLOPs vs full, memory compiled vs the floor, and
    (when timed) tokens (or images) per second. Returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = [r["method"] for r in ok]
    title = f"{ok[0]['model']}, {_shape(ok[0])}, {ok[0]['dtype']}, {ok[0]['device']}"
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        path = folder / f"{prefix}_{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar(names, [r["flops_ratio_vs_full"] for r in ok], color="tab:blue")
    ax.axhline(2 / 3, color="grey", linestyle="--", label="4N/6N = 2/3 (frozen base)")
    ax.set_ylabel("step FLOPs / full fine-tuning (XLA)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    ax.tick_params(axis="x", rotation=45)
    save(fig, "flops")

    fig, ax = plt.subplots(figsize=(10, 4))
    x = range(len(ok))
    ax.bar([i - 0.2 for i in x], [(r["compiled_memory_bytes"] or 0) / 1e9 for r in ok], 0.4, label="XLA compiled plan")
    if all(r["analytic_floor_bytes"] is not None for r in ok):
        ax.bar([i + 0.2 for i in x], [r["analytic_floor_bytes"] / 1e9 for r in ok], 0.4, label="memory floor (lower bound)")
    ax.set_xticks(list(x), names, rotation=45)
    ax.set_ylabel("GB")
    ax.set_title(title, fontsize=9)
    ax.legend()
    save(fig, "memory")

    timed = [r for r in ok if _throughput(r)]
    if timed:
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.bar([r["method"] for r in timed], [_throughput(r) for r in timed], color="tab:green")
        ax.set_ylabel(f"{'images' if _images(ok) else 'tokens'} / s (median step)")
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", rotation=45)
        save(fig, "throughput")
    return written
