"""Peak resident memory of a training process, peftjax against PyTorch + HF PEFT.

PyTorch's CPU allocator keeps no peak counter, so both sides are measured the same
way from outside their allocators: the kernel's high-water mark of the process's
resident set (``VmHWM`` in ``/proc/self/status``). Each side runs in a fresh process
of its own that imports only its framework (``peftjax_side.py``: JAX; ``hf_side.py``:
PyTorch, transformers, peft), builds the model and method as ``compare_hf_peft.py``
does, and reports:

* ``rss_imports``: resident bytes once the framework is imported and started (its
  libraries, the model's class included: peftjax, flax, optax, JAX; transformers, peft,
  PyTorch);
* ``hwm_build``: the peak while loading the checkpoint, applying the method and (peftjax)
  compiling the step;
* ``hwm_train``: the peak over ``--steps`` training steps, measured from a fresh mark
  (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM`` to the current resident set
  after building), so the loading peak cannot hide in it;
* ``hwm_process``: the process's peak from start to end, the larger of the two;
* ``rss_built``: resident bytes when training starts; with ``--trim-after-build`` both
  sides first call glibc's ``malloc_trim(0)``, which hands the free memory of the heap
  (what loading and compiling used and released) back to the kernel;
* peftjax only: XLA's memory plan of the compiled step (arguments + outputs - aliased
  + temporaries + generated code), which counts buffers, not pages.

Each side runs ``--repeats`` times (the sides alternating) and the run with the median
``hwm_train`` is kept; every run's peak is in the JSON. The ratios compare ``hwm_train`` (the resident model + what training adds: the
process while it trains) and ``hwm_train - rss_imports`` (training's own memory, without
the framework's libraries).

    python benchmarks/memory_vs_hf_peft.py --json benchmarks/results/minilm_memory_vs_hf_peft.json
    python benchmarks/memory_vs_hf_peft.py --methods lora --trim-after-build \
        --json benchmarks/results/minilm_memory_vs_hf_peft_trimmed.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import subprocess
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from comparison import Source, make_batch, set_targets, uptime  # noqa: E402

SIDES = ("peftjax", "hf_peft")


def _status(field: str) -> int:
    """A ``/proc/self/status`` field in bytes."""
    return 1024 * int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def worker(args) -> dict:
    """One side in this process (only its framework imported): build, then train ``args.steps`` steps."""
    if args.side == "peftjax":
        import jax
        import jax.numpy as jnp
        from peftjax_side import PeftjaxSide as Side

        from peftjax.bench.analytic import compiled_memory

        jnp.zeros(1).block_until_ready()  # start the backend: its threads and allocator belong to the baseline
        framework = {"jax": jax.__version__}
    else:
        import peft
        import torch
        import transformers
        from hf_side import HFSide as Side

        getattr(transformers, Source.from_json(args.source).task.hf_class)  # transformers imports models lazily
        assert peft.get_peft_model
        torch.zeros(1)
        framework = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    rss_imports = _status("VmRSS")
    source = Source.from_json(args.source)
    if args.side == "peftjax" and source.folder is None:
        source = Source.resolve(args.model)  # a preset: peftjax builds it from its own config
    side = Side(args, source, make_batch(args, source))
    hwm_build = _status("VmHWM")
    if args.trim_after_build:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    rss_built = _status("VmRSS")
    for _ in range(args.steps):
        side.step()
    row = {
        "rss_imports": rss_imports,
        "hwm_build": hwm_build,
        "rss_built": rss_built,
        "hwm_train": _status("VmHWM"),
        "hwm_process": max(hwm_build, _status("VmHWM")),
        "rss_end": _status("VmRSS"),
        "trainable_params": side.counts.trainable,
        "versions": framework,
    }
    if args.side == "peftjax":
        row["xla_memory_plan"] = compiled_memory(side.compiled)
    return row


def measure(side: str, args, source: Source) -> dict:
    """``worker`` for ``side`` in a fresh Python process; its row."""
    command = [sys.executable, __file__, "--worker", side, "--source", source.to_json(), "--model", args.model,
               "--method", args.method, "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--targets", ",".join(args.targets), "--rank", str(args.rank), "--alpha", str(args.alpha),
               "--dtype", args.dtype] + (["--dropout"] if args.dropout else [])  # fmt: skip
    command += ["--trim-after-build"] if args.trim_after_build else []
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{side} worker failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare_memory(args, source: Source) -> dict:
    """Both sides, one fresh process each, ``args.repeats`` times (the sides alternating); each
    side's row is the run with the median ``hwm_train``, beside every run's, and the ratios."""
    runs = {side: [] for side in SIDES}
    for _ in range(args.repeats):
        for side in SIDES:
            runs[side].append(measure(side, args, source))
    rows = {}
    for side, found in runs.items():
        ordered = sorted(found, key=lambda row: row["hwm_train"])
        rows[side] = {**ordered[len(ordered) // 2], "hwm_train_runs": [row["hwm_train"] for row in found],
                      "hwm_process_runs": [row["hwm_process"] for row in found]}  # fmt: skip
    ours, theirs = rows["peftjax"], rows["hf_peft"]
    assert ours["trainable_params"] == theirs["trainable_params"], rows
    rows["ratio"] = {
        "hwm_train": ours["hwm_train"] / theirs["hwm_train"],
        "hwm_train_above_imports": (ours["hwm_train"] - ours["rss_imports"])
        / (theirs["hwm_train"] - theirs["rss_imports"]),
        "hwm_process": ours["hwm_process"] / theirs["hwm_process"],
    }
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--methods", default="lora,full")
    parser.add_argument("--method", help=argparse.SUPPRESS)  # a worker's
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="training steps in each process")
    parser.add_argument("--repeats", type=int, default=3, help="fresh process pairs per method (the median is kept)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--targets", help="as compare_hf_peft.py (default: the family's)")
    parser.add_argument("--dropout", action="store_true", help="keep the model's dropout rates (default: 0)")
    parser.add_argument("--trim-after-build", action="store_true",
                        help="both sides hand the heap's free memory back to the kernel (glibc's malloc_trim) "
                             "between building and training")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        args.side = args.worker
        args.targets = tuple(args.targets.split(","))
        print(json.dumps(worker(args)))
        return {}
    source = Source.resolve(args.model)
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("worker", "source", "method", "json")},
              "load_before": uptime(), "methods": {}}  # fmt: skip
    for method in args.methods.split(","):
        run = types.SimpleNamespace(**{**vars(args), "method": method, "targets": args.targets})
        set_targets(run, source)
        rows = compare_memory(run, source)
        rows["targets"] = list(run.targets)
        result["methods"][method] = rows
        print(f"{method}: " + "; ".join(
            f"{side} train peak {rows[side]['hwm_train'] / 2**20:,.0f} MiB (imports {rows[side]['rss_imports'] / 2**20:,.0f}, "
            f"build peak {rows[side]['hwm_build'] / 2**20:,.0f})" for side in SIDES)
            + f"; ratio {rows['ratio']['hwm_train']:.3f}, above imports {rows['ratio']['hwm_train_above_imports']:.3f}",
            file=sys.stderr)  # fmt: skip
    result["load_after"] = uptime()
    result["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version()}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
