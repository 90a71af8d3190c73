#!/usr/bin/env bash
# N random `kill -9`s during one training run, each followed by the same `peftjax train ... --resume`
# command line, then the run to its end; beside it, one uninterrupted run of the same config; then a
# bitwise comparison of the two final adapters, best adapters and logged losses.
#
#   N=20 nice -n 10 bash benchmarks/reliability/kill_resume.sh
#
# A kill comes at a random moment: one in four at 1-15 s after the start (set-up, compilation, the
# first steps), the others 0-0.9 s after the restarted run has logged a step 1-6 steps past the
# last one logged before (in training, checkpointing or evaluating). Writes
# benchmarks/reliability/results/kill_resume.{jsonl,json}.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${N:-20}
SEED=${SEED:-0}
PYTHON=${PYTHON:-.venv/bin/python}
CONFIG=benchmarks/reliability/kill_resume.yaml
RUNS=${RUNS:-runs/kill_resume}
OUT=benchmarks/reliability/results
KILLED=$RUNS/killed
WHOLE=$RUNS/uninterrupted
mkdir -p "$OUT" "$RUNS"
rm -rf "$KILLED" "$WHOLE" "$RUNS/uninterrupted.done"
EVENTS=$OUT/kill_resume.jsonl
: > "$EVENTS"
RANDOM=$SEED
export HF_HUB_OFFLINE=1
# Every restart compiles the same programs: a persistent compilation cache (in $RUNS) and LLVM's
# -O0, as `make test` uses them, keep restarts short. Both runs use the same executables.
export XLA_FLAGS="--xla_backend_optimization_level=0 ${XLA_FLAGS:-}"
export JAX_COMPILATION_CACHE_DIR=$RUNS/jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0
train() { "$PYTHON" -m peftjax.cli train "$CONFIG" "output_dir=$1" --quiet "${@:2}"; }
last_step() { [ -s "$KILLED/metrics.jsonl" ] && tail -n 1 "$KILLED/metrics.jsonl" | "$PYTHON" -c \
    'import json,sys
try: print(json.loads(sys.stdin.read())["step"])
except Exception: print(0)' || echo 0; }
checkpoints() { ls "$KILLED/checkpoints" 2>/dev/null | tr '\n' ' '; }

started_all=$(date +%s)
echo "before: $(uptime)" > "$OUT/kill_resume.uptime"
# The uninterrupted run, beside the killed one: it shares no files with it.
( started=$(date +%s); train "$WHOLE" > "$RUNS/uninterrupted.log" 2>&1; echo $? $(( $(date +%s) - started )) \
    > "$RUNS/uninterrupted.done" ) &
whole_pid=$!
kills=0
while [ "$kills" -lt "$N" ]; do
    before=$(last_step)
    # The command itself in the background (not the function), so that $! is the trainer's pid.
    "$PYTHON" -m peftjax.cli train "$CONFIG" "output_dir=$KILLED" --quiet --resume > "$RUNS/attempt_$kills.log" 2>&1 &
    pid=$!
    t0=$(date +%s.%N)
    if [ $((RANDOM % 4)) -eq 0 ]; then
        mode=startup
        sleep "$((1 + RANDOM % 15)).$((RANDOM % 10))"
    else
        mode=training
        target=$((before + RANDOM % 6))
        while [ "$(last_step)" -le "$target" ] && kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
        sleep "0.$((RANDOM % 10))"
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" || true
        echo "the run ended before kill $((kills + 1)); raise train.steps in $CONFIG" >&2
        break
    fi
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
    kills=$((kills + 1))
    elapsed=$(echo "$(date +%s.%N) - $t0" | bc)
    tmp=$(ls "$KILLED/checkpoints" 2>/dev/null | grep -c tmp || true)
    printf '{"kill": %d, "mode": "%s", "seconds_after_start": %.1f, "logged_step_before": %d, "logged_step_at_kill": %d, "checkpoints_after_kill": "%s", "orbax_tmp_dirs_left": %d}\n' \
        "$kills" "$mode" "$elapsed" "$before" "$(last_step)" "$(checkpoints)" "$tmp" >> "$EVENTS"
    tail -n 1 "$EVENTS"
done
train "$KILLED" --resume > "$RUNS/final.log" 2>&1
killed_s=$(( $(date +%s) - started_all ))
wait "$whole_pid"
read -r whole_rc whole_s < "$RUNS/uninterrupted.done"
[ "$whole_rc" -eq 0 ] || { echo "the uninterrupted run failed; see $RUNS/uninterrupted.log" >&2; exit 1; }
echo "after:  $(uptime)" >> "$OUT/kill_resume.uptime"

"$PYTHON" - "$KILLED" "$WHOLE" "$EVENTS" "$OUT/kill_resume.json" "$kills" "$killed_s" "$whole_s" <<'PY'
import json, pathlib, sys
import numpy as np
from safetensors.numpy import load_file

killed, whole, events, out = map(pathlib.Path, sys.argv[1:5])
kills, killed_s, whole_s = map(int, sys.argv[5:8])

def adapters(run, name):
    return load_file(str(run / name / "adapter_model.safetensors"))

def same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

def logged(run):  # every record but the throughput, which depends on the machine
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]

result = {
    "command": "N=%d nice -n 10 bash benchmarks/reliability/kill_resume.sh" % kills,
    "kills": kills,
    "events": [json.loads(line) for line in events.read_text().splitlines()],
    "final_adapter_bitwise_equal": same(adapters(killed, "adapter"), adapters(whole, "adapter")),
    "best_adapter_bitwise_equal": same(adapters(killed, "best"), adapters(whole, "best")),
    "metrics_log_equal": logged(killed) == logged(whole),
    "adapter_tensors": len(adapters(whole, "adapter")),
    "killed_run_result": json.loads((killed / "result.json").read_text())["metrics"],
    "uninterrupted_result": json.loads((whole / "result.json").read_text())["metrics"],
    "wall_s": {"killed_and_resumed": killed_s, "uninterrupted": whole_s},
}
out.write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps({k: v for k, v in result.items() if k != "events"}, indent=2))
sys.exit(0 if result["final_adapter_bitwise_equal"] and result["metrics_log_equal"] else 1)
PY
