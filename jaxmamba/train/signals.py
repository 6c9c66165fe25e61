"""SIGTERM and SIGINT during a run: stop at a step boundary, on every process, after a save.

SLURM (and most schedulers) send SIGTERM before they kill a job; Ctrl-C sends SIGINT. While the
training loop runs, either one is only noted; the loop asks `should_stop(step)` after each step
and, once it says yes, saves and raises `Stopped`. On several processes the processes must stop
at the same step: JAX's preemption service (started by `jax.distributed.initialize`) owns
SIGTERM there and `reached_preemption_sync_point` agrees on the step, so SIGINT is passed on to
it as SIGTERM. A second signal stops at once without saving. Outside the loop (compiling, the
final validation) a signal raises `Stopped` at once: there is nothing half-done to save (on
several processes SIGTERM before the loop belongs to JAX, and the loop stops after its first
step). Orbax never sees an exception in the middle of a save this way.

Exit statuses (`jaxmamba train`, `train.py`): 143 after SIGTERM, 130 after SIGINT (128 + the
signal number, as shells report), whether the step was saved or not; the message says which.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

import jax

SIGNALS = (signal.SIGINT, signal.SIGTERM)
NAMES = {signal.SIGINT: "SIGINT (Ctrl-C)", signal.SIGTERM: "SIGTERM"}


class Stopped(Exception):  # noqa: N818 (not an error: a requested stop)
    """Training stopped on a signal; `message` says what is saved, `status` is the exit code."""

    def __init__(self, signum: int, message: str, saved: bool = False):
        super().__init__(message)
        self.signum, self.status, self.saved = signum, 128 + signum, saved


class StopOnSignal:
    """Installs the handlers for the duration of a run (a context manager)."""

    def __init__(self, say: Callable[[str], None]):
        self.say = say  # where the notice of a deferred stop goes
        self.signum: int | None = None  # the first signal received
        self.deferring = False  # True while the training loop runs (stop at a step boundary)
        self.multiprocess = jax.process_count() > 1
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only: leave them alone
        for s in SIGNALS:
            if s == signal.SIGTERM and self.multiprocess:
                continue  # JAX's preemption service listens to it
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None and self.deferring:
            print(f"\n{NAMES[signum]} again: stopping now, without saving this step", flush=True,
                  file=sys.stderr)
            sys.stdout.flush()
            os._exit(128 + signum)
        self.signum = signum
        if not self.deferring:
            raise Stopped(signum, f"stopped by {NAMES[signum]}")
        self.say(f"\n{NAMES[signum]}: stopping at the next step boundary after saving "
                 f"(send it again to stop at once, without saving)")
        if self.multiprocess:
            os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption service: all processes

    def after_training(self) -> None:
        """The loop is over: from now on signals (SIGTERM too) stop at once."""
        self.deferring = False
        if (self.multiprocess and signal.SIGTERM not in self._previous
                and threading.current_thread() is threading.main_thread()):
            self._previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._handle)

    def should_stop(self, step: int) -> bool:
        """Whether to stop after step `step` (1-based); on every process the same answer at the
        same step. Call it after every step, on every process."""
        if self.multiprocess:
            from jax.experimental import multihost_utils
            stop = multihost_utils.reached_preemption_sync_point(step)
            if stop and self.signum is None:
                self.signum = signal.SIGTERM  # another process received it
            return stop
        return self.signum is not None
