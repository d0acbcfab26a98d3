"""Measure every checkpoint of a sweep on Ray, on the same terms for every trial, with a cache.

``measure_sweep(path, measures=[...], rho_eval=[...])`` runs one Ray task per (trial checkpoint,
measure) and returns a tidy DataFrame, one row per (trial, measure setting, statistic). Every trial
is measured the same way: ``data`` is a split of the trial's own dataset (TFDS slicing syntax, eval
transforms, no augmentation, fixed batches: what ``analysis.checkpoints.load_measurable`` gives),
the same ``seed``, the same ``m`` and the same ``rho_eval`` grid, never the trial's training rho.

Results are cached beside the sweep, ``<sweep>/measures/<trial_id>/<key>.json``: one file per
(trial, measure, settings), ``key`` a short hash of the checkpoint directory's name, the measure's
name and every setting that changes its value (a rho measure has one file per rho). A second call
computes nothing; a trial added later, a new rho, another ``data`` or ``seed`` computes only what is
new. A checkpoint is named after its epoch and written once, so the trial and the checkpoint's name
identify its weights (a copied sweep keeps its cache). A failed task is reported as a row with an
``error`` and is not cached, so the next call retries it.

``wide(df)`` turns the result into one row per trial, one column per measure setting, ready to be
merged with ``analysis.load_sweep`` on (``sweep``, ``trial_id``) and passed to
``analysis.correlation.table``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pf_sweep.storage import StoragePath, is_uri

logger = logging.getLogger(__name__)

CACHE_DIR = "measures"
COLUMNS = ["sweep", "trial_id", "checkpoint", "measure", "rho", "statistic", "value", "error", "seconds"]
_KEY_LENGTH = 16
_ALL_EXAMPLES = sys.maxsize  # load_measurable's n when ``data`` itself says how many examples
_FORGET_PREFIX = "forget/"
_EXAMPLES_PREFIX = "examples/"


# ---------------------------------------------------------------------------------------- measures


@dataclass(frozen=True)
class Options:
    """The settings shared by every trial of one ``measure_sweep`` call."""

    data: str
    m: int
    batch_size: int
    seed: int
    interpolation: str | None = None  # of the eval transform; None: the trial's own eval_interpolation


@dataclass(frozen=True)
class Measure:
    """A named measure: what it computes, which shared settings change its value, its fixed parameters.

    ``compute(loaded, rho, options)`` returns statistic -> number (``"value"`` for a single number).
    ``loaded`` is an ``analysis.checkpoints.Measurable`` when ``uses_model``, else a ``_Trial`` view
    (checkpoint directory and history).
    """

    name: str
    compute: Callable[[Any, float | None, Options], dict[str, float]]
    settings: tuple[str, ...] = ()
    fixed: Mapping[str, Any] = field(default_factory=dict)
    uses_rho: bool = False
    uses_model: bool = True


def _hessian_top(ms: Any, rho: float | None, opts: Options) -> dict[str, float]:
    from analysis import hessian

    return {"value": float(hessian.top_eigenvalues(ms.model, ms.loss_fn, ms.data, k=1, seed=opts.seed)[0])}


def _hessian_trace(ms: Any, rho: float | None, opts: Options) -> dict[str, float]:
    from analysis import hessian

    estimate, stderr = hessian.trace(ms.model, ms.loss_fn, ms.data, seed=opts.seed)
    return {"value": float(estimate), "stderr": float(stderr)}


def _worst_case(norm: str, adaptive: bool) -> Callable[[Any, float | None, Options], dict[str, float]]:
    def compute(ms: Any, rho: float | None, opts: Options) -> dict[str, float]:
        from analysis import sharpness

        value = sharpness.worst_case(
            ms.model, ms.loss_fn, ms.data, rho=rho, m=opts.m, adaptive=adaptive, norm=norm, seed=opts.seed
        )
        return {"value": float(value)}

    return compute


def _average_case(adaptive: bool) -> Callable[[Any, float | None, Options], dict[str, float]]:
    def compute(ms: Any, rho: float | None, opts: Options) -> dict[str, float]:
        from analysis import sharpness

        return {"value": float(sharpness.average_case(ms.model, ms.loss_fn, ms.data, rho=rho, adaptive=adaptive, seed=opts.seed))}

    return compute


def _sam_sharpness(adaptive: bool) -> Callable[[Any, float | None, Options], dict[str, float]]:
    def compute(ms: Any, rho: float | None, opts: Options) -> dict[str, float]:
        from analysis import sharpness

        return {"value": float(sharpness.sam_sharpness(ms.model, ms.loss_fn, ms.data, rho=rho, m=opts.m, adaptive=adaptive))}

    return compute


def _forgetting(trial: _Trial, rho: float | None, opts: Options) -> dict[str, float]:
    """``forget/*`` aggregates of the history, plus Toneva et al.'s counts when the checkpoint has a record."""
    from analysis import forgetting

    out = forgetting.summarize(trial.history) if trial.history else {}
    if (Path(trial.checkpoint) / forgetting.EXAMPLES_FILE).is_file():
        counts = forgetting.forgetting_counts(forgetting.load_record(trial.checkpoint))
        out.update({_EXAMPLES_PREFIX + name: value for name, value in counts.items()})
    if not out:
        raise ValueError("nothing to summarize: the trial reported no forget/* metric and its checkpoint has no examples.npz")
    return {name: float(value) for name, value in out.items()}


_MODEL = ("data", "batch_size")
_WORST = {"n_iters": 20, "init": "zero", "n_restarts": 1}
MEASURES: dict[str, Measure] = {
    m.name: m
    for m in (
        Measure("hessian_top", _hessian_top, (*_MODEL, "seed"), {"k": 1, "method": "lanczos", "tol": 1e-3}),
        Measure("hessian_trace", _hessian_trace, (*_MODEL, "seed"), {"method": "hutch++", "n_probes": 100}),
        Measure("worst_case_linf_adaptive", _worst_case("linf", True), (*_MODEL, "m", "seed"), _WORST, uses_rho=True),
        Measure("worst_case_linf", _worst_case("linf", False), (*_MODEL, "m", "seed"), _WORST, uses_rho=True),
        Measure("worst_case_l2_adaptive", _worst_case("l2", True), (*_MODEL, "m", "seed"), _WORST, uses_rho=True),
        Measure("worst_case_l2", _worst_case("l2", False), (*_MODEL, "m", "seed"), _WORST, uses_rho=True),
        Measure("average_case_adaptive", _average_case(True), (*_MODEL, "seed"), {"n_samples": 20}, uses_rho=True),
        Measure("average_case", _average_case(False), (*_MODEL, "seed"), {"n_samples": 20}, uses_rho=True),
        Measure("sam_sharpness", _sam_sharpness(False), (*_MODEL, "m"), uses_rho=True),
        Measure("sam_sharpness_adaptive", _sam_sharpness(True), (*_MODEL, "m"), uses_rho=True),
        Measure("forgetting", _forgetting, uses_model=False),
    )
}


def names() -> list[str]:
    """The registered measure names."""
    return list(MEASURES)


# ---------------------------------------------------------------------------------------- validation


def _check_measures(measures: Sequence[str]) -> list[Measure]:
    if isinstance(measures, str) or not isinstance(measures, Sequence) or not measures:
        raise ValueError(f"measures: {measures!r} must be a non-empty list of names; known: {', '.join(MEASURES)}")
    unknown = [m for m in measures if m not in MEASURES]
    if unknown:
        raise ValueError(f"measures: unknown {', '.join(map(repr, unknown))}; known: {', '.join(MEASURES)}")
    return [MEASURES[m] for m in dict.fromkeys(measures)]


def _check_rho_eval(rho_eval: Sequence[float], chosen: list[Measure]) -> list[float]:
    if isinstance(rho_eval, str) or not isinstance(rho_eval, Sequence):
        raise ValueError(f"rho_eval: {rho_eval!r} must be a list of positive numbers")
    values = []
    for rho in rho_eval:
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not (math.isfinite(rho) and rho > 0):
            raise ValueError(f"rho_eval: {rho!r} is not a positive finite number")
        values.append(float(rho))
    needing = [m.name for m in chosen if m.uses_rho]
    if needing and not values:
        raise ValueError(
            f"rho_eval: empty, but these measures take rho: {', '.join(needing)}; "
            "pass the grid shared by all trials, e.g. [0.001, 0.002]"
        )
    return list(dict.fromkeys(values))


def _check_options(data: str, m: int, batch_size: int, seed: int, interpolation: str | None = None) -> Options:
    if not isinstance(data, str) or not data.strip():
        raise ValueError(f"data: {data!r} must be a split in TFDS slicing syntax, e.g. 'train[:1024]'")
    for name, value in (("m", m), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: {value!r} must be a positive int")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed: {seed!r} must be an int")
    if interpolation not in (None, "bilinear", "bicubic", "nearest"):
        raise ValueError(f"interpolation: {interpolation!r} must be bilinear, bicubic, nearest or None")
    return Options(data=data, m=m, batch_size=batch_size, seed=seed, interpolation=interpolation)


def _select(trials: pd.DataFrame, trial_ids: Sequence[str] | None, statuses: Sequence[str]) -> pd.DataFrame:
    """The trials asked for by id (whatever their status), else those with one of ``statuses``."""
    if trial_ids is None:
        if isinstance(statuses, str):
            statuses = (statuses,)
        return trials[trials["status"].isin(list(statuses))]
    ids = [trial_ids] if isinstance(trial_ids, str) else list(trial_ids)
    unknown = sorted(set(ids) - set(trials["trial_id"]))
    if unknown:
        raise ValueError(f"trial_ids: {', '.join(unknown)} not in the sweep; it has {', '.join(trials['trial_id'])}")
    return trials.set_index("trial_id").loc[list(dict.fromkeys(ids))].reset_index()


# ---------------------------------------------------------------------------------------- cache


def settings_of(measure: Measure, options: Options, rho: float | None) -> dict[str, Any]:
    """Everything that changes a measure's value, besides the checkpoint: what the cache key hashes."""
    settings: dict[str, Any] = {name: getattr(options, name) for name in measure.settings}
    settings.update(measure.fixed)
    if measure.uses_model and options.interpolation is not None:  # absent by default: older cache keys stay valid
        settings["interpolation"] = options.interpolation
    if measure.uses_rho:
        settings["rho"] = rho
    return settings


def cache_key(checkpoint: str, measure: str, settings: Mapping[str, Any]) -> str:
    """A short stable hash of (checkpoint directory name, measure name, settings)."""
    text = json.dumps({"checkpoint": StoragePath.of(checkpoint).name, "measure": measure, "settings": settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:_KEY_LENGTH]


def _cache_file(root: StoragePath, trial_id: str, key: str) -> StoragePath:
    return root / CACHE_DIR / trial_id / f"{key}.json"


def _read_cache(target: StoragePath) -> dict[str, Any] | None:
    """A cache entry, or None when missing or unreadable (then it is computed again)."""
    try:
        if not target.is_local and not target.exists():
            return None
        entry = json.loads(target.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return entry if isinstance(entry, dict) and isinstance(entry.get("statistics"), list) else None


def _write_cache(target: StoragePath, entry: dict[str, Any]) -> None:
    """Atomic on local disks (tmp file + rename): a reader never sees half an entry."""
    text = json.dumps(entry, indent=1, sort_keys=True)
    target.parent.mkdir()
    if not target.is_local:
        target.write_text(text)  # an object store's put is atomic
        return
    path = Path(str(target))
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- the Ray task


@dataclass
class _Trial:
    """What the forgetting measure reads: the checkpoint directory and the trial's reports."""

    checkpoint: str
    history: list[dict[str, Any]]


@contextlib.contextmanager
def _local_checkpoint(checkpoint: str) -> Iterator[str]:
    """The checkpoint as a local directory: itself, or a temporary copy of a URI's files."""
    if not is_uri(checkpoint):
        yield checkpoint
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory(prefix="pf-measure-") as tmp:
        pyarrow.fs.copy_files(checkpoint, tmp)
        yield tmp


def _error_line(exc: BaseException) -> str:
    """``Type: message``, the first line of a multi-line message (what a traceback's last line shows)."""
    line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return line.splitlines()[0] if line else type(exc).__name__


def measure_task(
    checkpoint: str,
    measure: str,
    rhos: Sequence[float | None],
    options: Options,
    history: list[dict[str, Any]],
    device: str = "cpu",
) -> dict[str, Any]:
    """One (checkpoint, measure) for every rho asked: {"results": [(rho, statistics, seconds)]} or {"error": line}.

    Runs in a Ray task; also callable directly. Exceptions become an ``error`` entry so one bad
    checkpoint costs one row, not the sweep.
    """
    spec = MEASURES[measure]
    try:
        with _local_checkpoint(checkpoint) as local:
            if not Path(local).is_dir():
                raise ValueError(f"No checkpoint at {checkpoint}: not a directory")
            loaded: Any = _Trial(local, history)
            if spec.uses_model:
                from analysis.checkpoints import load_measurable

                loaded = load_measurable(
                    local, split=options.data, n=_ALL_EXAMPLES, batch_size=options.batch_size, interpolation=options.interpolation
                )
                loaded.model.to(device)
                loaded.loss_fn.to(device)
            results = []
            for rho in rhos:
                start = time.perf_counter()
                statistics = spec.compute(loaded, rho, options)
                results.append((rho, statistics, time.perf_counter() - start))
        return {"results": results}
    except Exception as exc:  # reported as the row's error; the other tasks go on
        return {"error": _error_line(exc)}


# ---------------------------------------------------------------------------------------- the driver


@dataclass
class _Job:
    """One (trial, measure): the rows it gives and the rhos still to compute."""

    trial: dict[str, Any]
    measure: Measure
    rhos: list[float | None]
    done: dict[Any, tuple[dict[str, float], float]] = field(default_factory=dict)  # rho -> (statistics, seconds)
    missing: list[float | None] = field(default_factory=list)
    error: str | None = None


def _history_rows(history: pd.DataFrame | None, trial_id: str) -> list[dict[str, Any]]:
    """A trial's reports as the forgetting summary wants them: epoch and its own forget/* columns."""
    if history is None or history.empty:
        return []
    rows = history[history["trial_id"] == trial_id]
    keep = ["epoch", *(c for c in rows.columns if str(c).startswith(_FORGET_PREFIX) and rows[c].notna().any())]
    return rows[keep].to_dict("records")


def _plan(
    root: StoragePath, chosen: pd.DataFrame, measures: list[Measure], rho_eval: list[float], options: Options
) -> tuple[list[_Job], int]:
    """Every (trial, measure) job, with what the cache already holds; also the number of cache hits."""
    jobs, hits = [], 0
    for trial in chosen.to_dict("records"):
        for measure in measures:
            job = _Job(trial=trial, measure=measure, rhos=list(rho_eval) if measure.uses_rho else [None])
            jobs.append(job)
            checkpoint = trial.get("checkpoint")
            if not checkpoint:
                job.error = f"ValueError: trial {trial['trial_id']} has no checkpoint (status {trial['status']})"
                continue
            for rho in job.rhos:
                key = cache_key(checkpoint, measure.name, settings_of(measure, options, rho))
                entry = _read_cache(_cache_file(root, trial["trial_id"], key))
                if entry is None:
                    job.missing.append(rho)
                else:
                    hits += 1
                    job.done[rho] = (dict(entry["statistics"]), float(entry.get("seconds", math.nan)))
    return jobs, hits


def _trained_on_gpu(trial: Mapping[str, Any]) -> bool:
    """The trial's ``use_gpu``; a missing value (NaN from a frame of mixed sweeps) is not a GPU."""
    value = trial.get("use_gpu")
    return isinstance(value, bool | np.bool_) and bool(value)


def _submit(remote: Any, job: _Job, options: Options, history: pd.DataFrame | None) -> Any:
    use_gpu = _trained_on_gpu(job.trial) and job.measure.uses_model
    task = remote.options(num_cpus=1, num_gpus=1 if use_gpu else 0, name=f"measure:{job.measure.name}")
    rows = _history_rows(history, job.trial["trial_id"]) if not job.measure.uses_model else []
    return task.remote(job.trial["checkpoint"], job.measure.name, job.missing, options, rows, "cuda" if use_gpu else "cpu")


def _run(jobs: list[_Job], options: Options, history: pd.DataFrame | None, address: str | None, progress: bool) -> None:
    """Submit the jobs with something missing, fill them in as their tasks complete."""
    from tqdm.auto import tqdm

    from pf_sweep.trial import ensure_ray

    ensure_ray(address, verbose=False)  # first: it imports Ray so that a local one is on loopback
    import ray

    remote = ray.remote(measure_task)
    pending = {_submit(remote, job, options, history): job for job in jobs}
    with tqdm(total=len(pending), desc="measuring", unit="task", disable=not progress) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready[0])
            try:
                out = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # the worker died (out of memory, killed): no result at all
                out = {"error": (str(exc).strip().splitlines() or [type(exc).__name__])[-1]}
            if "error" in out:
                job.error = out["error"]
            else:
                for rho, statistics, seconds in out["results"]:
                    job.done[rho] = (statistics, seconds)
            bar.update()


def _store(root: StoragePath, job: _Job, options: Options, fresh: list[float | None]) -> None:
    for rho in fresh:
        statistics, seconds = job.done[rho]
        settings = settings_of(job.measure, options, rho)
        entry = {
            "trial_id": job.trial["trial_id"],
            "checkpoint": StoragePath.of(job.trial["checkpoint"]).name,
            "measure": job.measure.name,
            "settings": settings,
            "statistics": list(statistics.items()),  # pairs: the order is the measure's, JSON keys get sorted
            "seconds": seconds,
        }
        _write_cache(
            _cache_file(root, job.trial["trial_id"], cache_key(job.trial["checkpoint"], job.measure.name, settings)), entry
        )


def _rows(job: _Job) -> list[dict[str, Any]]:
    trial = job.trial
    base = {
        "sweep": trial["sweep"],
        "trial_id": trial["trial_id"],
        "checkpoint": trial.get("checkpoint"),
        "measure": job.measure.name,
    }
    if job.error is not None:
        statistic = None if not job.measure.uses_model else "value"
        return [
            {
                **base,
                "rho": math.nan if rho is None else rho,
                "statistic": statistic,
                "value": math.nan,
                "error": job.error,
                "seconds": math.nan,
            }
            for rho in job.rhos
        ]
    rows = []
    for rho in job.rhos:
        statistics, seconds = job.done[rho]
        for statistic, value in statistics.items():
            rho_cell = math.nan if rho is None else rho
            rows.append({**base, "rho": rho_cell, "statistic": statistic, "value": value, "error": None, "seconds": seconds})
    return rows


def measure_sweep(
    path: str | Path,
    *,
    measures: Sequence[str],
    rho_eval: Sequence[float] = (),
    data: str = "train[:1024]",
    address: str | None = None,
    m: int = 128,
    batch_size: int = 128,
    seed: int = 0,
    interpolation: str | None = None,
    progress: bool = True,
    statuses: Sequence[str] = ("TERMINATED",),
    trial_ids: Sequence[str] | None = None,
    return_stats: bool = False,
) -> pd.DataFrame | tuple[pd.DataFrame, dict[str, int]]:
    """Measure the latest checkpoint of every trial of a sweep (by default its TERMINATED trials).

    One Ray task per (trial, measure), all rho values of a rho measure in one task, each with one
    CPU and, for a trial trained with ``use_gpu``, one GPU (the model moves to CUDA in the task).
    Ray is the running one, else ``address`` is joined, else a local Ray is started (and left
    running for the next call). Arguments are checked, and the sweep read, before Ray starts.

    Returns one row per (trial, measure setting, statistic): ``sweep``, ``trial_id``, ``checkpoint``,
    ``measure``, ``rho`` (NaN for a measure without one), ``statistic`` (``value``; ``stderr`` of
    ``hessian_trace``; the aggregate's name for ``forgetting``), ``value``, ``error`` (None, or the
    failed task's exception line with value NaN) and ``seconds`` (compute time of the value).
    ``return_stats=True`` also returns ``{"submitted": tasks, "cached": cache entries read,
    "failed": (trial, measure) pairs that failed}``.
    """
    from analysis.results import load_history, load_sweep

    chosen_measures = _check_measures(measures)
    rhos = _check_rho_eval(rho_eval, chosen_measures)
    options = _check_options(data, m, batch_size, seed, interpolation)
    root = StoragePath.of(path)
    chosen = _select(load_sweep(path), trial_ids, statuses)
    history = load_history(path) if any(not mm.uses_model for mm in chosen_measures) else None
    jobs, hits = _plan(root, chosen, chosen_measures, rhos, options)
    todo = [job for job in jobs if job.error is None and job.missing]
    if todo:
        _run(todo, options, history, address, progress)
    for job in todo:
        if job.error is None:
            _store(root, job, options, job.missing)
    failed = [job for job in jobs if job.error is not None]
    for job in failed:
        logger.warning("measure %s of trial %s failed: %s", job.measure.name, job.trial["trial_id"], job.error)
    frame = pd.DataFrame([row for job in jobs for row in _rows(job)], columns=COLUMNS)
    frame = frame.astype({"rho": float, "value": float, "seconds": float})
    if return_stats:
        return frame, {"submitted": len(todo), "cached": hits, "failed": len(failed)}
    return frame


# ---------------------------------------------------------------------------------------- wide


def setting_name(measure: str, rho: float | None, statistic: str | None) -> str:
    """The column of one measure setting in ``wide``: ``hessian_top``, ``worst_case_linf@rho=0.002``,
    ``hessian_trace/stderr``; a forgetting aggregate keeps its own name (``forget/flip_rate/mean``)."""
    if measure == "forgetting" and statistic:
        return statistic
    name = measure if rho is None or (isinstance(rho, float) and math.isnan(rho)) else f"{measure}@rho={float(rho)!r}"
    return name if statistic in (None, "value") else f"{name}/{statistic}"


def wide(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (sweep, trial_id), one column per measure setting (see ``setting_name``), NaN where failed."""
    missing = [c for c in ("sweep", "trial_id", "measure", "rho", "statistic", "value") if c not in df.columns]
    if missing:
        raise ValueError(f"df: missing columns {', '.join(missing)}; pass what measure_sweep returns")
    trials = df[["sweep", "trial_id"]].drop_duplicates()
    known = df[df["statistic"].notna() | (df["measure"] != "forgetting")]
    names = [setting_name(r.measure, r.rho, r.statistic) for r in known.itertuples(index=False)]
    long = known.assign(column=names)
    table = long.pivot(index=["sweep", "trial_id"], columns="column", values="value")
    table = table.reindex(index=pd.MultiIndex.from_frame(trials), columns=list(dict.fromkeys(names)))
    table.columns.name = None
    return table.reset_index()
