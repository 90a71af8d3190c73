"""What a training run costs: compilation apart from stepping, and XLA-counted FLOPs.

* ``CompileClock``: the seconds JAX spends tracing, lowering and compiling
  while the clock runs, from ``jax.monitoring``'s duration events. A step
  that compiles (the first one, or the first of each new batch shape) costs
  its compilation plus its run; subtracting the clock from the wall time
  leaves the time spent computing.
* ``program_flops``: XLA's count of floating-point operations of one call of a
  compiled program (``Compiled.cost_analysis()``). Lowering a function that
  already ran with these shapes finds its compiled program in JAX's caches,
  so counting after training compiles nothing again.
* ``StepShapes``: the distinct batch shapes a run stepped on and how often,
  so that a run's training FLOPs are the sum over its steps of its program's
  FLOPs at that step's shape (bucketed batches have several).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax

# jax's own names for the phases of compiling a jitted call (jax._src.dispatch).
BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
COMPILE_EVENTS = frozenset({
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    BACKEND_COMPILE,
})

_running: list[CompileClock] = []
_lock = threading.Lock()
_listening = False


def _on_event(event: str, duration_secs: float, **_: Any) -> None:
    if event in COMPILE_EVENTS:
        with _lock:
            for clock in _running:
                clock.seconds += duration_secs
                clock.compiles += event == BACKEND_COMPILE


class CompileClock:
    """``with CompileClock() as clock: ...``; ``clock.seconds`` is the compilation
    time inside the block (so far, while it runs) and ``clock.compiles`` the
    number of programs built in it (compiled by XLA, or read from JAX's
    persistent compilation cache). Clocks may nest."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.compiles = 0

    def __enter__(self) -> CompileClock:
        global _listening
        with _lock:
            if not _listening:  # once per process: jax.monitoring keeps listeners for good
                jax.monitoring.register_event_duration_secs_listener(_on_event)
                _listening = True
            _running.append(self)
        return self

    def __exit__(self, *exc) -> None:
        with _lock:
            _running.remove(self)


def program_flops(lowered: jax.stages.Lowered) -> float:
    """XLA's FLOPs of one call of ``lowered``'s compiled program."""
    cost = lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def _shape_key(batch) -> tuple:
    return tuple((jax.tree_util.keystr(p), tuple(x.shape)) for p, x in jax.tree_util.tree_leaves_with_path(batch))


class StepShapes:
    """The batch shapes a run stepped on: one example batch and a step count per shape."""

    def __init__(self) -> None:
        self.examples: dict[tuple, Any] = {}
        self.counts: dict[tuple, int] = {}

    def add(self, batch) -> None:
        key = _shape_key(batch)
        self.examples.setdefault(key, batch)
        self.counts[key] = self.counts.get(key, 0) + 1

    def total_flops(self, lower: Callable[[Any], jax.stages.Lowered]) -> float:
        """Sum over steps of the program's FLOPs at the step's shape; ``lower(batch)``
        lowers the step for an example batch of that shape."""
        return sum(program_flops(lower(self.examples[key])) * count for key, count in self.counts.items())
