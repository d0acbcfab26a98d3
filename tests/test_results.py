"""analysis.results: sweeps read back from their files, checked against Tune's own files read here.

Two real sweeps, each made once for the module: ``digits`` (the digits_cpu space, Optuna, finished)
and ``grid`` (a grid whose last point fails when the trial builds its data), read while it runs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from analysis.results import load_history, load_sweep, varying_fields
from pf_sweep.config import FIELD_NAMES, TrialConfig

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4  # of the grid sweep: enough epochs to catch a trial between its first and last report
GRID_SPLITS = ["train[:512]", "train[:640]", "train[:8]"]
FAILING_SPLIT = "train[:8]"
# A valid TrialConfig, but 8 examples are fewer than one batch of 64: the trial fails building its data.
GRID_SPACE = f"""
from dataclasses import replace

from search_spaces.digits_cpu import SPACE as DIGITS

SPACE = replace(DIGITS, name="digits_grid", suggest=None, points_to_evaluate=(), grid={{"train_split": {GRID_SPLITS!r}}})
"""
TINY = ["--set", "train_eval_size=64"]
TUNE_DATE = "%Y-%m-%d_%H-%M-%S"  # how Tune writes dates in error.txt and result.json


def _cli_command(storage: Path, args: list[str]) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(storage), *args], env


def _result_rows(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


def _none_for_missing(frame: pd.DataFrame) -> pd.DataFrame:
    """Missing as None in object columns: a column None in one sweep and numbers in another becomes NaN together."""
    return frame.astype(object).where(frame.notna(), None)


def _trial_dirs(sweep_dir: Path) -> dict[str, Path]:
    return {p.name.removeprefix("trial-"): p for p in sorted(sweep_dir.glob("trial-*"))}


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("results-store")


@pytest.fixture(scope="module")
def digits(storage) -> Path:
    """A finished three-trial digits_cpu sweep (Optuna: two paper defaults, one TPE proposal)."""
    args = ["--name", "digits", "--num-samples", "3", "--set", "epochs=2", "--set", "train_split=train[:256]", *TINY]
    cmd, env = _cli_command(storage, args)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=storage)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "digits"


@pytest.fixture(scope="module")
def grid(storage) -> SimpleNamespace:
    """The grid sweep, read while it runs (the first time a trial is seen RUNNING), then finished."""
    space = storage / "grid_space.py"
    space.write_text(GRID_SPACE)
    cmd, env = _cli_command(storage, ["--name", "grid", "--space", str(space), "--set", f"epochs={EPOCHS}", *TINY])
    log = (storage / "grid.log").open("w")
    driver = subprocess.Popen(cmd, env=env, cwd=storage, stdout=log, stderr=subprocess.STDOUT)
    sweep_dir, live, live_history = storage / "grid", None, None
    deadline = time.monotonic() + 300
    try:
        while live is None and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
            try:
                frame = load_sweep(sweep_dir)
            except ValueError:  # no sweep.json yet
                continue
            if ((frame["status"] == "RUNNING") & (frame["epochs_done"] >= 1)).any():
                live, live_history = frame, load_history(sweep_dir)
        driver.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
        log.close()
    assert driver.returncode == 0, (storage / "grid.log").read_text()[-3000:]
    assert live is not None, "never saw a trial RUNNING between its first and last report"
    return SimpleNamespace(path=sweep_dir, live=live, live_history=live_history)


# ------------------------------------------------------------------------------ without Ray


def test_import_pulls_in_neither_torch_nor_ray():
    code = "import sys, analysis.results; print(sorted({'torch', 'ray', 'timm'} & set(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_directory_without_sweep_json_is_refused_by_name(tmp_path):
    (tmp_path / "store" / "mine").mkdir(parents=True)
    (tmp_path / "store" / "mine" / "sweep.json").write_text('{"metric": "val/top1", "mode": "max"}')
    with pytest.raises(ValueError, match=r"No sweep at .*store: it has no sweep\.json \(it holds the sweeps mine"):
        load_sweep(tmp_path / "store")
    with pytest.raises(ValueError, match=r"No sweep at .*nowhere: the path does not exist"):
        load_history(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="path_or_paths is empty"):
        load_sweep([])


def test_a_sweep_with_no_trial_yet_gives_empty_frames_with_the_named_columns(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "sweep.json").write_text(json.dumps({"metric": "val/loss", "mode": "min", "base": {}}))
    frame = load_sweep(tmp_path / "s")
    assert frame.empty
    assert list(frame.columns[:7]) == ["sweep", "trial_id", "status", "error", "epochs_done", "best/val/loss", "checkpoint"]
    assert load_history(tmp_path / "s").empty


# ------------------------------------------------------------------------------ a finished sweep


@pytest.mark.ray
@pytest.mark.slow
def test_one_row_per_trial_with_config_last_report_and_best_from_tune_files(digits):
    meta = json.loads((digits / "sweep.json").read_text())
    trials = _trial_dirs(digits)
    frame = load_sweep(digits).set_index("trial_id")
    assert sorted(frame.index) == sorted(trials) and len(trials) == 3
    assert set(frame["sweep"]) == {"digits"} and set(frame["status"]) == {"TERMINATED"}
    assert frame["error"].map(lambda e: e is None).all()
    for trial_id, trial_dir in trials.items():
        row, rows = frame.loc[trial_id], _result_rows(trial_dir)
        expected = TrialConfig.from_dict({**meta["base"], **json.loads((trial_dir / "params.json").read_text())}).to_dict()
        for name in FIELD_NAMES:
            value = row[name]
            assert (list(value) if isinstance(value, tuple) else value) == expected[name] or (
                expected[name] is None and pd.isna(value)
            ), name
        # The last report under its metric names (the worker's own keys, as its checkpoint stored them);
        # lr and rho, also config fields, as reported/<name>.
        newest = max((digits / "runs" / f"train-{trial_id}").glob("checkpoint_*"))
        reported = json.loads((newest / "metrics.json").read_text())[-1]
        assert {"val/top1", "gen_gap", "forget/flip_rate", "lr"} <= set(reported)
        for key in set(reported) - {"epoch"}:
            column = f"reported/{key}" if key in FIELD_NAMES else key
            assert row[column] == rows[-1][key], column
        assert row["lr"] == expected["lr"] != row["reported/lr"]  # the searched lr, not the schedule's last value
        assert row["best/val/top1"] == max(r["val/top1"] for r in rows)
        assert row["epochs_done"] == 2
        assert row["checkpoint"] == str(newest) and (newest / "state.pt").exists()
    assert "timestamp" not in frame.columns and "checkpoint_path" not in frame.columns


@pytest.mark.ray
@pytest.mark.slow
def test_history_has_every_reported_epoch_and_the_searched_hyperparameters(digits):
    history = load_history(digits)
    assert list(history.columns[:3]) == ["sweep", "trial_id", "epoch"]
    for trial_id, trial_dir in _trial_dirs(digits).items():
        mine = history[history["trial_id"] == trial_id].sort_values("epoch")
        rows = _result_rows(trial_dir)
        assert list(mine["epoch"]) == [int(r["epoch"]) for r in rows] == [0, 1]
        assert list(mine["val/top1"]) == [r["val/top1"] for r in rows]
        assert list(mine["reported/lr"]) == [r["lr"] for r in rows]
        params = json.loads((trial_dir / "params.json").read_text())
        for name, value in params.items():  # every searched parameter, on every row of its trial
            assert (mine[name] == value).all(), name
    assert "model" not in history.columns  # the same for every trial: in load_sweep, not repeated here


@pytest.mark.ray
@pytest.mark.slow
def test_a_copied_sweep_points_inside_the_copy(digits, tmp_path):
    copy = tmp_path / "elsewhere" / "moved"
    shutil.copytree(digits, copy)
    original, moved = load_sweep(digits), load_sweep(copy)
    assert set(moved["sweep"]) == {"moved"}
    for path in moved["checkpoint"]:
        assert path.startswith(str(copy)) and (Path(path) / "metrics.json").exists()
    same = [c for c in original.columns if c not in ("sweep", "checkpoint")]
    pd.testing.assert_frame_equal(original[same], moved[same])
    pd.testing.assert_frame_equal(load_history(digits).drop(columns="sweep"), load_history(copy).drop(columns="sweep"))


@pytest.mark.ray
@pytest.mark.slow
def test_a_file_uri_reads_the_same_sweep(digits):
    local, uri = load_sweep(digits), load_sweep(f"file://{digits}")
    assert list(uri["checkpoint"]) == [f"file://{p}" for p in local["checkpoint"]]
    pd.testing.assert_frame_equal(local.drop(columns="checkpoint"), uri.drop(columns="checkpoint"))
    pd.testing.assert_frame_equal(load_history(digits), load_history(f"file://{digits}"))


@pytest.mark.ray
@pytest.mark.slow
def test_a_repeated_epoch_keeps_the_latest_report_and_checkpoints_fill_a_missing_result_file(digits, tmp_path):
    copy = tmp_path / "resumed"
    shutil.copytree(digits, copy)
    first, second = sorted(_trial_dirs(copy).values())[:2]
    rows = _result_rows(first)
    again = {**rows[-1], "val/top1": 123.0}  # what a resumed trial reporting its last epoch again looks like
    with (first / "result.json").open("a") as f:
        f.write(json.dumps(again) + "\n")
    (second / "result.json").write_text("")  # Tune's file lost: the checkpoint's metrics.json still has it all
    history = load_history(copy)
    mine = history[history["trial_id"] == first.name.removeprefix("trial-")]
    assert list(mine["epoch"]) == [0, 1] and mine["val/top1"].iloc[-1] == 123.0
    assert mine["val/top1"].iloc[0] == rows[0]["val/top1"]
    theirs = history[history["trial_id"] == second.name.removeprefix("trial-")]
    assert list(theirs["val/top1"]) == [r["val/top1"] for r in _result_rows(digits / second.name)]
    frame = load_sweep(copy).set_index("trial_id")
    assert frame.loc[first.name.removeprefix("trial-"), "best/val/top1"] == 123.0
    assert frame.loc[second.name.removeprefix("trial-"), "epochs_done"] == 2


@pytest.mark.ray
@pytest.mark.slow
def test_sweeps_with_the_same_directory_name_are_told_apart_by_location(digits, tmp_path):
    other = tmp_path / "b" / "digits"
    shutil.copytree(digits, other)
    frame = load_sweep([digits, other])
    assert set(frame["sweep"]) == {str(digits), str(other)} and len(frame) == 6


# ------------------------------------------------------------------------------ a running sweep, a failed trial


@pytest.mark.ray
@pytest.mark.slow
def test_a_running_sweep_shows_running_trials_and_their_partial_history(grid):
    live = grid.live[grid.live["status"] == "RUNNING"]
    assert (live["epochs_done"] >= 1).any() and (live["epochs_done"] < EPOCHS).all()
    reported = live[live["epochs_done"] >= 1]
    assert reported["checkpoint"].map(lambda p: p is not None and Path(p).is_relative_to(grid.path)).all()
    assert reported["val/top1"].notna().all() and reported["best/val/top1"].notna().all()
    assert set(grid.live["status"]) <= {"RUNNING", "PENDING", "TERMINATED", "ERROR"}
    # The partial history is the beginning of the final one: the same reports, not yet all of them.
    final = load_history(grid.path).set_index(["trial_id", "epoch"])
    seen = grid.live_history.set_index(["trial_id", "epoch"])
    for trial_id, epochs_done in zip(live["trial_id"], live["epochs_done"], strict=True):
        # Read just after the trial table: at least as far along, and complete by the end.
        assert epochs_done == 0 or len(seen.loc[trial_id]) >= epochs_done
        assert len(final.loc[trial_id]) == EPOCHS
    metrics = [c for c in seen.columns if "/" in c]
    pd.testing.assert_frame_equal(seen[metrics], final.loc[seen.index, metrics])


@pytest.mark.ray
@pytest.mark.slow
def test_a_failed_trial_is_error_with_its_exception_line_and_the_others_finish(grid):
    frame = load_sweep(grid.path).set_index("train_split")
    assert sorted(frame.index) == sorted(GRID_SPLITS)
    failed = frame.loc[FAILING_SPLIT]
    assert failed["status"] == "ERROR" and failed["epochs_done"] == 0 and failed["checkpoint"] is None
    assert failed["error"].startswith("ValueError: Split digits:train[:8] has 8 examples, fewer than one update")
    assert math.isnan(failed["best/val/top1"])
    done = frame.drop(index=FAILING_SPLIT)
    assert set(done["status"]) == {"TERMINATED"} and set(done["epochs_done"]) == {EPOCHS}
    assert done["error"].map(lambda e: e is None).all()


@pytest.mark.ray
@pytest.mark.slow
def test_statuses_follow_the_trial_files_when_tune_state_is_stale_or_gone(grid, tmp_path):
    truth = load_sweep(grid.path).set_index("trial_id")["status"]
    assert sorted(truth) == ["ERROR", "TERMINATED", "TERMINATED"]
    stale, gone = tmp_path / "stale", tmp_path / "gone"
    shutil.copytree(grid.path, stale)
    shutil.copytree(grid.path, gone)
    for state_file in stale.glob("experiment_state-*.json"):  # as if saved while every trial still ran
        state = json.loads(state_file.read_text())
        for item in state["trial_data"]:
            trial = json.loads(item[0])
            trial["status"] = "RUNNING"
            item[0] = json.dumps(trial)
        state_file.write_text(json.dumps(state))
    for state_file in gone.glob("experiment_state-*.json"):
        state_file.unlink()
    for copy in (stale, gone):
        pd.testing.assert_series_equal(load_sweep(copy).set_index("trial_id")["status"], truth)
    # An errored trial that reported after its last failure (a sweep resumed with its errored trials) runs again.
    failed = next(stale.glob("trial-*/error.txt")).parent
    last_failure = re.findall(r"^Failure # \d+ \(occurred at (\S+)\)", (failed / "error.txt").read_text(), re.M)[-1]
    later = (datetime.strptime(last_failure, TUNE_DATE) + timedelta(seconds=1)).strftime(TUNE_DATE)
    (failed / "result.json").write_text(json.dumps({"epoch": 0.0, "val/top1": 50.0, "date": later}) + "\n")
    row = load_sweep(stale).set_index("trial_id").loc[failed.name.removeprefix("trial-")]
    assert row["status"] == "RUNNING" and row["error"] is None and row["epochs_done"] == 1


@pytest.mark.ray
@pytest.mark.slow
def test_two_sweeps_load_together_each_as_alone(digits, grid):
    both = load_sweep([digits, grid.path])
    assert list(both["sweep"].value_counts().sort_index().items()) == [("digits", 3), ("grid", 3)]
    for path, name in ((digits, "digits"), (grid.path, "grid")):
        alone = load_sweep(path)
        part = both[both["sweep"] == name].reset_index(drop=True)[alone.columns]
        pd.testing.assert_frame_equal(_none_for_missing(part), _none_for_missing(alone), check_dtype=False)
    history = load_history([digits, grid.path])
    assert len(history) == len(load_history(digits)) + len(load_history(grid.path))
    assert "train_split" in history.columns  # varies across the two sweeps, and is the grid's parameter


def test_varying_fields_names_the_config_columns_that_differ_in_field_order():
    frame = pd.DataFrame(
        {
            "trial_id": ["a", "b", "c"],
            "seed": [0, 1, 0],
            "rho": [0.05, 0.05, 0.05],
            "eval_sets": [[["d", "v"]], [["d", "v"]], [["d", "w"]]],  # lists compare by value
            "lr": [0.1, float("nan"), 0.1],  # a missing value differs from a present one
            "val/top1": [1.0, 2.0, 3.0],  # a metric, not a config field
        }
    )
    expected = [name for name in FIELD_NAMES if name in {"seed", "eval_sets", "lr"}]
    assert varying_fields(frame) == expected
    assert varying_fields(frame.iloc[[0, 2]][["seed", "rho"]]) == []
