"""How sweep trials execute: inside reused Tune trial actors (``--executor auto``) or on Ray Train
worker groups (``--executor workers``). Both must give the same metrics as an in-process run, the
same directory layout, and survive faults; the worker-group bridge must never lose or repeat a report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pf_sweep import TrialConfig
from pf_sweep.executors import runs_in_actor, trial_actor_resources
from pf_sweep.run_dir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
GRID_SPACE = """
from search_spaces.base import SearchSpace

SPACE = SearchSpace(
    name="grid_test",
    description="SAM points on a digits slice",
    base={{"dataset": "digits", "train_split": "train[:384]", "epochs": {EPOCHS}, "batch_size": 64,
          "train_eval_size": 128, "lr": 0.05, "method": "sam"}},
    grid={grid},
    max_concurrent=1,
)
"""
COMPARED = ["train/loss", "val/loss", "val/top1", "forget/flip_rate", "gen_gap"]


FULL_GRID = {"rho": [0.02, 0.1], "perturbation": ["max", "obf"]}


def _sweep(tmp_path: Path, name: str, *args: str, grid: dict = FULL_GRID, env: dict | None = None, timeout: int = 400):
    space = tmp_path / "grid_space.py"
    space.write_text(GRID_SPACE.format(grid=grid, EPOCHS=EPOCHS))
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(tmp_path / "store"), "--name", name]
    cmd += ["--space", str(space), *args]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=tmp_path)


def _reported(sweep_dir: Path) -> dict[str, list[dict]]:
    """Every Tune trial's reports, in order (Tune's own result.json)."""
    out = {}
    for result in sweep_dir.glob("trial-*/result.json"):
        out[result.parent.name.removeprefix("trial-")] = [json.loads(line) for line in result.read_text().splitlines() if line]
    return out


def _params(rows: list[dict]) -> tuple:
    config = rows[-1]["config"]
    return (config["rho"], config["perturbation"])


def test_auto_runs_one_worker_trials_in_the_actor_and_reserves_the_whole_worker():
    assert runs_in_actor("auto", 1) and not runs_in_actor("auto", 2) and not runs_in_actor("workers", 1)
    with pytest.raises(ValueError, match="Invalid executor"):
        runs_in_actor("threads", 1)
    base = TrialConfig(cpus_per_worker=2.0).to_dict()
    assert trial_actor_resources(base, in_actor=True) == {"cpu": 2.0}
    assert trial_actor_resources({**base, "use_gpu": True, "gpus_per_worker": 0.5}, in_actor=True) == {"cpu": 2.0, "gpu": 0.5}
    assert trial_actor_resources(base, in_actor=False) == {"cpu": 0.01}


def test_run_directory_sees_only_complete_checkpoints_and_prunes_the_oldest(tmp_path):
    run_dir = RunDirectory(tmp_path / "train-x")

    def write(directory: Path) -> None:
        for name in ("state.pt", "config.json", "metrics.json"):
            (directory / name).write_text("{}")

    for epoch in range(3):
        run_dir.write(epoch, write)
    (tmp_path / "train-x" / "checkpoint_000009").mkdir()  # torn: no files

    def fail_half_way(directory: Path) -> None:  # a full disk after the first file
        (directory / "state.pt").write_text("x")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        run_dir.write(5, fail_half_way)
    assert run_dir.checkpoints() == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002"]
    assert run_dir.latest() == str(tmp_path / "train-x" / "checkpoint_000002")
    assert not [p for p in (tmp_path / "train-x").iterdir() if p.name.startswith(".")], "a temporary folder was left"
    run_dir.prune(keep=2)
    assert run_dir.checkpoints() == ["checkpoint_000001", "checkpoint_000002"]


FREEZE_PROBE = """
import gc, weakref
import pf_sweep.train  # torch and timm, as run_in_actor imports them first
from pf_sweep.executors import _collect_previous_trial

class Node:
    pass

def cycle():
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)

gc.disable()  # only the collections under test
full = gc.get_stats()[2]["collections"]
_collect_previous_trial()  # the actor's first trial: nothing of a previous one to collect
frozen = gc.get_freeze_count()
assert frozen > 100_000, frozen  # torch, timm and Ray's objects are out of the collector's view
assert gc.get_stats()[2]["collections"] == full, "the first trial must not walk the whole heap"
for _ in range(2):  # the trials after it
    garbage = cycle()
    _collect_previous_trial()
    assert garbage() is None, "a trial's cycles must be collected before the next one starts"
assert gc.get_stats()[2]["collections"] == full + 2
assert gc.get_freeze_count() == frozen, "only the first call freezes"
print("ok")
"""


def test_a_reused_actor_freezes_its_imports_once_and_collects_each_trials_cycles():
    # In a fresh interpreter: freezing pytest's own heap would hide this test's garbage from later tests.
    out = subprocess.run([sys.executable, "-c", FREEZE_PROBE], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.fixture(scope="module")
def in_process_metrics():
    """The grid's last-epoch metrics from plain in-process runs, keyed by (rho, perturbation)."""
    from pf_sweep.trial import run_trial

    base = {"dataset": "digits", "train_split": "train[:384]", "epochs": EPOCHS, "batch_size": 64}
    base |= {"train_eval_size": 128, "lr": 0.05, "method": "sam"}
    out = {}
    for rho in (0.02, 0.1):
        for perturbation in ("max", "obf"):
            result = run_trial(TrialConfig(**base, rho=rho, perturbation=perturbation), local=True, storage_path=None)
            out[(rho, perturbation)] = result.metrics
    return out


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.parametrize("executor", ["auto", "workers"])
def test_both_executors_equal_in_process_runs_with_the_same_layout(tmp_path, executor, in_process_metrics):
    # Worker-group trials start a Train run each (seconds apiece on 2 cores): half the grid for them.
    grid = FULL_GRID if executor == "auto" else {"rho": [0.1], "perturbation": ["max", "obf"]}
    proc = _sweep(tmp_path, "eq", "--executor", executor, grid=grid)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep_dir = tmp_path / "store" / "eq"
    reported = _reported(sweep_dir)
    n_trials = len(grid["rho"]) * len(grid["perturbation"])
    assert len(reported) == n_trials
    for trial_id, rows in reported.items():
        assert [r["epoch"] for r in rows] == list(range(EPOCHS)), f"trial {trial_id} reported {[r['epoch'] for r in rows]}"
        expected = in_process_metrics[_params(rows)]
        assert {k: rows[-1][k] for k in COMPARED} == {k: expected[k] for k in COMPARED}
        run = sweep_dir / "runs" / f"train-{trial_id}"
        final = run / f"checkpoint_{EPOCHS - 1:06d}"
        assert rows[-1]["checkpoint_path"] == str(final)
        assert sorted(p.name for p in final.iterdir()) >= ["config.json", "metrics.json", "state.pt"]
    if executor == "auto":
        # One reused actor process (max_concurrent=1) trained every trial, each from a clean start:
        # their metrics equal the separate in-process runs above.
        assert len({rows[0]["pid"] for rows in reported.values()}) == 1
    # The console carries pf-sweep's lines, not Ray's housekeeping.
    console = proc.stdout + proc.stderr
    assert f"{n_trials}/{n_trials} done" in console
    for noise in ("worker processes have been started", "Setting up process group", "Configuration for experiment"):
        assert noise not in console


@pytest.mark.ray
def test_a_last_report_delivered_after_fit_returned_is_reported_once(tmp_path):
    # The losing order of the race that hung Ray's TuneReportCallback: the bridge delivers the last
    # epoch's report an hour late, long after the Train run ended (in practice never). Each trial must
    # still end, quickly, with every epoch reported once: the last one from the stored history.
    env = {"PF_SWEEP_TEST_DELAY_LAST_REPORT_S": "3600"}
    grid = {"rho": [0.05], "perturbation": ["max"]}  # one trial: each has its own bridge
    proc = _sweep(tmp_path, "late", "--executor", "workers", grid=grid, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reported = _reported(tmp_path / "store" / "late")
    assert len(reported) == 1
    for rows in reported.values():
        assert [r["epoch"] for r in rows] == list(range(EPOCHS))
        assert rows[-1]["checkpoint_path"].endswith(f"checkpoint_{EPOCHS - 1:06d}")


def _trial_actor_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ray::ImplicitFunc" in line]


@pytest.mark.ray
@pytest.mark.slow
def test_a_killed_trial_actor_is_retried_from_its_checkpoint_with_equal_metrics(tmp_path, in_process_metrics):
    # SIGKILL the in-actor trial's process once it has checkpointed epoch 0; Tune's retry
    # (--max-failures 1) must resume at epoch 1 in a new actor and end with the uninterrupted metrics.
    space = tmp_path / "grid_space.py"
    space.write_text(GRID_SPACE.format(grid={"rho": [0.1], "perturbation": ["obf"]}, EPOCHS=3))
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(tmp_path / "store"), "--name", "kill"]
    cmd += ["--space", str(space), "--max-failures", "1"]
    driver = subprocess.Popen(
        cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    runs, killed, deadline = tmp_path / "store" / "kill" / "runs", False, time.monotonic() + 240
    try:
        while time.monotonic() < deadline and driver.poll() is None and not killed:
            if any(runs.glob("train-*/checkpoint_000000/metrics.json")):
                for pid in _trial_actor_pids():
                    os.kill(pid, signal.SIGKILL)
                    killed = True
            time.sleep(0.05)
        out, _ = driver.communicate(timeout=300)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert killed, "the trial finished before it could be killed"
    assert driver.returncode == 0, out[-3000:]
    (rows,) = _reported(tmp_path / "store" / "kill").values()
    epochs = [int(r["epoch"]) for r in rows]
    assert epochs[-1] == 2 and epochs == sorted(set(epochs)) and 0 in epochs, epochs
    assert len({r["pid"] for r in rows}) == 2, "the retry did not run in a new actor"
    from pf_sweep.trial import run_trial

    cfg = TrialConfig.from_dict({**json.loads((tmp_path / "store" / "kill" / "sweep.json").read_text())["base"], "rho": 0.1})
    expected = run_trial(cfg.replace(perturbation="obf"), local=True, storage_path=None).metrics
    assert {k: rows[-1][k] for k in COMPARED} == {k: expected[k] for k in COMPARED}
    summary = pd.read_csv(tmp_path / "store" / "kill" / "summary.csv")
    assert len(summary) == 1 and summary["epoch"].iloc[0] == 2


@pytest.mark.ray
@pytest.mark.slow
def test_asha_stops_in_actor_trials_early_and_the_sweep_goes_on(tmp_path):
    # ASHA ends a trial by stopping its thread inside the reused actor; the next trial must still
    # run, and every trial must end with at most `epochs` reports.
    space = tmp_path / "grid_space.py"
    space.write_text(GRID_SPACE.format(grid={**FULL_GRID, "rho": [0.02, 0.1, 0.5]}, EPOCHS=4))
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(tmp_path / "store"), "--name", "asha"]
    cmd += ["--space", str(space), "--scheduler", "asha", "--max-concurrent", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reported = _reported(tmp_path / "store" / "asha")
    lengths = sorted(len(rows) for rows in reported.values())
    assert len(reported) == 6 and lengths[-1] == 4 and lengths[0] < 4, lengths
    for rows in reported.values():
        assert [r["epoch"] for r in rows] == list(range(len(rows)))
