"""One progress line per finished trial: how many are done, and the best metric so far.

Tune's own reporter prints per-trial tables; this adds the sweep-level view a user watching a long
sweep wants ("5/12 trials done, best val/top1 97.8 (trial 3f2a)"). Its best-so-far is part of Tune's
saved state, so a resumed sweep remembers it. A failed trial's line says why (``failed (diverged:
train/loss is nan at epoch 1 step 14)``), and a failed trial no longer counts as the best: Optuna
records it as failed, not as a score.
"""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from pf_sweep.divergence import find_reason

logger = logging.getLogger(__name__)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
MAX_REASON_CHARS = 200


def failure_reason(trial: Any) -> str | None:
    """Why a trial failed, in one line: its divergence reason, else the last line of Tune's error file."""
    path = getattr(trial, "error_file", None)  # written by Tune, on the driver, before its callbacks run
    try:
        text = Path(path).read_text() if path else None
    except OSError:
        return None
    if not text:
        return None
    found = find_reason(text)
    if found:
        return found
    lines = [_ANSI.sub("", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line and set(line) - set("^~ ")]
    return lines[-1][:MAX_REASON_CHARS] if lines else None


class SweepProgress(Callback):
    """Tracks the best reported value of ``metric`` and logs a line when a trial ends."""

    def __init__(self, metric: str, mode: str, total: int) -> None:
        self.metric, self.mode, self.total = metric, mode, total
        self.best: float | None = None
        self.best_trial: str | None = None
        self.last: dict[str, float] = {}  # each trial's latest value of the metric
        self.peak: dict[str, float] = {}  # each trial's best value: the overall best once a trial fails
        self.started = time.monotonic()

    def _beats(self, value: float, than: float | None) -> bool:
        if than is None:
            return True
        return value > than if self.mode == "max" else value < than

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            self.last[trial.trial_id] = float(value)
            if self._beats(value, self.peak.get(trial.trial_id)):
                self.peak[trial.trial_id] = float(value)
            if self._beats(value, self.best):
                self.best, self.best_trial = float(value), trial.trial_id

    def _forget(self, trial_id: str) -> None:
        """A failed trial's values leave the best (its own line still shows its last one)."""
        self.peak.pop(trial_id, None)
        if self.best_trial != trial_id:
            return
        self.best = self.best_trial = None
        for other, value in self.peak.items():
            if self._beats(value, self.best):
                self.best, self.best_trial = value, other

    def _log(self, trials: list, trial: Any, outcome: str) -> None:
        # Tune calls back before it marks this trial TERMINATED/ERROR: count it explicitly.
        done = sum(t is trial or t.status in ("TERMINATED", "ERROR") for t in trials)
        best = "none yet" if self.best is None else f"{self.best:.4g} (trial {self.best_trial})"
        own = f" ({self.metric} {self.last[trial.trial_id]:.4g})" if trial.trial_id in self.last else ""
        elapsed = time.monotonic() - self.started
        logger.info(
            "trial %s %s%s: %d/%d done, best %s %s [%dm%02ds]",
            trial.trial_id,
            outcome,
            own,
            done,
            self.total,
            self.metric,
            best,
            elapsed // 60,
            elapsed % 60,
        )

    def get_state(self) -> dict[str, Any]:
        return {"best": self.best, "best_trial": self.best_trial, "last": self.last, "peak": self.peak}

    def set_state(self, state: dict[str, Any]) -> None:
        self.best, self.best_trial = state["best"], state["best_trial"]
        self.last = dict(state.get("last", {}))
        self.peak = dict(state.get("peak", {}))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(trials, trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._forget(trial.trial_id)
        why = failure_reason(trial)
        self._log(trials, trial, f"failed ({why})" if why else "failed")
