"""Ray Tune's ``OptunaSearch``, made safe to resume when the Optuna study lives in a database.

The study (``optuna.db``) is written the moment a trial completes; Tune's own experiment state,
which holds the searcher, only every few seconds. A driver killed in between resumes with a
searcher that still expects results for a trial the study has already closed, and Ray's searcher
then raises ``UpdateFinishedTrialError`` and stops the whole sweep. Here such a late result is
ignored (the study already has the trial's value).
"""

from __future__ import annotations

import logging

import optuna
from ray.tune.search.optuna import OptunaSearch

logger = logging.getLogger(__name__)


class ResumableOptunaSearch(OptunaSearch):
    def on_trial_result(self, trial_id: str, result: dict) -> None:
        try:
            super().on_trial_result(trial_id, result)
        except optuna.exceptions.UpdateFinishedTrialError:
            logger.info("trial %s: the Optuna study already holds its final value; late result ignored", trial_id)
            self._completed_trials.add(trial_id)
