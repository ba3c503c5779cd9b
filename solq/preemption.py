"""Stopping a training run cleanly when the cluster asks: SIGTERM (preemption, ``scancel``, Kubernetes) and
SIGUSR1 (what SLURM's ``--signal=B:USR1@120`` sends ahead of the time limit; see scripts/slurm_train.sh).

:class:`StopRequest` turns the first such signal into a request that the training loop polls after every
optimiser step (:meth:`StopRequest.agreed`, which also agrees on it across torchrun ranks, so every rank
stops after the same step); the loop then writes one checkpoint of that step and returns. The module needs
neither torch nor the engine (a process-level concern, like :mod:`solq.files`). Two things end
the process at once instead, with status 128 + the signal number and without a half-written file
(:func:`solq.files.remove_partial_writes`):

- a second stop signal, at least ``REPEAT_WINDOW_S`` after the first (launchers such as torchrun pass a
  signal on to their workers while a cluster may signal every process too: one request arriving twice);
- the grace period (``train.stop_grace_s``) running out before the process has exited.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Callable, Optional

from solq.files import remove_partial_writes

__all__ = ["STOP_SIGNALS", "REPEAT_WINDOW_S", "StopRequest"]

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
REPEAT_WINDOW_S = 1.0


class StopRequest:
    """A stop asked for by a signal; a plain object until :meth:`install` connects it to the signals.

    Args:
        grace_s: seconds from the first signal until the process exits regardless (0 = no limit).
        exit: called with the exit status for an immediate exit (``os._exit``; tests pass a recorder).

    Attributes: ``signal_name`` (e.g. "SIGTERM"; None until a signal came), ``stopping`` (the ranks agreed
    to stop: set by :meth:`agreed`, the same on every rank).
    """

    def __init__(self, *, grace_s: float = 0.0, exit: Callable[[int], None] = os._exit):
        self.grace_s = grace_s
        self.signal_name: Optional[str] = None
        self.signum = 0
        self.stopping = False
        self._exit = exit
        self._received_at = 0.0
        self._timer: Optional[threading.Timer] = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        """Whether this process has received a stop signal."""
        return self.signal_name is not None

    def install(self) -> "StopRequest":
        """Handle SIGTERM and SIGUSR1 from now on (only from the main thread: Python allows no other).
        Returns self."""
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self.handle)
        return self

    def uninstall(self) -> None:
        """Put the previous handlers back and cancel the grace timer."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def handle(self, signum: int, frame=None) -> None:
        """Signal handler: the first signal asks for a stop, a later one exits at once."""
        now = time.monotonic()
        name = signal.Signals(signum).name
        if not self.requested:
            self._request(name, signum, now)
            print(f"{name} received: stopping after the current optimiser step with a checkpoint of it (within "
                  f"{self.grace_s:g} s; a second signal exits at once)" if self.grace_s else
                  f"{name} received: stopping after the current optimiser step with a checkpoint of it",
                  file=sys.stderr, flush=True)
        elif now - self._received_at >= REPEAT_WINDOW_S:
            self.exit_now(f"second stop signal ({name})")

    def _request(self, name: str, signum: int, now: float) -> None:
        self.signal_name, self.signum, self._received_at = name, signum, now
        if self.grace_s > 0 and self._timer is None:
            self._timer = threading.Timer(self.grace_s, self.exit_now,
                                          args=(f"stop_grace_s ({self.grace_s:g} s) ran out",))
            self._timer.daemon = True
            self._timer.start()

    def exit_now(self, why: str) -> None:
        """Remove files being written, say why, and exit with 128 + the signal number (no checkpoint)."""
        removed = remove_partial_writes()
        note = f"; removed {len(removed)} partly written file(s)" if removed else ""
        print(f"{why}: exiting now without a checkpoint of this step{note}", file=sys.stderr, flush=True)
        self._exit(128 + (self.signum or signal.SIGTERM))

    def agreed(self, any_rank: Callable[[bool], bool] = bool) -> bool:
        """Whether any process has received a stop signal. ``any_rank(flag)`` combines this process's flag with
        the others' (a collective under torchrun, e.g. ``solq.engine.distributed.any_rank``: every rank calls
        it at the same point, so all get the same answer; the default is this process alone).
        Sets and returns ``stopping``."""
        if not self.stopping:
            self.stopping = any_rank(self.requested)
            if self.stopping and not self.requested:  # another rank got the signal: same grace here
                self._request("a signal on another rank", int(signal.SIGTERM), time.monotonic())
        return self.stopping
