"""A quiet sweep console: pf-sweep's progress lines, not Ray's housekeeping.

Ray's driver prints the raylet's notices straight to stdout, whatever the logging settings. One of
them, "N PYTHON worker processes have been started ... 4x the maximum expected startup
concurrency", fires in every worker-group sweep on a small machine (each trial starts several
processes, and a trial actor holds a fractional CPU) and reads like a fault. It is dropped from the
console unless ``--verbose``; every other notice, error included, still shows.
"""

from __future__ import annotations

import io
import sys
from typing import TextIO

HARMLESS = ("worker processes have been started on node",)


class _FilteredStream(io.TextIOBase):
    """A text stream that forwards whole lines to ``target``, minus the ``HARMLESS`` ones."""

    def __init__(self, target: TextIO) -> None:
        self._target = target
        self._partial = ""

    def write(self, text: str) -> int:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        kept = [line for line in lines if not any(mark in line for mark in HARMLESS)]
        if kept:
            self._target.write("\n".join(kept) + "\n")
        return len(text)

    def flush(self) -> None:
        if self._partial and not any(mark in self._partial for mark in HARMLESS):
            self._target.write(self._partial)
            self._partial = ""
        self._target.flush()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", "utf-8")

    def isatty(self) -> bool:
        return self._target.isatty()

    def fileno(self) -> int:
        return self._target.fileno()


def filter_ray_notices() -> None:
    """Drop Ray's harmless worker-count notice from this process's stdout (idempotent)."""
    if not isinstance(sys.stdout, _FilteredStream):
        sys.stdout = _FilteredStream(sys.stdout)
