"""Load what a sweep stored into pandas: one row per trial (``load_sweep``) or per report (``load_history``).

Both read only files under ``<storage>/<sweep name>/``, never a running Ray, so they work on a sweep
that is still running, on one copied to another machine, and on ``s3://`` / ``gs://`` / ``file://``
URIs (through pyarrow filesystems). Paths stored inside Tune's files are ignored: everything is found
relative to the sweep directory given, so checkpoint paths point inside it.

Where each column comes from:

- config fields (``rho``, ``sharpness_m``, ``method``, ...): the latest checkpoint's ``config.json``;
  before a trial's first checkpoint, ``sweep.json``'s base merged with the trial's Tune parameters,
  with ``TrialConfig`` defaults for the rest.
- reports: the latest checkpoint's ``metrics.json`` (every report up to it) followed by Tune's
  ``result.json`` of the trial; one row per epoch, the later row winning (a resumed trial may
  report an epoch twice). A reported metric whose name is also a config field (``lr``, ``rho``:
  their values at that epoch, e.g. a cosine schedule's lr) is renamed ``reported/<name>``, so the
  config columns always hold the hyperparameters. Tune's bookkeeping (``timestamp``, ``pid``,
  ``checkpoint_path`` ...) is dropped.
- status: Tune's status in its newest ``experiment_state-*.json``. That file can lag a trial's own
  files (Tune copies it from a background thread, at a period a sweep may lengthen), so while a
  trial is PENDING / RUNNING there (or not listed yet) its own files decide: reported its last
  epoch -> TERMINATED; an ``error.txt`` recording more failures than the sweep's ``max_failures``
  retries, with no report since the last one -> ERROR; any report, error file or checkpoint run ->
  RUNNING. A TERMINATED or ERROR in Tune's state is final. A trial interrupted by a killed driver
  stays RUNNING until the sweep is resumed. No file times are used, so a copy (``cp -r``, an
  upload) reads the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from pf_sweep.config import FIELD_NAMES, TrialConfig
from pf_sweep.divergence import find_reason
from pf_sweep.evaluate import RESULT_PREFIX as EVALUATION_PREFIX
from pf_sweep.storage import StoragePath

SWEEP_FILE = "sweep.json"
RESULT_FILE = "result.json"
PARAMS_FILE = "params.json"
ERROR_FILE = "error.txt"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
STATE_FILE = "state.pt"
STATE_PREFIX = "experiment_state-"
CHECKPOINT_PREFIX = "checkpoint_"
FINAL = ("TERMINATED", "ERROR")
REPORTED_PREFIX = "reported/"
# What Tune adds to every result, besides the trial's own report.
TUNE_KEYS = frozenset(
    {
        "checkpoint_dir_name",
        "checkpoint_path",
        "config",
        "date",
        "done",
        "episodes_total",
        "experiment_id",
        "experiment_tag",
        "hostname",
        "iterations_since_restore",
        "node_ip",
        "pid",
        "should_checkpoint",
        "time_since_restore",
        "time_this_iter_s",
        "time_total_s",
        "timestamp",
        "timesteps_since_restore",
        "timesteps_total",
        "training_iteration",
        "trial_id",
        "warmup_time",
    }
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\]\s*$")


# ---------------------------------------------------------------------------------------- storage


class _Dir:
    """A directory of a local path or a URI: list it, read files in it (``StoragePath`` has no listing)."""

    def __init__(self, path: StoragePath) -> None:
        self.path = path

    def __truediv__(self, part: str) -> _Dir:
        return _Dir(self.path / part)

    def __str__(self) -> str:
        return str(self.path)

    def entries(self) -> dict[str, bool]:
        """name -> is a directory; empty when the directory does not exist."""
        if self.path.is_local:
            root = Path(str(self.path))
            if not root.is_dir():
                return {}
            return {p.name: p.is_dir() for p in root.iterdir()}
        import pyarrow.fs

        fs, base = pyarrow.fs.FileSystem.from_uri(str(self.path))
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {info.base_name: info.type == pyarrow.fs.FileType.Directory for info in infos}

    def read(self, name: str) -> str | None:
        """The text of file ``name``, or None when it is missing (or vanished while being read)."""
        target = self.path / name
        try:
            return target.read_text()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError:  # pyarrow's remote filesystems raise a plain OSError for a missing object
            if target.exists():
                raise
            return None


def _json(text: str | None) -> Any:
    """Parsed JSON, or None for a missing or half-written file."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


# ---------------------------------------------------------------------------------------- one sweep


@dataclass
class _Trial:
    trial_id: str
    status: str
    config: dict[str, Any]
    params: dict[str, Any]
    history: list[dict[str, Any]]
    checkpoint: str | None
    error: str | None
    evaluations: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Sweep:
    name: str
    meta: dict[str, Any]
    trials: list[_Trial] = field(default_factory=list)

    @property
    def metric(self) -> str:
        return self.meta.get("metric", "val/top1")

    @property
    def mode(self) -> str:
        return self.meta.get("mode", "max")


def _open_sweep(path: str | Path) -> tuple[_Dir, dict[str, Any]]:
    """The sweep directory and its ``sweep.json``; ValueError naming what is missing otherwise."""
    root = _Dir(StoragePath.of(path))
    meta = _json(root.read(SWEEP_FILE))
    if isinstance(meta, dict):
        return root, meta
    entries = root.entries()
    if not entries and not root.path.exists():
        raise ValueError(f"No sweep at {root}: the path does not exist")
    if SWEEP_FILE in entries:
        raise ValueError(f"No sweep at {root}: its {SWEEP_FILE} is not a JSON object")
    inside = sorted(name for name, is_dir in entries.items() if is_dir and (root / name).read(SWEEP_FILE) is not None)
    hint = f" (it holds the sweeps {', '.join(inside)}: pass {root.path / inside[0]})" if inside else ""
    raise ValueError(f"No sweep at {root}: it has no {SWEEP_FILE}{hint}")


def _tune_state(root: _Dir, entries: dict[str, bool]) -> dict[str, dict[str, Any]]:
    """trial id -> {status, config, logdir, error_file} from Tune's newest experiment state (if readable)."""
    states = sorted(n for n, is_dir in entries.items() if not is_dir and n.startswith(STATE_PREFIX) and n.endswith(".json"))
    state = _json(root.read(states[-1])) if states else None
    out: dict[str, dict[str, Any]] = {}
    for item in (state or {}).get("trial_data", []) if isinstance(state, dict) else []:
        try:
            trial = json.loads(item[0]) if isinstance(item[0], str) else item[0]
            runtime = json.loads(item[1]) if isinstance(item[1], str) else item[1]
            out[trial["trial_id"]] = {
                "status": trial.get("status", "PENDING"),
                "config": trial.get("config") or {},
                "logdir": trial.get("relative_logdir") or f"trial-{trial['trial_id']}",
                "error_file": (runtime or {}).get("error_filename"),
            }
        except (TypeError, KeyError, IndexError, json.JSONDecodeError):
            continue  # an entry in a format this reader does not know: its files still speak
    return out


def _trial_ids(entries: dict[str, bool], runs: dict[str, bool], state: dict[str, dict[str, Any]]) -> list[str]:
    ids = set(state)
    ids.update(n.removeprefix("trial-") for n, is_dir in entries.items() if is_dir and n.startswith("trial-"))
    ids.update(n.removeprefix("train-") for n, is_dir in runs.items() if is_dir and n.startswith("train-"))
    return sorted(ids)


def _latest_checkpoint(run: _Dir) -> tuple[str | None, dict[str, Any] | None, list[dict[str, Any]], dict[str, Any]]:
    """(path, config, history, evaluations) of the newest complete checkpoint of a Train run (one
    being copied is skipped); evaluations: the ``eval/...`` metrics of its ``evaluation-<suite>.json``
    files (``python -m pf_sweep.evaluate``)."""
    names = sorted((n for n, is_dir in run.entries().items() if is_dir and n.startswith(CHECKPOINT_PREFIX)), reverse=True)
    for name in names:
        checkpoint = run / name
        files = checkpoint.entries()
        if STATE_FILE not in files:
            continue
        config, history = _json(checkpoint.read(CONFIG_FILE)), _json(checkpoint.read(METRICS_FILE))
        if isinstance(config, dict) and isinstance(history, list):
            evaluations: dict[str, Any] = {}
            for file in sorted(f for f in files if f.startswith(EVALUATION_PREFIX) and f.endswith(".json")):
                found = _json(checkpoint.read(file))
                if isinstance(found, dict):
                    evaluations.update({k: v for k, v in found.items() if k.startswith("eval/")})
            return str(checkpoint), config, history, evaluations
    return None, None, [], {}


def _result_rows(text: str | None) -> list[dict[str, Any]]:
    """Tune's ``result.json``: one JSON object a line; a line still being written is skipped."""
    rows = []
    for line in (text or "").splitlines():
        row = _json(line) if line.strip() else None
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _merge_history(*sources: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One report per epoch, sorted; a later source (or later row) wins for a repeated epoch."""
    by_epoch: dict[int, dict[str, Any]] = {}
    for source in sources:
        for row in source:
            if "epoch" not in row:
                continue
            clean = {k: v for k, v in row.items() if k not in TUNE_KEYS}
            by_epoch[int(clean["epoch"])] = clean
    return [by_epoch[e] for e in sorted(by_epoch)]


def _full_config(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """Every TrialConfig field of base + params (defaults filled); unknown keys kept as they are."""
    merged = {**base, **params}
    known = {k: v for k, v in merged.items() if k in FIELD_NAMES}
    try:
        full = TrialConfig.from_dict(known).to_dict()
    except (ValueError, TypeError):  # a config this version rejects: still show what was asked
        full = {f.name: f.default for f in dataclasses.fields(TrialConfig) if f.default is not dataclasses.MISSING}
        full.update(known)
    return {**full, **{k: v for k, v in merged.items() if k not in FIELD_NAMES}}


def _error_message(text: str | None) -> str | None:
    """The last meaningful line of Tune's error file: the exception line, without colours or carets.

    A diverged trial's is its reason alone (``diverged: train/loss is nan at epoch E step S``).
    """
    if not text:
        return None
    if diverged := find_reason(text):
        return diverged
    for line in reversed(text.splitlines()):
        line = _REPEATED.sub("", _ANSI.sub("", line)).strip()
        if line and set(line) - set("^~ "):
            return line
    return None


def _failed_for_good(error_text: str | None, results: list[dict[str, Any]], retries: int) -> bool:
    """Tune recorded more failures than the sweep retries, and the trial has not reported since.

    Tune appends one ``Failure # n (occurred at <date>)`` block per failure; a result's ``date`` has
    the same format, so a report after the last failure (an errored trial resumed) compares later.
    """
    failures = [line for line in (error_text or "").splitlines() if line.startswith("Failure #")]
    if len(failures) <= retries:
        return False
    when = re.search(r"occurred at (\S+?)\)", failures[-1])
    reported = [row["date"] for row in results if isinstance(row.get("date"), str)]
    return when is None or not reported or max(reported) <= when.group(1)


def _status(tune_status: str, history: list[dict[str, Any]], epochs: Any, failed: bool, started: bool) -> str:
    """The module docstring's rule: Tune's final status, else the freshest evidence in the trial's files."""
    if tune_status in FINAL:
        return tune_status
    if history and isinstance(epochs, int) and int(history[-1]["epoch"]) >= epochs - 1:
        return "TERMINATED"
    if failed:
        return "ERROR"
    return "RUNNING" if started else tune_status


def _read_trial(root: _Dir, trial_id: str, tune: dict[str, Any], meta: dict[str, Any], in_runs: bool) -> _Trial:
    trial_dir = root / Path(tune.get("logdir") or f"trial-{trial_id}").name
    params = _json(trial_dir.read(PARAMS_FILE))
    params = params if isinstance(params, dict) else tune.get("config", {})
    checkpoint, ckpt_config, ckpt_history, evaluations = (
        _latest_checkpoint(root / "runs" / f"train-{trial_id}") if in_runs else (None, None, [], {})
    )
    config = {**_full_config(meta.get("base", {}), params), **(ckpt_config or {})}
    results = _result_rows(trial_dir.read(RESULT_FILE))
    history = _merge_history(ckpt_history, results)
    # Tune stores the error file's name (relative to the trial directory, or absolute on the machine that ran it).
    error_text = trial_dir.read(Path(tune.get("error_file") or ERROR_FILE).name)
    retries = int((meta.get("settings") or {}).get("max_failures", 1))
    failed = _failed_for_good(error_text, results, retries)
    started = bool(history) or error_text is not None or in_runs
    status = _status(tune.get("status", "PENDING"), history, config.get("epochs"), failed, started)
    return _Trial(
        trial_id=trial_id,
        status=status,
        config=config,
        params=params,
        history=history,
        checkpoint=checkpoint,
        error=_error_message(error_text) if status == "ERROR" else None,
        evaluations=evaluations,
    )


def _read_sweep(path: str | Path, name: str | None = None) -> _Sweep:
    root, meta = _open_sweep(path)
    entries = root.entries()
    runs = (root / "runs").entries()
    state = _tune_state(root, entries)
    sweep = _Sweep(name=name or root.path.name, meta=meta)
    for trial_id in _trial_ids(entries, runs, state):
        sweep.trials.append(_read_trial(root, trial_id, state.get(trial_id, {}), meta, f"train-{trial_id}" in runs))
    return sweep


def _read_sweeps(path_or_paths: str | Path | Sequence[str | Path]) -> list[_Sweep]:
    """Every sweep asked for; sweeps sharing a directory name are told apart by their full location."""
    paths = [path_or_paths] if isinstance(path_or_paths, str | Path) else list(path_or_paths)
    if not paths:
        raise ValueError("path_or_paths is empty: pass a sweep directory (or URI), or a list of them")
    names = [StoragePath.of(p).name for p in paths]
    return [_read_sweep(p, str(StoragePath.of(p)) if names.count(n) > 1 else n) for p, n in zip(paths, names, strict=True)]


# ---------------------------------------------------------------------------------------- frames


def _cell(value: Any) -> Any:
    """JSON lists as tuples, so config columns can be grouped and compared."""
    return tuple(_cell(v) for v in value) if isinstance(value, list) else value


def _metrics(row: dict[str, Any]) -> dict[str, Any]:
    """A report's metrics; names that are config fields get ``reported/`` (see the module docstring)."""
    return {(REPORTED_PREFIX + k if k in FIELD_NAMES else k): v for k, v in row.items() if k != "epoch"}


def _best(history: list[dict[str, Any]], metric: str, mode: str) -> float | None:
    values = [float(row[metric]) for row in history if isinstance(row.get(metric), int | float)]
    if not values:
        return None
    return max(values) if mode == "max" else min(values)


def _config_columns(config: dict[str, Any]) -> dict[str, Any]:
    ordered = [name for name in FIELD_NAMES if name in config] + sorted(k for k in config if k not in FIELD_NAMES)
    return {name: _cell(config[name]) for name in ordered}


def load_sweep(path_or_paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """One row per trial of one sweep or several (a list; the ``sweep`` column tells them apart).

    Columns: ``sweep``, ``trial_id``, ``status`` (TERMINATED / ERROR / RUNNING / PENDING, rule in the
    module docstring), ``error`` (last line of a failed trial's error, else None), ``epochs_done``,
    ``best/<metric>`` (the best value of the sweep's metric over the trial's reports, by its mode),
    ``checkpoint`` (latest checkpoint inside the given directory, or None), every TrialConfig field,
    then the last report's metrics (``val/top1``, ``gen_gap``, ``forget/flip_rate``, ...).
    """
    rows, sweeps = [], _read_sweeps(path_or_paths)
    best_cols = list(dict.fromkeys(f"best/{sweep.metric}" for sweep in sweeps))
    fixed = ["sweep", "trial_id", "status", "error", "epochs_done", *best_cols, "checkpoint"]
    for sweep in sweeps:
        best_col = f"best/{sweep.metric}"
        for trial in sweep.trials:
            last = trial.history[-1] if trial.history else {}
            rows.append(
                {
                    "sweep": sweep.name,
                    "trial_id": trial.trial_id,
                    "status": trial.status,
                    "error": trial.error,
                    "epochs_done": int(last["epoch"]) + 1 if last else 0,
                    best_col: _best(trial.history, sweep.metric, sweep.mode),
                    "checkpoint": trial.checkpoint,
                    **_config_columns(trial.config),
                    **_metrics(last),
                    **trial.evaluations,  # stand-alone evaluations of the final checkpoint win over the trial's own
                }
            )
    frame = pd.DataFrame(rows)
    columns = [*fixed, *(c for c in (*FIELD_NAMES, *frame.columns) if c not in fixed and c in frame.columns)]
    frame = frame.reindex(columns=list(dict.fromkeys(columns))).astype({"epochs_done": "int64"})
    for name in ("error", "checkpoint"):  # None, not NaN, where there is none (pandas would infer a str column)
        frame[name] = pd.Series([row[name] for row in rows], index=frame.index, dtype=object)
    return frame


def load_history(path_or_paths: str | Path | Sequence[str | Path]) -> pd.DataFrame:
    """One row per (trial, reported epoch): ``sweep``, ``trial_id``, ``epoch``, the trial's
    hyperparameters, then every reported metric.

    Hyperparameters are the config fields a sweep searched (the keys of its trials' Tune parameters)
    plus every field whose value differs between the loaded trials; ``load_sweep`` has all of them
    (merge on ``sweep`` and ``trial_id``).
    """
    sweeps = _read_sweeps(path_or_paths)
    trials = [(sweep, trial) for sweep in sweeps for trial in sweep.trials]
    shown = _varying_fields([trial for _, trial in trials])
    rows = []
    for sweep, trial in trials:
        hyper = {name: _cell(trial.config.get(name)) for name in shown}
        for report in trial.history:
            rows.append(
                {"sweep": sweep.name, "trial_id": trial.trial_id, "epoch": int(report["epoch"]), **hyper, **_metrics(report)}
            )
    frame = pd.DataFrame(rows, columns=None if rows else ["sweep", "trial_id", "epoch", *shown])
    return frame.astype({"epoch": "int64"})


def _varying_fields(trials: Sequence[_Trial]) -> list[str]:
    """Searched parameters and config fields that take more than one value, in TrialConfig order."""
    searched = {k for trial in trials for k in trial.params}
    keys = {k for trial in trials for k in trial.config}
    varying = {k for k in keys if _takes_several_values(trial.config.get(k) for trial in trials)}
    return _in_field_order(searched | varying)


def varying_fields(trials: pd.DataFrame) -> list[str]:
    """The config fields (columns of a ``load_sweep`` frame) whose value differs between its rows,
    in ``TrialConfig`` order: the hyperparameters of these trials, seed included."""
    names = set(FIELD_NAMES) & set(trials.columns)
    return _in_field_order({name for name in names if _takes_several_values(trials[name])})


def _takes_several_values(values: Iterable[Any]) -> bool:
    # JSON text compares lists, dicts and NaN-free scalars alike; None (a missing field) is a value.
    return len({json.dumps(_plain(v), sort_keys=True) for v in values}) > 1


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item") and not isinstance(value, list | tuple | dict):
        return value.item()  # numpy scalars from a DataFrame column
    return value


def _in_field_order(names: set[str]) -> list[str]:
    return [name for name in FIELD_NAMES if name in names] + sorted(names - set(FIELD_NAMES))
