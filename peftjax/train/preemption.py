"""Stopping a run cleanly on SIGTERM or SIGINT, on one host or several.

``StopSignals`` is a context manager around a training loop. The first
SIGTERM or SIGINT asks the loop to stop: it finishes the step it is in,
checkpoints, and raises ``Preempted``. A second signal ends the process at
once, with exit code 128 + its number, as the shell reports death by that
signal; the last checkpoint written stays the one to resume from.

On several hosts every process must stop after the same step, or the
collectives of the next step would hang on the hosts that went on. JAX's
preemption service does that agreement: the process that sees a notice
tells the others through the coordination service, and
``jax.experimental.multihost_utils.reached_preemption_sync_point(step)``
returns True on every process at the same step. The service listens for
SIGTERM with a C++ handler, which Python can only replace; our handler calls
it by address, so that a SIGINT is passed on as a notice too and a second
signal can still end the process.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from types import FrameType

import jax

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_C_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_int)


def _libc_signal():
    function = ctypes.CDLL(None).signal
    function.restype = ctypes.c_void_p
    function.argtypes = [ctypes.c_int, ctypes.c_void_p]
    return function


def _native_handler(signum: int) -> int | None:
    """The address of a handler installed from C for ``signum`` (None when there
    is none: the default, ignore, or Python's own)."""
    action = ctypes.create_string_buffer(1024)  # larger than any libc's struct sigaction
    if ctypes.CDLL(None).sigaction(signum, None, action) != 0:
        return None
    handler = ctypes.c_void_p.from_buffer(action).value  # the struct's first field: sa_handler
    is_python = signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, None)
    return None if handler in (None, 1) or is_python else handler


def _multi_process() -> bool:
    from jax._src import distributed

    return distributed.global_state.client is not None and jax.process_count() > 1


class StopSignals:
    """Watches for SIGTERM/SIGINT while a loop runs (see the module docstring).

    ``requested(step)``, called after every step with the step just finished,
    says whether to checkpoint and stop now; ``signum`` is the signal that
    asked (SIGTERM when another host passed the notice on). Outside the main
    thread, where Python cannot take signals, it installs nothing and never
    asks to stop.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._native: int | None = None
        self._multi = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._multi = _multi_process()
        if self._multi:
            self._native = _native_handler(signal.SIGTERM)
        for signum in SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if self._native is not None:  # JAX's preemption handler back in place
            _libc_signal()(signal.SIGTERM, self._native)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            print(f"peftjax: second {signal.Signals(signum).name}: exiting now; resume from the last checkpoint",
                  file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"peftjax: {signal.Signals(signum).name}: stopping after this step and checkpointing "
              "(a second signal exits at once)", file=sys.stderr, flush=True)
        if self._native is not None:
            _C_HANDLER(self._native)(signal.SIGTERM)

    def requested(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                self.signum = self.signum or signal.SIGTERM
                return True
            return False
        return self.signum is not None
