"""XLA's counts of the compiled train step (16 x 64) for arms without training them:
step FLOPs and memory plan, per stage for gradual unfreezing, as run.py's table has them.

    nice -n 10 .venv/bin/python experiments/strategies_sst2/xla_only.py full_fine_tuning lora

Writes xla_only.json next to this file (one entry per arm named, added to what is there).
"""

from __future__ import annotations

import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402

if __name__ == "__main__":
    target = HERE / "xla_only.json"
    counts = json.loads(target.read_text()) if target.exists() else {}
    for arm in sys.argv[1:]:
        counts[arm] = run.xla_counts(arm, run.ROOT / "runs" / "strategies_sst2")
        target.write_text(json.dumps(counts, indent=2))
        print(arm, counts[arm]["mean_flops"] / 1e9, "GFLOPs", counts[arm]["max_memory_plan_bytes"] / 1e6, "MB", flush=True)
