"""Stopping a sweep driver: graceful first, and never longer than a deadline.

``ray job stop`` and Kubernetes send SIGTERM, a terminal Ctrl-C sends SIGINT (to the local Ray's
processes too: they share the driver's process group). The first signal asks Tune to stop the way
Ctrl-C does: it saves the sweep's state and ends its trials. That can hang: a Ray whose GCS died
with the same signal leaves the driver retrying for a minute, a trial actor may not answer, and
Python runs signal handlers only between bytecodes, so a main thread blocked in Ray's C++ code
never sees them. ``StopGuard`` therefore watches for the signals in a thread of its own (Python's
signal wakeup file descriptor gets a byte for every signal, whichever handler is installed, even
Tune's) and, ``PF_SWEEP_STOP_GRACE_S`` seconds (default 15) after the first one, or 3 s after a
second, prints the resume command, shuts Ray down best-effort and exits with 130. The resume
command is also printed as soon as the first signal arrives: when the signal reached the local
Ray's raylet too, Ray's core worker may end the driver (exit code 1) before anything else runs.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Any

GRACE_ENV = "PF_SWEEP_STOP_GRACE_S"
DEFAULT_GRACE_S = 15.0
AGAIN_GRACE_S = 3.0  # after a second signal: time for the main thread's own KeyboardInterrupt exit
SHUTDOWN_S = 3.0  # best-effort ray.shutdown before a forced exit
EXIT_CODE = 130
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopGuard:
    """SIGTERM handled as SIGINT, and a deadline on the driver's life once either arrived."""

    def __init__(self, resume_hint: str, *, grace_s: float | None = None) -> None:
        self.resume_hint = resume_hint
        self.grace_s = float(os.environ.get(GRACE_ENV, DEFAULT_GRACE_S)) if grace_s is None else grace_s
        self.first_signal_at: float | None = None
        self._deadline: float | None = None
        self._printed = threading.Lock()
        self._hint_done = False
        self._reader: socket.socket | None = None

    @property
    def stop_requested(self) -> bool:
        return self.first_signal_at is not None

    def install(self) -> None:
        """From the main thread, after ``ray.init`` (whose own SIGTERM handler would abort the driver)."""
        reader, writer = socket.socketpair()
        reader.settimeout(0.5)
        writer.setblocking(False)
        self._reader, self._writer = reader, writer  # the writer must outlive the wakeup fd
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._sigterm)
        threading.Thread(target=self._watch, name="pf-sweep-stop-guard", daemon=True).start()

    @staticmethod
    def _sigterm(signum: int, frame: Any) -> None:
        """Whatever SIGINT does now: Tune's graceful stop during ``fit``, else a KeyboardInterrupt.

        Called directly rather than re-raised, so the watcher counts this signal once.
        """
        handler = signal.getsignal(signal.SIGINT)
        if callable(handler):
            handler(signal.SIGINT, frame)
        else:
            raise KeyboardInterrupt

    def _watch(self) -> None:
        assert self._reader is not None
        while True:
            try:
                data = self._reader.recv(64)
            except TimeoutError:
                data = b""
            except OSError:
                return
            now = time.monotonic()
            for signum in (b for b in data if b in STOP_SIGNALS):
                if self.first_signal_at is None:
                    self.first_signal_at, self._deadline = now, now + self.grace_s
                    # Now, not only at the end: Ray's core worker may end the process (exit 1) first
                    # when the same signal killed the local raylet.
                    name = signal.Signals(signum).name
                    print(f"\nStopping ({name}): saving the sweep's state. Continue later with: {self.resume_hint}", flush=True)
                else:
                    assert self._deadline is not None
                    self._deadline = min(self._deadline, now + AGAIN_GRACE_S)
            if self._deadline is not None and now > self._deadline:
                self.force_exit()

    def print_resume_hint(self, prefix: str = "Interrupted.") -> None:
        """The resume command, printed once whoever gets here first (main thread or watcher)."""
        with self._printed:
            if self._hint_done:
                return
            self._hint_done = True
            print(f"\n{prefix} Continue with: {self.resume_hint}", flush=True)

    def force_exit(self) -> None:
        """The deadline passed: hint, Ray shut down if it still answers, exit 130 now."""
        waited = time.monotonic() - (self.first_signal_at or time.monotonic())
        print(f"Stop did not finish within {waited:.0f} s ({GRACE_ENV}={self.grace_s:g}): exiting", file=sys.stderr, flush=True)
        self.print_resume_hint()
        stopper = threading.Thread(target=stop_ray, daemon=True)
        stopper.start()
        stopper.join(SHUTDOWN_S)
        os._exit(EXIT_CODE)


def stop_ray() -> None:
    """Stop this process's local Ray (or leave the joined cluster) now, best effort, rather than in
    Ray's exit hook: that hook first sleeps 0.5 s so that the workers' last forwarded log lines reach
    the console, and a quiet sweep forwards none."""
    try:
        import ray

        from pf_sweep.trial import _kill_local_autoscaler_monitor

        _kill_local_autoscaler_monitor()  # else Ray's shutdown waits a second for it
        ray.shutdown()
    except Exception:  # best effort: the process exits next whatever happened
        pass
