"""One progress line per finished trial: how many are done, and the best metric so far.

Tune's own reporter prints per-trial tables; this adds the sweep-level view a user watching a long
sweep wants ("5/12 trials done, best val/top1 97.8 (trial 3f2a)"). Its best-so-far is part of Tune's
saved state, so a resumed sweep remembers it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from ray.tune import Callback

logger = logging.getLogger(__name__)


class SweepProgress(Callback):
    """Tracks the best reported value of ``metric`` and logs a line when a trial ends."""

    def __init__(self, metric: str, mode: str, total: int) -> None:
        self.metric, self.mode, self.total = metric, mode, total
        self.best: float | None = None
        self.best_trial: str | None = None
        self.last: dict[str, float] = {}  # each trial's latest value of the metric
        self.started = time.monotonic()

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            self.last[trial.trial_id] = float(value)
            if self._better(value):
                self.best, self.best_trial = float(value), trial.trial_id

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
        return {"best": self.best, "best_trial": self.best_trial, "last": self.last}

    def set_state(self, state: dict[str, Any]) -> None:
        self.best, self.best_trial = state["best"], state["best_trial"]
        self.last = dict(state.get("last", {}))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(trials, trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._log(trials, trial, "failed")
