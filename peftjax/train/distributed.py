"""Several processes, one run: ``peftjax --distributed`` (see the README).

``initialize`` starts JAX's distributed runtime with timeouts that bound how
long a process waits for a peer that never comes or has died, and turns
its failures into ``RunError``\\ s that say what to check.
"""

from __future__ import annotations

import jax

from peftjax.errors import RunError


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None, *,
               initialization_timeout_s: int = 300, heartbeat_timeout_s: int = 100) -> None:
    """``jax.distributed.initialize`` (cluster auto-detection where arguments are
    None); a peer that sends no heartbeat for ``heartbeat_timeout_s`` seconds
    is declared dead and the others stop."""
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id,
                                   initialization_timeout=initialization_timeout_s,
                                   heartbeat_timeout_seconds=heartbeat_timeout_s)
    except (RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RunError(f"--distributed: cannot join the run ({first}); check --coordinator HOST:PORT "
                       "(process 0's address), --num-processes and --process-id") from None
