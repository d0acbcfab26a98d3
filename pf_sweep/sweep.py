"""Launch and resume sweeps on Ray Tune: each Tune trial fits one Ray Train ``TorchTrainer``.

The pattern Ray 2.60 supports for Tune + Train V2 (RAY_NOTES.md): a *function* trainable that
builds a ``TorchTrainer`` and calls ``fit()``, with ``TuneReportCallback`` forwarding rank 0's
reports to Tune and so to Optuna and the scheduler. The trial actor itself asks for a token CPU
share; otherwise on a 2-CPU machine two trial actors would hold both CPUs and their Train workers
would never start.

Layout under ``<storage>/<name>/``: Tune's experiment state, ``sweep.json`` (what was asked for),
and ``runs/train-<trial id>/`` (each trial's Train run: checkpoints with config and metrics).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pf_sweep import __version__
from pf_sweep.config import TrialConfig
from pf_sweep.trial import build_trainer, ensure_ray

logger = logging.getLogger(__name__)
TRIAL_ACTOR_CPU = 0.01
SWEEP_FILE = "sweep.json"


class Space(Protocol):
    """What ``launch`` needs of a search space (``search_spaces.SearchSpace`` provides it)."""

    name: str
    base: dict[str, Any]
    suggest: Any
    grid: dict[str, list[Any]] | None
    points_to_evaluate: tuple[dict[str, Any], ...]
    metric: str
    mode: str


@dataclass
class SweepSettings:
    """The budget and resources of one sweep (stored as ``sweep.json``)."""

    num_samples: int
    max_concurrent: int
    seed: int = 0
    scheduler: str = "fifo"
    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    overrides: dict[str, Any] | None = None


def _trial_fn(config: dict[str, Any], base: dict[str, Any], runs_dir: str) -> None:
    """One Tune trial: a TorchTrainer on the suggested config, reporting back through Tune."""
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = TrialConfig.from_dict({**base, **config})
    name = f"train-{ray.tune.get_context().get_trial_id()}"
    result = build_trainer(cfg, storage_path=runs_dir, name=name, callbacks=[TuneReportCallback()]).fit()
    if result.error is not None:
        raise result.error


def trial_base(space: Space, settings: SweepSettings) -> dict[str, Any]:
    """The fixed TrialConfig fields of every trial: the space's base, overrides, resources."""
    base = {**space.base, **(settings.overrides or {})}
    base.update(
        num_workers=settings.workers_per_trial,
        cpus_per_worker=settings.cpus_per_worker,
        use_gpu=settings.gpus_per_worker > 0,
    )
    TrialConfig.from_dict(base)  # fail here, before any Ray work, if the fixed part is invalid
    return base


def _searcher(space: Space, settings: SweepSettings):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True)
    return OptunaSearch(
        space=space.suggest,
        metric=space.metric,
        mode=space.mode,
        points_to_evaluate=list(space.points_to_evaluate) or None,
        sampler=sampler,
    )


def _scheduler(space: Space, settings: SweepSettings, base: dict[str, Any]):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler == "asha":
        # `epoch` (reported by workers) rather than Tune's iteration count, which restarts on restore.
        return ASHAScheduler(time_attr="epoch", max_t=max(1, int(base.get("epochs", 10))), grace_period=1)
    return FIFOScheduler()


def launch(space: Space, settings: SweepSettings, *, storage_path: str, name: str, address: str | None = None):
    """Run the sweep to completion; returns Tune's ``ResultGrid``."""
    from ray import tune

    base = trial_base(space, settings)
    sweep_dir = Path(storage_path).expanduser().resolve() / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    (sweep_dir / SWEEP_FILE).write_text(
        json.dumps({"space": space.name, "settings": settings.__dict__, "base": base, "version": __version__}, indent=1)
    )
    ensure_ray(address)
    trainable = tune.with_resources(
        tune.with_parameters(_trial_fn, base=base, runs_dir=str(sweep_dir / "runs")), {"cpu": TRIAL_ACTOR_CPU}
    )
    if space.grid is not None:
        tune_config = tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            num_samples=1,
            max_concurrent_trials=settings.max_concurrent,
            scheduler=_scheduler(space, settings, base),
        )
        param_space = {k: tune.grid_search(v) for k, v in space.grid.items()}
    else:
        tune_config = tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            num_samples=settings.num_samples,
            max_concurrent_trials=settings.max_concurrent,
            search_alg=_searcher(space, settings),
            scheduler=_scheduler(space, settings, base),
        )
        param_space = None
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune_config,
        run_config=tune.RunConfig(name=name, storage_path=str(sweep_dir.parent)),
    )
    return tuner.fit()


def resume(sweep_path: str, *, address: str | None = None):
    """Continue an interrupted sweep: finished trials kept, unfinished ones resumed from checkpoints."""
    from ray import tune

    sweep_dir = Path(sweep_path).expanduser().resolve()
    meta = json.loads((sweep_dir / SWEEP_FILE).read_text())
    if not tune.Tuner.can_restore(str(sweep_dir)):
        raise ValueError(f"No restorable sweep at {sweep_dir}")
    ensure_ray(address)
    trainable = tune.with_resources(
        tune.with_parameters(_trial_fn, base=meta["base"], runs_dir=str(sweep_dir / "runs")), {"cpu": TRIAL_ACTOR_CPU}
    )
    tuner = tune.Tuner.restore(str(sweep_dir), trainable, resume_unfinished=True, resume_errored=True)
    return tuner.fit()


def summarize(results, metric: str, mode: str) -> tuple[dict[str, Any], Any]:
    """(best trial's config / metrics / checkpoint, per-trial DataFrame)."""
    best = results.get_best_result(metric=metric, mode=mode)
    frame = results.get_dataframe()
    return {
        "config": best.config,
        "metrics": {k: v for k, v in (best.metrics or {}).items() if isinstance(v, int | float)},
        "checkpoint": (best.metrics or {}).get("checkpoint_path"),
        "path": best.path,
    }, frame
