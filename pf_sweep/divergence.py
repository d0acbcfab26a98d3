"""A trial whose training loss stops being finite: ``TrainingDiverged``, and the marker that refuses its retries.

A diverged run cannot recover (its weights are NaN from that update on), and a retry from its last
checkpoint would take the same steps and diverge again. So the loop raises ``TrainingDiverged`` at
the first non-finite loss, and a sweep's trial leaves ``diverged.json`` in its run directory
(``runs/train-<trial id>/``). Any retry of that trial, by Tune (``--max-failures``), by Ray Train
(``TrialConfig.max_failures``) or by a resumed sweep, finds the marker and fails at once with the
same reason instead of training. The marker also counts those refusals.

Light on purpose (no torch, no Ray): the driver and the trial actors import it.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from pathlib import Path
from typing import Any

from pf_sweep.storage import StoragePath

MARKER_FILE = "diverged.json"
REASON_RE = re.compile(r"diverged: train/loss is (?:nan|inf|-inf) at epoch \d+ step \d+")


class TrainingDiverged(RuntimeError):
    """The training loss became non-finite; ``reason`` reads ``diverged: train/loss is nan at epoch E step S``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def step(self) -> float:
        """The update (counted from 1 over the whole trial, as the reported ``step``) whose loss was not
        finite; inf when the reason does not say."""
        found = re.search(r"step (\d+)$", self.reason)
        return int(found.group(1)) if found else math.inf


def reason(value: float, epoch: int, step: int) -> str:
    """The one-line reason for a non-finite loss ``value`` at update ``step`` of ``epoch``."""
    kind = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return f"diverged: train/loss is {kind} at epoch {epoch} step {step}"


def find_reason(text: str | None) -> str | None:
    """The divergence reason inside an error's text (a Tune ``error.txt``, a traceback), else None."""
    found = REASON_RE.findall(text or "")
    return found[-1] if found else None


def as_diverged(error: BaseException | None) -> TrainingDiverged | None:
    """The ``TrainingDiverged`` behind ``error``: itself, one of a Ray Train ``WorkerGroupError``'s
    worker failures (the earliest step when several ranks diverged), or a cause in its chain."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, TrainingDiverged):
            return TrainingDiverged(error.reason)
        failures = getattr(error, "worker_failures", None)
        if isinstance(failures, dict):
            diverged = [d for d in map(as_diverged, failures.values()) if d is not None]
            if diverged:
                return min(diverged, key=lambda d: d.step)
        error = error.__cause__ or error.__context__
    return None


def _marker(run_location: str | StoragePath) -> StoragePath:
    location = run_location if isinstance(run_location, StoragePath) else StoragePath.of(run_location)
    return location / MARKER_FILE


def read_marker(run_location: str | StoragePath) -> dict[str, Any] | None:
    """What the run directory's ``diverged.json`` says, or None when the run never diverged."""
    marker = _marker(run_location)
    if not marker.exists():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):  # written by hand or torn: it still marks the run as diverged
        return {"reason": "diverged: (unreadable diverged.json)"}


def _write(marker: StoragePath, state: dict[str, Any]) -> None:
    """Whole or not at all: ranks may write it at once while a retry reads it."""
    text = json.dumps(state, indent=1)
    if not marker.is_local:
        marker.write_text(text)  # an object store replaces the object whole
        return
    path = Path(marker.location)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{MARKER_FILE}.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def mark(run_location: str | StoragePath, error: TrainingDiverged) -> None:
    """Record that this run diverged, so that no retry trains it again (refusals counted so far are kept)."""
    state = read_marker(run_location) or {}
    _write(_marker(run_location), {"reason": error.reason, "refused_retries": int(state.get("refused_retries", 0))})


def refuse_if_diverged(run_location: str | StoragePath, *, count: bool = True) -> None:
    """Raise the recorded ``TrainingDiverged`` if this run already diverged; ``count`` notes the refusal."""
    state = read_marker(run_location)
    if state is None:
        return
    if count:
        _write(_marker(run_location), {**state, "refused_retries": int(state.get("refused_retries", 0)) + 1})
    raise TrainingDiverged(str(state.get("reason") or "diverged"))
