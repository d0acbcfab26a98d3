"""How a sweep's Tune trial runs its training: inside the trial actor, or on a Ray Train worker group.

``auto`` (the default) runs one-worker trials in the Tune trial actor itself: Ray Train's local
mode (``ScalingConfig(num_workers=0)``) calls ``train_loop`` in this process with a ``TuneSession``
that reports each epoch straight to Tune. Tune reuses the actor for the next trial
(``reuse_actors``), so its process, its imports (torch, timm) and its threads are paid for once per
sweep slot instead of once per trial; Ray's own Train + Tune guide recommends this for
single-process trials. ``workers`` (and any trial with more than one worker) starts a
``TorchTrainer`` worker group per trial, which costs several fresh processes per trial.

Both produce the same metrics for the same config and seed, and the same directory layout
(``runs/train-<trial id>/checkpoint_<epoch>/{state.pt,config.json,metrics.json}``).

The worker-group path reports to Tune through a bridge that cannot deadlock (see
``run_worker_group``); Ray's ``TuneReportCallback`` could (a report still in flight when ``fit()``
returned left Tune's trial thread blocked forever).

A trial whose loss diverges fails with ``TrainingDiverged`` on either path, and leaves
``diverged.json`` in its run directory: a retry (Tune's, Ray Train's, a resumed sweep's) finds it
and fails at once with the same reason instead of training again (``pf_sweep.divergence``).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import queue as queue_module
import threading
import time
from collections.abc import Sequence
from typing import Any

from pf_sweep.checkpoint import METRICS_FILE
from pf_sweep.config import TrialConfig
from pf_sweep.divergence import TrainingDiverged, as_diverged, mark, refuse_if_diverged
from pf_sweep.run_dir import CHECKPOINT_PATH_KEY
from pf_sweep.storage import StoragePath

logger = logging.getLogger(__name__)

EXECUTORS = ("auto", "workers")
TRIAL_ACTOR_CPU = 0.01  # a worker-group trial's actor only waits on fit(): a token share, see sweep.py
# How long fit() may take to return once the last epoch has been reported before the trial is failed.
FINISH_TIMEOUT_ENV = "PF_SWEEP_FINISH_TIMEOUT_S"
DEFAULT_FINISH_TIMEOUT_S = 120.0
# Test hook: deliver the last epoch's report this many seconds late, after fit() has returned.
DELAY_LAST_REPORT_ENV = "PF_SWEEP_TEST_DELAY_LAST_REPORT_S"


def runs_in_actor(executor: str, workers_per_trial: int) -> bool:
    """Whether trials run inside their Tune trial actor (``auto`` and one worker) or on worker groups."""
    if executor not in EXECUTORS:
        raise ValueError(f"Invalid executor: {executor!r} (allowed: {', '.join(EXECUTORS)})")
    return executor == "auto" and workers_per_trial == 1


def trial_actor_resources(base: dict[str, Any], in_actor: bool) -> dict[str, float]:
    """What Tune reserves for each trial actor: the whole worker when it trains, a token share otherwise."""
    if not in_actor:
        return {"cpu": TRIAL_ACTOR_CPU}
    cfg = TrialConfig.from_dict(base)
    resources = {"cpu": cfg.cpus_per_worker}
    if cfg.use_gpu:
        resources["gpu"] = cfg.gpus_per_worker
    return resources


# ---------------------------------------------------------------------------------------- reporting
class _TuneReporter:
    """Sends each epoch's metrics to Tune at most once, in epoch order.

    A worker group that restarts from a checkpoint reports again the epochs after that checkpoint;
    Tune (and ASHA, which counts epochs) must see each one once.
    """

    def __init__(self) -> None:
        self.last_epoch: int | None = None
        self.sent = 0

    def send(self, metrics: dict[str, Any]) -> None:
        import ray.tune

        epoch = int(metrics["epoch"])
        if self.last_epoch is not None and epoch <= self.last_epoch:
            return
        ray.tune.report(dict(metrics))
        self.last_epoch, self.sent = epoch, self.sent + 1

    def complete_from(self, checkpoint: str | None, tune_last_epoch: int | None) -> None:
        """After training: report the epochs Tune has not seen, from the final checkpoint's history.

        That covers a report delayed past the end of ``fit()``, and a trial restored after its last
        epoch trained (the driver died before Tune recorded the trial's end): its run trains
        nothing and reports nothing, so Tune gets the stored final row unless Tune's own
        ``result.json`` for the trial (``tune_last_epoch``) shows it already has it.
        """
        if checkpoint is None:
            return
        metrics_file = StoragePath.of(checkpoint) / METRICS_FILE
        if not metrics_file.exists():
            return
        rows = json.loads(metrics_file.read_text())
        seen = self.last_epoch if self.sent else tune_last_epoch
        for i, row in enumerate(rows):
            if seen is None or int(row["epoch"]) > seen:
                self.send({**row, CHECKPOINT_PATH_KEY: checkpoint} if i == len(rows) - 1 else row)


def tune_last_epoch(sweep_dir: StoragePath, trial_id: str) -> int | None:
    """The last epoch Tune recorded for a trial (its ``trial-<id>/result.json``), or None."""
    result = sweep_dir / f"trial-{trial_id}" / "result.json"
    if not result.exists():
        return None
    lines = [line for line in result.read_text().splitlines() if line.strip()]
    epochs = [int(row["epoch"]) for row in map(json.loads, lines) if "epoch" in row]
    return max(epochs) if epochs else None


# ---------------------------------------------------------------------------------------- in the actor
def _collect_previous_trial() -> None:
    """Collect what the previous trial in this reused actor left in reference cycles (its model,
    optimizer, loaders), without walking what the process imported.

    Half a million objects are tracked once torch, timm and Ray Tune are imported, and a full
    ``gc.collect()`` walks them all: 0.2 s per trial here (measured). They live as long as the
    process, so the first trial, which has nothing of a previous one to collect, moves them out of
    the collector's view (``gc.freeze``, the standard library's tool for long-lived heaps); later
    collections walk only what was made since. Frozen objects are still freed when their last
    reference goes; only cycles among them stay (a few dozen objects of import-time garbage here).
    """
    if gc.get_freeze_count():
        gc.collect()
    else:
        gc.freeze()


def run_in_actor(cfg: TrialConfig, run_location: str, *, tune_seen: int | None = None) -> None:
    """Train ``cfg`` in this process (a reused Tune trial actor), reporting every epoch to Tune.

    Every trial starts clean: the previous trial's model, optimizer and loaders are garbage once its
    call returned, and are collected here before anything new is built; ``train.run`` sets the seeds
    and torch's thread count from the config.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    import pf_sweep.train  # noqa: F401  torch and timm, imported before the heap is frozen
    from pf_sweep.run_dir import RunDirectory
    from pf_sweep.session import TuneSession  # torch: only in the trial actor, never in the driver

    _collect_previous_trial()
    run_dir = RunDirectory(run_location)
    refuse_if_diverged(run_dir.location)
    session = TuneSession(run_dir, device="cuda" if cfg.use_gpu else "cpu")

    def train_in_this_process(config: dict[str, Any]) -> None:
        from pf_sweep.train import run

        run(TrialConfig.from_dict(config), session)

    trainer = TorchTrainer(
        train_in_this_process,
        train_loop_config=cfg.to_dict(),
        scaling_config=ray.train.ScalingConfig(num_workers=0),  # Train's local mode: this process
        run_config=ray.train.RunConfig(name=run_dir.location.name, storage_path=str(run_dir.location.parent)),
    )
    try:
        try:
            trainer.fit()  # local mode: the loop's own exception comes out of fit()
        except TrainingDiverged as err:
            mark(run_dir.location, err)
            raise
        if not session.reports:  # restored after its last epoch had trained
            names = run_dir.checkpoints()
            if names:
                _TuneReporter().complete_from(str(run_dir.location / names[-1]), tune_seen)
    finally:
        run_dir.cleanup()


# ---------------------------------------------------------------------------------------- worker groups
def _train_unless_diverged(config: dict[str, Any], *, run_location: str) -> None:
    """A worker's ``train_loop``, refused when the run already diverged (a Ray Train restart,
    ``TrialConfig.max_failures``), and marking the run when it diverges now.

    Refusals here are not counted in the marker: the first rank to fail ends the others, so a count
    per rank would depend on timing; the trial-level refusals (Tune's retries, a resume) are."""
    from pf_sweep.train import train_loop

    refuse_if_diverged(run_location, count=False)
    try:
        train_loop(config)
    except TrainingDiverged as err:
        mark(run_location, err)  # any rank: the one that diverged first may not be rank 0
        raise


def _diverged_or(error: BaseException, run_location: StoragePath) -> BaseException:
    """A worker group's failure as the ``TrainingDiverged`` behind it (marked, earliest rank's step), else itself."""
    diverged = as_diverged(error)
    if diverged is None:
        return error
    mark(run_location, diverged)
    return diverged


def _report_to_queue_callback(queue: Any, last_epoch: int, delay_last_s: float):
    """A Ray Train ``UserCallback`` (runs in Train's controller) putting rank 0's reports into ``queue``."""
    from ray.train.v2.api.callback import UserCallback

    from pf_sweep.trial import checkpoint_location

    class ReportToQueue(UserCallback):
        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            item = dict(metrics[0])
            if checkpoint is not None:
                item[CHECKPOINT_PATH_KEY] = checkpoint_location(checkpoint)
            if delay_last_s > 0 and int(item.get("epoch", -1)) == last_epoch:
                late = threading.Timer(delay_last_s, queue.put, (item,))
                late.daemon = True  # may never fire: the controller can exit first
                late.start()
                return
            queue.put(item)  # unbounded queue: never blocks the controller

    return ReportToQueue()


def run_worker_group(
    cfg: TrialConfig,
    *,
    storage_path: str,
    name: str,
    callbacks: Sequence[Any] = (),
    tune_seen: int | None = None,
) -> None:
    """Fit a ``TorchTrainer`` worker group for ``cfg`` and forward its reports to Tune.

    Why this cannot deadlock: only this function's thread ever calls ``ray.tune.report``, one
    report at a time, while ``fit()`` runs in a helper thread. The Train controller's callback only
    puts items into an unbounded Ray queue, so it never waits on Tune; this thread takes them out
    and reports them. Once ``fit()`` has returned, this thread drains the queue and then reports,
    from the final checkpoint's stored history, any epoch that has still not arrived (a report
    delayed past the end of ``fit()``), before returning. Tune's own end-of-trial result is posted
    only after this function returns, so it can never meet a report still in flight.

    Guard: if ``fit()`` has not returned ``PF_SWEEP_FINISH_TIMEOUT_S`` seconds (default 120) after
    the last epoch was reported, the trial fails with a message and the sweep goes on.
    """
    from ray.util.queue import Empty, Queue

    from pf_sweep.trial import build_trainer, checkpoint_location

    location = StoragePath.of(storage_path) / name
    refuse_if_diverged(location)  # before any worker starts
    reports = Queue(actor_options={"num_cpus": 0})
    last_epoch = cfg.epochs - 1
    delay = float(os.environ.get(DELAY_LAST_REPORT_ENV, "0") or 0)
    bridge = _report_to_queue_callback(reports, last_epoch, delay)
    train_fn = functools.partial(_train_unless_diverged, run_location=str(location))
    trainer = build_trainer(cfg, storage_path=storage_path, name=name, callbacks=[bridge, *callbacks], train_fn=train_fn)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as err:  # re-raised in the trial's thread below
            outcome["error"] = err

    fitter = threading.Thread(target=fit, name=f"fit-{name}", daemon=True)
    fitter.start()
    reporter = _TuneReporter()
    timeout = float(os.environ.get(FINISH_TIMEOUT_ENV, DEFAULT_FINISH_TIMEOUT_S))
    finished_at: float | None = None
    try:
        while fitter.is_alive():
            with contextlib.suppress(Empty, queue_module.Empty):
                reporter.send(reports.get(timeout=0.25))
            if reporter.last_epoch == last_epoch and finished_at is None:
                finished_at = time.monotonic()
            if finished_at is not None and fitter.is_alive() and time.monotonic() - finished_at > timeout:
                raise TimeoutError(
                    f"Train run {name} reported its last epoch but fit() did not return within {timeout:g} s "
                    f"(set {FINISH_TIMEOUT_ENV} to wait longer); failing the trial"
                )
        while True:
            try:
                reporter.send(reports.get_nowait())
            except (Empty, queue_module.Empty):
                break
        error = outcome.get("error") or outcome["result"].error
        if error is not None:
            diverged = _diverged_or(error, location)
            if diverged is error:
                raise error
            raise diverged from None  # the reason says it all; the workers' tracebacks stay in Train's logs
        result = outcome["result"]
        reporter.complete_from(checkpoint_location(result.checkpoint) if result.checkpoint is not None else None, tune_seen)
    finally:
        reports.shutdown(force=True)
