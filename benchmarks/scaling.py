"""How step time and peak memory grow with sequence length and batch, peftjax against HF PEFT.

MiniLM-L6, fp32, dropout off, LoRA(query, value, r=8) and full fine-tuning, on two
sweeps: sequence length 64 -> 512 at batch ``--seq-sweep-batch`` (8), and batch 8 -> 64
at 64 tokens. Two parts, run apart because they need different machines:

* ``--part memory``: each side in a fresh process per point (``memory_vs_hf_peft.py``'s
  worker: VmHWM after building is reset, then ``--steps`` steps), plus XLA's memory plan.
  Resident memory does not depend on how busy the CPU is, so this part can run anywhere.
* ``--part time``: ``compare_hf_peft.py``'s alternating rounds at every point, both
  sides in one process. It needs a quiet machine.

Each part merges its points into the JSON (``--json``), so the two can run on different
days. For every curve the growth exponent k of y ~ x^k is fitted by least squares on
log-log axes. The memory curves fit training's own memory (``hwm_train - rss_imports``:
the model and what training adds, without the framework's libraries) and, for peftjax,
XLA's temporaries. ``--plot`` draws what the JSON holds.

    python benchmarks/scaling.py --part memory --json benchmarks/results/minilm_scaling.json --plot
    python benchmarks/scaling.py --part time --json benchmarks/results/minilm_scaling.json --plot
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import numpy as np  # noqa: E402
from comparison import Source, set_targets, uptime  # noqa: E402

METHODS = ("lora", "full")
SIDES = ("peftjax", "hf_peft")


def sweeps(args) -> dict[str, list[tuple[int, int]]]:
    """(batch, seq) points per sweep."""
    return {
        "seq": [(args.seq_sweep_batch, s) for s in (64, 128, 256, 512)],
        "batch": [(b, 64) for b in (8, 16, 32, 64)],
    }


def point_args(args, method: str, batch: int, seq: int, source: Source) -> types.SimpleNamespace:
    run = types.SimpleNamespace(model="minilm", method=method, dtype="fp32", batch=batch, seq=seq, steps=args.steps,
                                rank=8, alpha=16.0, targets=None, dropout=False, repeats=1)  # fmt: skip
    set_targets(run, source)
    return run


def memory_part(args, source: Source, result: dict) -> None:
    import memory_vs_hf_peft as memory

    for sweep, points in sweeps(args).items():
        for method in METHODS:
            for batch, seq in points:
                run = point_args(args, method, batch, seq, source)
                rows = {side: memory.measure(side, run, source) for side in SIDES}
                key = f"{sweep}/{method}/{batch}x{seq}"
                result["points"].setdefault(key, {}).update(memory=rows)
                print(f"memory {key}: " + ", ".join(f"{s} {rows[s]['hwm_train'] / 2**20:,.0f} MiB" for s in SIDES),
                      file=sys.stderr)  # fmt: skip


def time_part(args, source: Source, result: dict) -> None:
    import compare_hf_peft

    for sweep, points in sweeps(args).items():
        for method in METHODS:
            for batch, seq in points:
                found = compare_hf_peft.main(["--model", "minilm", "--method", method, "--batch", str(batch),
                                              "--seq", str(seq), "--steps", str(args.steps),
                                              "--rounds", str(args.rounds)])  # fmt: skip
                key = f"{sweep}/{method}/{batch}x{seq}"
                result["points"].setdefault(key, {}).update(
                    time={side: {k: found[side][k] for k in ("step_time_s", "step_times_s", "tokens_per_s")}
                          for side in SIDES} | {"ratio": found["ratio"]["step_time"], "load": found["load"]})  # fmt: skip


def curves(result: dict) -> dict[str, dict]:
    """Per sweep, method, side and metric: x values, y values and the fitted exponent."""
    found: dict[str, dict] = {}
    metrics = {
        "step_time_s": lambda p, side: p.get("time", {}).get(side, {}).get("step_time_s"),
        "training_memory_bytes": lambda p, side: (p["memory"][side]["hwm_train"] - p["memory"][side]["rss_imports"])
        if "memory" in p else None,
        "xla_temp_bytes": lambda p, side: p["memory"][side]["xla_memory_plan"]["temp"]
        if "memory" in p and side == "peftjax" else None,
    }  # fmt: skip
    for key, point in result["points"].items():
        sweep, method, shape = key.split("/")
        batch, seq = (int(v) for v in shape.split("x"))
        x = seq if sweep == "seq" else batch
        for side in SIDES:
            for metric, read in metrics.items():
                y = read(point, side)
                if y is not None:
                    curve = found.setdefault(f"{sweep}/{method}/{side}/{metric}", {"x": [], "y": []})
                    curve["x"].append(x)
                    curve["y"].append(y)
    for curve in found.values():
        order = np.argsort(curve["x"])
        curve["x"] = [curve["x"][i] for i in order]
        curve["y"] = [curve["y"][i] for i in order]
        if len(curve["x"]) >= 2:
            curve["exponent"] = float(np.polyfit(np.log(curve["x"]), np.log(curve["y"]), 1)[0])
    return found


def plot(fitted: dict[str, dict], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for metric, label, scale in (("step_time_s", "step time (s)", 1.0),
                                 ("training_memory_bytes", "peak training memory (MiB)", 2**-20)):  # fmt: skip
        if not any(key.endswith(metric) for key in fitted):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, sweep in zip(axes, ("seq", "batch"), strict=True):
            for method in METHODS:
                for side, style in zip(SIDES, ("-o", "--s"), strict=True):
                    curve = fitted.get(f"{sweep}/{method}/{side}/{metric}")
                    if curve:
                        k = curve.get("exponent", float("nan"))
                        ax.plot(curve["x"], [y * scale for y in curve["y"]], style,
                                label=f"{side} {method} (k={k:.2f})")  # fmt: skip
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length (batch 8)" if sweep == "seq" else "batch (64 tokens)")
            ax.set_ylabel(label)
            ax.legend(fontsize=7)
            ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(f"MiniLM-L6, fp32: {label} against sequence length and batch (y ~ x^k)")
        fig.tight_layout()
        path = folder / f"minilm_scaling_{metric.split('_')[0]}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("memory", "time", "none"), required=True,
                        help="what to measure (none: only refit and plot the JSON)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="time part: alternations per point")
    parser.add_argument("--seq-sweep-batch", type=int, default=8)
    parser.add_argument("--json", type=Path, required=True, help="read and merged into when it exists")
    parser.add_argument("--plot", action="store_true", help="charts into the JSON's charts/ folder")
    args = parser.parse_args(argv)
    result = json.loads(args.json.read_text()) if args.json.exists() else {"points": {}, "runs": []}
    if args.part != "none":
        source = Source.resolve("minilm")
        before = uptime()
        (memory_part if args.part == "memory" else time_part)(args, source, result)
        result["runs"].append({"part": args.part, "steps": args.steps, "load_before": before, "load_after": uptime()})
    result["curves"] = curves(result)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for key, curve in result["curves"].items():
        if "exponent" in curve:
            print(f"{key}: k = {curve['exponent']:.2f}")
    if args.plot:
        folder = args.json.parent / "charts"
        folder.mkdir(exist_ok=True)
        for path in plot(result["curves"], folder):
            print(path)
    return result


if __name__ == "__main__":
    main()
