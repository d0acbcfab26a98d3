"""Launch and resume sweeps on Ray Tune.

Each Tune trial is a *function* trainable that runs one ``TrialConfig``, in one of two ways
(``pf_sweep.executors``): one-worker trials train inside the Tune trial actor, which Tune reuses
from trial to trial (``--executor auto``, the default); multi-worker trials (or every trial, with
``--executor workers``) fit a Ray Train ``TorchTrainer`` worker group and forward its reports to
Tune, and so to Optuna and the scheduler. A worker-group trial's actor asks for a token CPU share
only; otherwise on a 2-CPU machine two trial actors would hold both CPUs and their Train workers
would never start.

Layout under ``<storage>/<name>/``: Tune's experiment state, ``sweep.json`` (what was asked for),
``optuna.db`` (the Optuna study, for ``optuna-dashboard`` and Optuna's plots), and
``runs/train-<trial id>/`` (each trial's checkpoints with config and metrics).
``<storage>`` is a local directory or a URI (``s3://``, ``gs://``, ``file://``) read and written
through pyarrow filesystems, like Ray itself does.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pf_sweep import __version__, preflight
from pf_sweep.config import TrialConfig
from pf_sweep.executors import (
    EXECUTORS,
    run_in_actor,
    run_worker_group,
    runs_in_actor,
    trial_actor_resources,
    tune_last_epoch,
)
from pf_sweep.storage import StoragePath
from pf_sweep.trial import ensure_ray, environ_while, import_ray_for_local_use

logger = logging.getLogger(__name__)
SWEEP_FILE = "sweep.json"
OPTUNA_FILE = "optuna.db"
NO_DEFAULT_LOGGERS_ENV = "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"  # Tune's switch for its default loggers
EXPLICIT_LOGGERS_KEY = "explicit_loggers"  # in sweep.json: the sweep's callbacks name every logger it uses
# --log choice -> (package that must be importable, what to install).
LOGGERS = {"tensorboard": "tensorboardX", "wandb": "wandb", "mlflow": "mlflow"}


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
    max_failures: int = 1  # Tune-level retries of a failed trial; each retry resumes its Train run
    optuna_storage: str | None = None  # SQLAlchemy URL; None: sqlite file in a local sweep directory
    loggers: list[str] = field(default_factory=list)
    executor: str = "auto"  # "auto": one-worker trials train inside their (reused) Tune trial actor
    verbose: bool = False  # show Ray's own logs and Tune's trial tables on the console

    def validate(self) -> None:
        """Raise ValueError for settings that could never run (checked before Ray starts)."""
        for name in ("num_samples", "max_concurrent", "workers_per_trial"):
            if getattr(self, name) < 1:
                raise ValueError(f"Invalid {name}: {getattr(self, name)} (must be >= 1)")
        if self.scheduler not in ("fifo", "asha"):
            raise ValueError(f"Invalid scheduler: {self.scheduler!r} (allowed: fifo, asha)")
        if self.cpus_per_worker <= 0 or self.gpus_per_worker < 0:
            raise ValueError("Invalid resources: cpus_per_worker must be > 0 and gpus_per_worker >= 0")
        if self.max_failures < 0:
            raise ValueError(f"Invalid max_failures: {self.max_failures} (must be >= 0)")
        if self.executor not in EXECUTORS:
            raise ValueError(f"Invalid executor: {self.executor!r} (allowed: {', '.join(EXECUTORS)})")
        for name in self.loggers:
            if name not in LOGGERS:
                raise ValueError(f"Invalid logger: {name!r} (allowed: {', '.join(LOGGERS)})")
            if importlib.util.find_spec(LOGGERS[name]) is None:
                raise ValueError(f"--log {name} needs the {LOGGERS[name]!r} package: pip install {LOGGERS[name]}")
        if self.optuna_storage is not None:
            import sqlalchemy.engine

            try:
                sqlalchemy.engine.make_url(self.optuna_storage)
            except Exception as err:  # sqlalchemy raises its own ArgumentError
                raise ValueError(f"Invalid Optuna storage URL {self.optuna_storage!r}: {err}") from None


def _trial_fn(config: dict[str, Any], base: dict[str, Any], runs_dir: str, in_actor: bool) -> None:
    """One Tune trial: the suggested config, trained in this actor or on a worker group."""
    import ray.tune

    cfg = TrialConfig.from_dict({**base, **config})
    trial_id = ray.tune.get_context().get_trial_id()
    name = f"train-{trial_id}"
    # What Tune already recorded of this trial (non-empty only when a resumed sweep reruns it).
    seen = tune_last_epoch(StoragePath.of(runs_dir).parent, trial_id)
    if in_actor:
        run_in_actor(cfg, str(StoragePath.of(runs_dir) / name), tune_seen=seen)
    else:
        run_worker_group(cfg, storage_path=runs_dir, name=name, tune_seen=seen)


def trial_base(space: Space, settings: SweepSettings) -> dict[str, Any]:
    """The fixed TrialConfig fields of every trial: the space's base, overrides, resources."""
    base = {**space.base, **(settings.overrides or {})}
    base.update(
        num_workers=settings.workers_per_trial,
        cpus_per_worker=settings.cpus_per_worker,
        use_gpu=settings.gpus_per_worker > 0,
    )
    if settings.gpus_per_worker > 0:
        base["gpus_per_worker"] = settings.gpus_per_worker
    base.update(_global_batch_split(space, settings, space.base.get("batch_size", TrialConfig.batch_size)))
    if getattr(space, "points", None) is None:
        TrialConfig.from_dict(base)  # fail here, before any Ray work, if the fixed part is invalid
    else:  # a preset's runs complete its base: each run is checked, with --set on top
        for run in space.points:
            TrialConfig.from_dict({**base, **run_params(space, run, settings)})
    return base


def _global_batch_split(space: Space, settings: SweepSettings, most: int) -> dict[str, int]:
    """batch_size and grad_accum_steps making up the space's global batch on this many workers, with
    at most ``most`` examples per worker; nothing without a global batch or when --set gives either."""
    global_batch = getattr(space, "global_batch", None)
    if not global_batch or {"batch_size", "grad_accum_steps"} & set(settings.overrides or {}):
        return {}
    from search_spaces.base import resolve_global_batch

    batch, accum = resolve_global_batch(global_batch, settings.workers_per_trial, most)
    return {"batch_size": batch, "grad_accum_steps": accum}


def run_params(space: Space, run: str, settings: SweepSettings) -> dict[str, Any]:
    """A preset run's Tune parameters: its fields and name, then --set overrides (the user's word wins).

    A run that sets its own ``batch_size`` (the most one worker takes) gets its own split of the
    preset's global batch.
    """
    params = space.point(run)
    if "batch_size" in params:
        params.update(_global_batch_split(space, settings, params["batch_size"]))
    return {**params, **(settings.overrides or {})}


def run_config(space: Space, run: str, settings: SweepSettings) -> TrialConfig:
    """The TrialConfig a sweep with ``settings`` trains for the preset run ``run``."""
    return TrialConfig.from_dict({**trial_base(space, settings), **run_params(space, run, settings)})


def named_run_points(space: Space, settings: SweepSettings, base: dict[str, Any]) -> tuple[list[dict], dict[str, Any]]:
    """A preset's runs as Tune points to evaluate, and the parameter space they must lie in.

    Tune takes a point's keys from its parameter space, and samples any key a point lacks: so every
    point carries every key some run sets (a run that does not set it gets the base's value), and
    each key's domain is the choice of the values the runs give it.
    """
    from ray import tune

    runs = [run_params(space, run, settings) for run in space.points]
    keys = list(dict.fromkeys(k for params in runs for k in params))
    defaults = json.loads(json.dumps({**TrialConfig().to_dict(), **base}))  # base may need a run to be valid
    points = [{k: params.get(k, defaults.get(k)) for k in keys} for params in runs]
    choices = {k: list({json.dumps(p[k], sort_keys=True): p[k] for p in points}.values()) for k in keys}
    return points, {k: tune.choice(values) for k, values in choices.items()}


def planned_trials(space: Space, settings: SweepSettings) -> int:
    """How many trials the sweep runs: every named run or grid point, or the sample budget."""
    if getattr(space, "points", None) is not None:
        return len(space.points)
    if space.grid is None:
        return settings.num_samples
    return math.prod(len(values) for values in space.grid.values())


def redact_url(url: str | None) -> str | None:
    """A database URL with its password masked (``***``): what ``sweep.json`` and the console show.

    Tune's saved searcher state still holds the live connection's URL; keep the password out of the
    URL altogether (``PGPASSWORD``, ``~/.pgpass``, a MySQL option file) where that matters.
    """
    if not url or url.startswith("sqlite"):
        return url
    import sqlalchemy.engine

    return sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)


def optuna_storage_url(settings: SweepSettings, sweep_dir: StoragePath) -> str | None:
    """Where the Optuna study lives: the flag's URL, else ``optuna.db`` beside a local sweep.

    A sweep on cloud storage without a URL keeps its study in memory (SQLite cannot live on object
    storage); Tune's own searcher checkpoint still carries it across a resume.
    """
    if settings.optuna_storage:
        return settings.optuna_storage
    return f"sqlite:///{sweep_dir / OPTUNA_FILE}" if sweep_dir.is_local else None


def open_study_storage(url: str, study_name: str, *, ours: bool):
    """The Optuna RDB storage at ``url``, made ready for a new study called ``study_name``.

    A study of that name in our own ``optuna.db`` is a leftover of a launch that failed before Tune
    saved anything, and is dropped; in a storage the user named it may be another sweep's, so it is
    refused. Errors (driver missing, server unreachable) become ValueError.
    """
    import optuna

    try:
        storage = optuna.storages.RDBStorage(url)
        exists = study_name in {s.study_name for s in optuna.get_all_study_summaries(storage)}
    except Exception as err:  # SQLAlchemy and driver errors have no common base worth naming
        raise ValueError(f"Cannot open the Optuna storage {url!r}: {err}") from None
    if exists and not ours:
        raise ValueError(f"Optuna study {study_name!r} already exists in {url}: pick another --name, or delete that study")
    if exists:
        optuna.delete_study(study_name=study_name, storage=storage)
    return storage


def _searcher(space: Space, settings: SweepSettings, study_name: str, storage_url: str | None):
    import optuna

    from pf_sweep.optuna_search import ResumableOptunaSearch

    sampler = optuna.samplers.TPESampler(seed=settings.seed, multivariate=True)
    storage = None
    if storage_url is not None:
        storage = open_study_storage(storage_url, study_name, ours=settings.optuna_storage is None)
    return ResumableOptunaSearch(
        space=space.suggest,
        metric=space.metric,
        mode=space.mode,
        points_to_evaluate=list(space.points_to_evaluate) or None,
        sampler=sampler,
        study_name=study_name,
        storage=storage,
    )


def _scheduler(space: Space, settings: SweepSettings, base: dict[str, Any]):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if settings.scheduler == "asha":
        # `epoch` (reported by workers) rather than Tune's iteration count, which restarts on restore.
        return ASHAScheduler(time_attr="epoch", max_t=max(1, int(base.get("epochs", 10))), grace_period=1)
    return FIFOScheduler()


def _callbacks(
    settings: SweepSettings, space: Space, sweep_dir: StoragePath, name: str, total: int, given: Sequence[Any] = ()
) -> list[Any]:
    """The progress line, Tune's two file loggers (``result.json``, ``progress.csv``) and the ``--log`` trackers.

    The file loggers are listed here because Tune's own defaults are turned off (``_tune_loggers_as_given``);
    one that the caller already ``given`` is not added twice (each would write every row).
    """
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from pf_sweep.progress import SweepProgress

    callbacks: list[Any] = [SweepProgress(space.metric, space.mode, total)]
    for file_logger in (JsonLoggerCallback, CSVLoggerCallback):
        if not any(isinstance(c, file_logger) for c in given):
            callbacks.append(file_logger())
    for logger_name in settings.loggers:
        if logger_name == "tensorboard":
            from ray.tune.logger import TBXLoggerCallback

            callbacks.append(TBXLoggerCallback())
        elif logger_name == "wandb":
            from ray.air.integrations.wandb import WandbLoggerCallback

            callbacks.append(WandbLoggerCallback(project=name))
        elif logger_name == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            uri = os.environ.get("MLFLOW_TRACKING_URI") or (f"file://{sweep_dir / 'mlruns'}" if sweep_dir.is_local else None)
            callbacks.append(MLflowLoggerCallback(tracking_uri=uri, experiment_name=name))
    return callbacks


@contextlib.contextmanager
def _tune_loggers_as_given(enabled: bool = True):
    """Tune runs with the callbacks it is given, without adding its default loggers.

    Unasked, Tune adds a TensorBoard logger to every sweep: it imports tensorboardX, and with it torch,
    into the driver (which otherwise never imports torch) and writes event files into every trial's
    directory. ``--log tensorboard`` asks for it. Tune reads the switch when ``fit()`` starts, so it is
    set around that call only. Sweeps stored before pf-sweep listed its loggers (no ``EXPLICIT_LOGGERS_KEY``
    in sweep.json) resume with Tune's defaults, since their saved callbacks lack the two file loggers.
    """
    with environ_while(NO_DEFAULT_LOGGERS_ENV, "1" if enabled else None, override=True):
        yield


def trial_dirname(trial: Any) -> str:
    """Tune's directory of a trial: its id, like the Train run (Tune's default adds params and a timestamp)."""
    return f"trial-{trial.trial_id}"


def _trainable(base: dict[str, Any], sweep_dir: StoragePath, in_actor: bool):
    from ray import tune

    trial = tune.with_parameters(_trial_fn, base=base, runs_dir=str(sweep_dir / "runs"), in_actor=in_actor)
    return tune.with_resources(trial, trial_actor_resources(base, in_actor))


def ensure_sweep_ray(address: str | None = None, *, verbose: bool = False, worker_groups: bool = True) -> None:
    """Join ``address``, or start a local Ray that advertises one logical CPU more than the machine.

    The extra CPU holds worker-group trials' token shares (``TRIAL_ACTOR_CPU`` each). Without it,
    two 1-worker trials on 2 CPUs need 2.02 CPUs, and the second trial's workers waited for the
    first trial to end (measured by benchmarks/sweep_efficiency.py: 2 slots, never both busy).
    Trials still get at most the real CPUs: the CLI caps concurrency at CPUs // CPUs per trial.
    ``worker_groups=False`` (every trial trains in its actor) leaves out the dashboard they need.
    """
    ensure_ray(address, num_cpus=None if address else (os.cpu_count() or 1) + 1, verbose=verbose, dashboard=worker_groups)


def _schedule_watchdog(base: dict[str, Any], in_actor: bool, *, local: bool):
    """Refuse trials the local Ray can never hold (ValueError); the callback that bounds waiting for resources."""
    from pf_sweep.scheduling import ScheduleWatchdog, check_trial_fits, schedule_timeout

    schedule_timeout()  # a malformed PF_SWEEP_SCHEDULE_TIMEOUT_S fails now, not at the first poll
    check_trial_fits(base, in_actor, local=local)
    return ScheduleWatchdog(base, in_actor)


def uses_worker_groups(settings: dict[str, Any]) -> bool:
    """Whether a sweep with these stored settings (``sweep.json``) starts Ray Train worker groups."""
    return not runs_in_actor(settings.get("executor", "workers"), int(settings.get("workers_per_trial", 1)))


def launch(
    space: Space,
    settings: SweepSettings,
    *,
    storage_path: str,
    name: str,
    address: str | None = None,
    callbacks: Sequence[Any] = (),
):
    """Run the sweep to completion; returns Tune's ``ResultGrid``. ``callbacks``: extra Tune callbacks.

    Raises ``ValueError`` when a trial can never fit on the local Ray (``address=None``), and
    ``pf_sweep.scheduling.UnschedulableError`` when trials waited ``PF_SWEEP_SCHEDULE_TIMEOUT_S``
    seconds for resources with none training (a resumable sweep is left behind).
    """
    from pf_sweep.preflight import check_sweep

    check_sweep(space, settings, storage_path=storage_path, address=address)  # before any Ray work: ValueError
    if address is None:
        import_ray_for_local_use()  # before Ray's first import: a local Ray on 127.0.0.1 only
    from ray import tune

    settings.validate()
    base = trial_base(space, settings)
    sweep_dir = StoragePath.of(storage_path) / name
    sweep_dir.mkdir()
    storage_url = optuna_storage_url(settings, sweep_dir)
    total = planned_trials(space, settings)
    meta = {
        "space": space.name,
        "space_module": _suggest_module(space),
        "metric": space.metric,
        "mode": space.mode,
        "settings": {**settings.__dict__, "optuna_storage": redact_url(settings.optuna_storage)},
        "base": base,
        "optuna_storage": redact_url(storage_url),
        "trials": total,
        EXPLICIT_LOGGERS_KEY: True,
    }
    in_actor = runs_in_actor(settings.executor, settings.workers_per_trial)
    ensure_sweep_ray(address, verbose=settings.verbose, worker_groups=not in_actor)
    watchdog = _schedule_watchdog(base, in_actor, local=address is None)
    if getattr(space, "points", None) is not None:  # named runs, each once, in the preset's order
        from ray.tune.search.basic_variant import BasicVariantGenerator

        points, param_space = named_run_points(space, settings, base)
        search = {"num_samples": len(points), "search_alg": BasicVariantGenerator(points_to_evaluate=points)}
    elif space.grid is not None:
        search = {"num_samples": 1}
        param_space = {k: tune.grid_search(v) for k, v in space.grid.items()}
    else:
        search = {"num_samples": settings.num_samples, "search_alg": _searcher(space, settings, name, storage_url)}
        param_space = None
    tuner = tune.Tuner(
        _trainable(base, sweep_dir, in_actor),
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=space.metric,
            mode=space.mode,
            max_concurrent_trials=settings.max_concurrent,
            scheduler=_scheduler(space, settings, base),
            trial_dirname_creator=trial_dirname,
            # One process per concurrent slot for the whole sweep. Worker-group trials are not
            # reused: ending their actor is what ends a stopped trial's Train controller and workers.
            reuse_actors=in_actor,
            **search,
        ),
        run_config=_run_config(settings, space, sweep_dir, name, total, [*callbacks, watchdog]),
    )
    # Written once Tune has saved its own state (tuner.pkl, at construction): a sweep.json always
    # marks a sweep that `resume` can continue, and a launch that failed earlier can simply be rerun.
    (sweep_dir / SWEEP_FILE).write_text(json.dumps({**meta, "version": __version__}, indent=1))
    with _tune_loggers_as_given():
        return tuner.fit()


def _run_config(settings: SweepSettings, space: Space, sweep_dir: StoragePath, name: str, total: int, extra: Sequence[Any]):
    from ray import tune

    return tune.RunConfig(
        name=name,
        storage_path=str(sweep_dir.parent),
        failure_config=tune.FailureConfig(max_failures=settings.max_failures),
        callbacks=[*_callbacks(settings, space, sweep_dir, name, total, given=extra), *extra],
        # Quiet by default: the progress line per trial; --verbose brings back Tune's trial tables.
        verbose=2 if settings.verbose else 0,
    )


def read_sweep(sweep_path: str | StoragePath) -> dict[str, Any]:
    """The stored ``sweep.json`` of a sweep directory (or URI); ValueError when it is missing or is
    not pf-sweep's (no ``base`` and ``settings``), naming the file."""
    sweep_dir = StoragePath.of(sweep_path)
    meta_file = sweep_dir / SWEEP_FILE
    hint = "check --storage and --name"
    if not meta_file.exists():
        raise ValueError(f"No sweep at {sweep_dir} (it has no {SWEEP_FILE}); {hint}")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"Not a sweep: {meta_file} cannot be read as JSON ({err}); {hint}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("base"), dict) or not isinstance(meta.get("settings"), dict):
        raise ValueError(f"Not a sweep: {meta_file} lacks pf-sweep's 'base' and 'settings'; {hint}")
    return meta


def _suggest_module(space: Space) -> dict[str, str] | None:
    """Where an Optuna space's ``suggest`` lives: {"name": module, "file": path}, for ``resume``."""
    module = sys.modules.get(getattr(getattr(space, "suggest", None), "__module__", None) or "")
    path = getattr(module, "__file__", None)
    return {"name": module.__name__, "file": os.path.abspath(path)} if module is not None and path else None


def _import_suggest_module(source: dict[str, str] | None, sweep_dir: StoragePath) -> None:
    """Make the launch's ``suggest`` module importable again: Tune's saved searcher (pickled by
    reference) names it, and a user's space file (``--space my_space.py``) is on no import path."""
    if not source or source["name"] in sys.modules:
        return
    try:
        importlib.import_module(source["name"])
        return
    except ImportError:
        pass
    if not os.path.isfile(source["file"]):
        raise ValueError(f"Cannot resume {sweep_dir}: its space file {source['file']} is gone (put it back there)")
    spec = importlib.util.spec_from_file_location(source["name"], source["file"])
    module = importlib.util.module_from_spec(spec)
    sys.modules[source["name"]] = module
    spec.loader.exec_module(module)


def resume(sweep_path: str, *, address: str | None = None, verbose: bool = False):
    """Continue an interrupted sweep: finished trials kept, unfinished ones resumed from checkpoints.

    The searcher (with its Optuna study), the scheduler and the callbacks (``--log`` trackers, the
    progress line) all come back from Tune's saved state, as they were at launch.
    """
    if address is None:
        import_ray_for_local_use()  # before Ray's first import: a local Ray on 127.0.0.1 only
    from ray import tune

    sweep_dir = StoragePath.of(sweep_path)
    meta = preflight.read_resumable(sweep_dir)
    _import_suggest_module(meta.get("space_module"), sweep_dir)
    if not tune.Tuner.can_restore(str(sweep_dir)):
        raise ValueError(f"No restorable sweep at {sweep_dir} (Tune saved no experiment state there)")
    settings = meta.get("settings", {})
    in_actor = not uses_worker_groups(settings)
    ensure_sweep_ray(address, verbose=verbose, worker_groups=not in_actor)
    # Sweeps launched with a ScheduleWatchdog get it back from Tune's saved run config.
    _schedule_watchdog(meta["base"], in_actor, local=address is None)
    tuner = tune.Tuner.restore(
        str(sweep_dir),
        _trainable(meta["base"], sweep_dir, in_actor),
        resume_unfinished=True,
        resume_errored=True,
    )
    with _tune_loggers_as_given(bool(meta.get(EXPLICIT_LOGGERS_KEY))):
        return tuner.fit()


def ended_trials(results) -> int:
    """Trials that finished (Tune saw their last result, ``done``) or failed.

    Not the count of TERMINATED ones: after an interrupt Tune also marks TERMINATED the trials it
    stopped, running or still pending, which ``--resume`` runs again.
    """
    return sum(1 for result in results if result.error is not None or (result.metrics or {}).get("done"))


def _with_unlogged_trials(frame, results):
    """Add the trials whose ``result.json`` lacks rows Tune has in its own state.

    ``get_dataframe`` reads each trial's ``result.json``; a write the storage refused (a full or
    unmounted volume) can leave that file empty while Tune's saved experiment state kept the trial's
    last result, so the trial would be missing from ``summary.csv`` although it finished.
    """
    import pandas as pd

    listed = set(frame["trial_id"]) if "trial_id" in frame else set()
    missing = []
    for result in results:
        metrics = dict(result.metrics or {})
        if not metrics or metrics.get("trial_id") in listed:
            continue
        config = metrics.pop("config", None) or result.config or {}
        missing.append({**metrics, **{f"config/{k}": v for k, v in config.items()}, "logdir": result.path})
    return pd.concat([frame, pd.DataFrame(missing)], ignore_index=True) if missing else frame


def best_result(results, metric: str, mode: str):
    """The result whose last ``metric`` is best (NaN and infinities left out); equal scores go to the
    trial that reported its last result first, then to the smaller trial id.

    Not Tune's ``get_best_result``: it keeps the first of equal scores in its own result order, which
    ``--resume`` changes, so the same finished sweep could name another best trial once resumed.
    RuntimeError when no trial reported ``metric`` (as Tune's).
    """

    def score(result) -> float | None:
        value = (result.metrics or {}).get(metric)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        return float(value) if ok else None

    scored = [(value, result) for result in results if (value := score(result)) is not None]
    if not scored:
        raise RuntimeError(f"No trial reported a finite {metric!r}")
    sign = -1.0 if mode == "max" else 1.0

    def rank(item: tuple[float, Any]) -> tuple[float, float, str]:
        value, result = item
        metrics = result.metrics or {}
        return sign * value, float(metrics.get("timestamp", math.inf)), str(metrics.get("trial_id", ""))

    return min(scored, key=rank)[1]


def summarize(results, metric: str, mode: str) -> tuple[dict[str, Any], Any]:
    """(best trial's config / metrics / checkpoint, per-trial DataFrame)."""
    best = best_result(results, metric, mode)
    frame = _with_unlogged_trials(results.get_dataframe(), results)
    return {
        "config": best.config,
        "metrics": {k: v for k, v in (best.metrics or {}).items() if isinstance(v, int | float)},
        "checkpoint": (best.metrics or {}).get("checkpoint_path"),
        "path": best.path,
    }, frame
