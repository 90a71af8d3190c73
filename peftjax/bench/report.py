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


def table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per method: counts, FLOPs, memory (compiled vs the floor) and time."""
    header = (
        f"{'method':<13} {'trainable':>12} {'%':>8} {'adapter MB':>10} {'step GFLOP':>11} {'vs full':>7} "
        f"{'fwd +GFLOP':>10} {'analytic':>9} {'merged +':>9} {'XLA MB':>9} {'floor MB':>9} {'XLA/fl':>6} "
        f"{'step ms':>9} {'img/s' if _images(rows) else 'tok/s':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"{r['method']:<13} skipped: {r.get('reason', '')}")
            continue
        lines.append(
            f"{r['method']:<13} {r['trainable_params']:>12,} {r['trainable_percent']:>8.4f} "
            f"{_fmt(r['adapter_bytes'], '>10.3f', MB)} {_fmt(r['step_flops'], '>11.1f', 1e9)} "
            f"{_fmt(r['flops_ratio_vs_full'], '>7.3f')} {_fmt(r['forward_overhead_flops'], '>10.3f', 1e9)} "
            f"{_fmt(r['forward_overhead_analytic'], '>9.3f', 1e9)} {_fmt(r['merged_overhead_flops'], '>9.3f', 1e9)} "
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
