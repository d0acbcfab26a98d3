"""Shared test settings: single-threaded, deterministic torch (results do not depend on the machine)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)


def fake_ray_path(root):
    """A PYTHONPATH entry (under ``root``, a Path) whose ``ray`` fails on import: proof no Ray started."""
    fake = root / "fake-ray" / "ray"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("raise ImportError('ray must not be imported on bad input')\n")
    return str(fake.parent)


def finished_and_running(runs: Path, last_epoch: int) -> tuple[list[Path], list[Path]]:
    """Run directories of a sweep whose last epoch is stored, and those with only earlier epochs."""
    finished, running = [], []
    for run in runs.glob("train-*"):
        epochs = [int(c.name.split("_")[1]) for c in run.glob("checkpoint_*") if (c / "metrics.json").exists()]
        if epochs:
            (finished if max(epochs) == last_epoch else running).append(run)
    return finished, running


def tear_experiment_state(sweep_dir: Path) -> Path | None:
    """Cut the sweep's newest Tune experiment state in half, as a driver killed mid-copy leaves it.

    Only when Tune's staged copies of that session are whole: a kill can also land while Tune writes
    its staging folder (a few percent of the time), and no mend is possible then; the resume goes
    on from what the kill left. None when it left the state as it was."""
    from pf_sweep.tune_state import TUNE_STATE_FILES, is_complete, ray_temp_root, staging_dirs, stamp_of

    state = max(sweep_dir.glob("experiment_state-*.json"))
    stamp = stamp_of(state.name, TUNE_STATE_FILES[0])
    staged = staging_dirs(sweep_dir.name, state.name, ray_temp_root())
    if not staged or not all(
        is_complete((staged[0] / t.format(stamp)).read_bytes())
        for t in TUNE_STATE_FILES
        if (staged[0] / t.format(stamp)).exists()
    ):
        return None
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    return state


def sigkill_sweep_mid_trial(cmd: list[str], *, env: dict, runs: Path, last_epoch: int, cwd=None, timeout: float = 300):
    """Run a ``run_sweep.py`` command in its own process group and SIGKILL the whole group (driver and
    its local Ray) once one trial has finished and another has stored an epoch: (finished, running)."""
    driver = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    finished, running, deadline = [], [], time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            finished, running = finished_and_running(runs, last_epoch)
            if finished and running:
                break
            time.sleep(0.05)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert finished and running, "never saw one finished and one running trial before the deadline"
    return finished, running
