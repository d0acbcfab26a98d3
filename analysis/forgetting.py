"""Forgetting over training: per-trial aggregates of the ``forget/*`` metrics, and example forgetting.

Two views of what a run forgets:

- **Perturbed forgetting** (every SAM trial reports it each epoch): ``summarize(history)`` turns a
  trial's history into a few numbers per ``forget/*`` metric that can be correlated across runs.
- **Example forgetting** (Toneva et al. 2019, "An empirical study of example forgetting during deep
  neural network learning"): with ``TrialConfig(record_examples=True)`` a trial saves, for every
  training example and epoch, whether the clean (and the perturbed) forward pass got it right.
  ``load_record`` reads that back, ``example_events`` counts forgetting and learning events per
  example, and ``forgetting_counts`` summarises them.

A *presentation* of an example is an epoch in which it was in the training shard (the sampler drops a
different tail of fewer than one global batch every epoch, so an example may skip an epoch). Events
are transitions between consecutive presentations; correctness is the training forward pass (train
mode, augmented, before that step's update), as in Toneva et al.'s code.

This module needs only numpy and pandas (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

FORGET_PREFIX = "forget/"
EXAMPLES_FILE = "examples.npz"  # the name pf_sweep.checkpoint writes
NOT_PRESENTED = 255  # record code: not in that epoch's shard, or no perturbed pass (method='sgd')
LAST_FRACTION = 0.1

# ----------------------------------------------------------------------------------- perturbed forgetting


def summarize(history: pd.DataFrame | Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Per-trial aggregates of every ``forget/*`` metric in a history (one row per epoch report).

    For a metric ``forget/<name>`` the keys are:

    - ``forget/<name>/mean``: mean over all epochs (NaN entries skipped);
    - ``forget/<name>/last10``: mean over the last 10% of the epochs, rounded up, at least one epoch;
    - ``forget/<name>/final``: the value at the last epoch.

    Rows are ordered by ``epoch`` (row order when there is no such column); when an epoch appears
    more than once (a resumed run may report one again) the row given last wins. A history without
    ``forget/*`` columns (``method='sgd'``) gives an empty dict.
    """
    frame = _epoch_rows(history)
    metrics = [c for c in frame.columns if str(c).startswith(FORGET_PREFIX)]
    tail = max(1, math.ceil(LAST_FRACTION * len(frame)))
    out: dict[str, float] = {}
    for name in metrics:
        values = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
        out[f"{name}/mean"] = _nanmean(values)
        out[f"{name}/last10"] = _nanmean(values[-tail:])
        out[f"{name}/final"] = float(values[-1])
    return out


def summarize_trials(history: pd.DataFrame, by: Sequence[str] = ("sweep", "trial_id")) -> pd.DataFrame:
    """``summarize`` of every trial in a ``load_history`` frame: one row per trial, keyed by ``by``.

    The frame merges onto ``load_sweep``'s on the same keys, so forgetting aggregates can be
    correlated with final accuracy without measuring anything.
    """
    keys = list(by)
    rows = [
        {**dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True)), **summarize(h)}
        for key, h in history.groupby(keys, sort=True)
    ]
    return pd.DataFrame(rows, columns=None if rows else keys)


def _epoch_rows(history: pd.DataFrame | Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    frame = history.copy() if isinstance(history, pd.DataFrame) else pd.DataFrame(list(history))
    if frame.empty:
        raise ValueError("Invalid history: it has no rows (expected one row per epoch report)")
    if "epoch" not in frame.columns:
        return frame.reset_index(drop=True)
    frame = frame[frame["epoch"].notna()]
    frame = frame.drop_duplicates(subset="epoch", keep="last")
    return frame.sort_values("epoch", kind="stable").reset_index(drop=True)


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


# ----------------------------------------------------------------------------------- example forgetting


def load_record(path: str | Path) -> dict[str, np.ndarray]:
    """The example record of a trial: ``examples.npz`` in a checkpoint directory (or that file itself,
    or, given a run directory, its latest ``checkpoint_*`` that has one). Loaded without pickle.

    Keys: ``clean`` and ``perturbed`` (uint8, shape (epochs, examples): 1 correct, 0 wrong, 255 not
    presented / no perturbed pass), ``epochs``, ``indices`` (train-split index of each column),
    ``labels`` and ``has_perturbed``.
    """
    path = Path(path)
    file = path if path.is_file() else path / EXAMPLES_FILE
    if not file.exists() and path.is_dir():
        found = sorted(p for p in path.glob(f"checkpoint_*/{EXAMPLES_FILE}"))
        file = found[-1] if found else file
    if not file.exists():
        raise ValueError(f"Invalid path: {str(path)!r} (no {EXAMPLES_FILE} there; was the trial run with record_examples=True?)")
    with np.load(file, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


def example_events(record: Mapping[str, np.ndarray] | np.ndarray) -> pd.DataFrame:
    """Toneva et al. forgetting statistics, one row per example.

    ``record`` is what ``load_record`` returns, or a plain array shaped (presentations, examples):
    bool / 0-1 (every cell a presentation) or uint8 with 255 for "not presented". Columns:

    - ``example``: train-split index; ``label`` when the record has labels;
    - ``presentations``: how many times the example was seen;
    - ``forgetting_events``: correct at one presentation, wrong at the next;
    - ``learning_events``: wrong at one presentation, correct at the next;
    - ``first_learned``: the presentation (0-based, counting this example's only) at which it was
      first correct, NaN if never; ``first_learned_epoch`` the record row's epoch of that presentation;
    - ``never_learned``: presented, never correct; ``never_forgotten``: correct at some presentation
      and never forgotten afterwards (Toneva's "unforgettable");
    - ``forgetting_score``: ``forgetting_events``, with never-learned examples set to their number of
      presentations (more than a learned example can reach): the ranking Toneva et al. use;
    - ``perturbed_flips``: presentations correct on the clean pass and wrong on the perturbed one;
      ``perturbed_presentations``: presentations with a perturbed pass (0 for ``method='sgd'``).
    """
    clean, perturbed, epochs, indices, labels = _record_arrays(record)
    presented = clean != NOT_PRESENTED
    correct = presented & (clean == 1)
    forgot, learned = _transitions(presented, correct)
    hit = correct.any(axis=0)
    first_row = correct.argmax(axis=0)
    columns = np.arange(clean.shape[1])
    order = np.cumsum(presented, axis=0) - 1  # presentation number of each presented cell
    first = order[first_row, columns]
    n_presented = presented.sum(axis=0)
    forgetting = forgot.sum(axis=0)
    has_perturbed = presented & (perturbed != NOT_PRESENTED)
    never_learned = (n_presented > 0) & ~hit
    out = {"example": indices}
    if labels is not None:
        out["label"] = labels
    out |= {
        "presentations": n_presented,
        "forgetting_events": forgetting,
        "learning_events": learned.sum(axis=0),
        "first_learned": np.where(hit, first, np.nan).astype(float),
        "first_learned_epoch": np.where(hit, epochs[first_row], np.nan).astype(float),
        "never_learned": never_learned,
        "never_forgotten": hit & (forgetting == 0),
        "forgetting_score": np.where(never_learned, n_presented, forgetting),
        "perturbed_flips": (has_perturbed & correct & (perturbed == 0)).sum(axis=0),
        "perturbed_presentations": has_perturbed.sum(axis=0),
    }
    return pd.DataFrame(out)


def forgetting_counts(record: Mapping[str, np.ndarray] | np.ndarray | pd.DataFrame) -> dict[str, float]:
    """Summary of ``example_events`` (or of a record) over the examples presented at least once.

    ``fraction_unforgettable`` (never_forgotten), ``fraction_never_learned``, ``fraction_forgotten``
    (at least one forgetting event), ``mean_forgetting_events``, ``mean_learning_events`` and
    ``perturbed_flip_rate`` (perturbed flips per presentation with a perturbed pass; NaN without one),
    plus ``n_examples``.
    """
    events = record if isinstance(record, pd.DataFrame) else example_events(record)
    seen = events[events["presentations"] > 0]
    if seen.empty:
        raise ValueError("Invalid record: no example was presented (the record has no observation)")
    perturbed = int(seen["perturbed_presentations"].sum())
    return {
        "n_examples": float(len(seen)),
        "fraction_unforgettable": float(seen["never_forgotten"].mean()),
        "fraction_never_learned": float(seen["never_learned"].mean()),
        "fraction_forgotten": float((seen["forgetting_events"] > 0).mean()),
        "mean_forgetting_events": float(seen["forgetting_events"].mean()),
        "mean_learning_events": float(seen["learning_events"].mean()),
        "perturbed_flip_rate": float(seen["perturbed_flips"].sum() / perturbed) if perturbed else float("nan"),
    }


def _transitions(presented: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(forgetting, learning) cells: the transition from an example's previous presentation to this one."""
    rows, n = presented.shape
    last_seen = np.maximum.accumulate(np.where(presented, np.arange(rows)[:, None], -1), axis=0)
    previous = np.vstack([np.full((1, n), -1), last_seen[:-1]])
    has_previous = presented & (previous >= 0)
    was_correct = np.take_along_axis(correct, np.maximum(previous, 0), axis=0)
    return has_previous & was_correct & ~correct, has_previous & ~was_correct & correct


def _record_arrays(record: Mapping[str, np.ndarray] | np.ndarray):
    """(clean, perturbed, epochs, indices, labels) of a record dict or a plain 2-D array."""
    if isinstance(record, Mapping):
        if "clean" not in record:
            raise ValueError(f"Invalid record: keys {sorted(record)} (expected at least 'clean', as load_record returns)")
        clean = _codes(record["clean"], "clean")
        perturbed = _codes(record["perturbed"], "perturbed") if "perturbed" in record else np.full_like(clean, NOT_PRESENTED)
        if perturbed.shape != clean.shape:
            raise ValueError(f"Invalid record: perturbed shape {perturbed.shape} differs from clean {clean.shape}")
        epochs = np.asarray(record.get("epochs", np.arange(clean.shape[0])), dtype=np.int64)
        indices = np.asarray(record.get("indices", np.arange(clean.shape[1])), dtype=np.int64)
        labels = np.asarray(record["labels"], dtype=np.int64) if "labels" in record else None
        return clean, perturbed, epochs, indices, labels
    clean = _codes(record, "record")
    return clean, np.full_like(clean, NOT_PRESENTED), np.arange(clean.shape[0]), np.arange(clean.shape[1]), None


def _codes(array: Any, name: str) -> np.ndarray:
    """A 2-D uint8 array of 0 / 1 / NOT_PRESENTED codes (bool input: every cell presented)."""
    a = np.asarray(array)
    if a.ndim != 2 or 0 in a.shape:
        raise ValueError(f"Invalid {name}: shape {a.shape} (expected 2-D, non-empty: presentations x examples)")
    if a.dtype == bool:
        return a.astype(np.uint8)
    bad = ~np.isin(a, (0, 1, NOT_PRESENTED))
    if bad.any():
        raise ValueError(
            f"Invalid {name}: value {a[bad][0].item()!r} (allowed: 0 wrong, 1 correct, {NOT_PRESENTED} not presented)"
        )
    return a.astype(np.uint8)
