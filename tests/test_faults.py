"""Faults a long sweep meets, each injected for real: a checkpoint write that dies half-way, a Train
worker SIGKILLed, a node of a multi-node cluster lost, the sweep's storage gone mid-sweep.

Covered elsewhere (not repeated here): a worker raising mid-trial (tests/test_trial_ray.py), a
SIGKILLed in-actor trial (tests/test_executors.py), a SIGKILLed driver (tests/test_sweep.py), a
torn folder and a failing ``write_fn`` in ``RunDirectory`` (tests/test_executors.py).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from pf_sweep import TrialConfig, run_trial
from pf_sweep.checkpoint import load_checkpoint
from pf_sweep.run_dir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
NOT_TIMING = lambda df: df[[c for c in df.columns if not c.startswith("time/")]]  # noqa: E731
TINY = {"dataset": "digits", "train_split": "train[:256]", "train_eval_size": 64, "batch_size": 32, "lr": 0.05}


# ------------------------------------------------------------------------------------ torn checkpoints
def test_a_checkpoint_write_that_fills_the_disk_half_way_fails_the_trial_and_keeps_the_previous_one(tmp_path, monkeypatch):
    # torch.save of epoch 1 writes half its bytes, then the disk is full (ENOSPC), as a real full
    # disk fails a write. The trial must fail with that error; epoch 0's checkpoint must still load,
    # and a rerun once there is space again resumes from it and ends like an uninterrupted run.
    import torch

    real_save, calls = torch.save, []

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) < 2:
            return real_save(obj, path, *args, **kwargs)
        import io

        buffer = io.BytesIO()
        real_save(obj, buffer)
        Path(path).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    cfg = TrialConfig(**TINY, epochs=3, seed=4)
    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    with pytest.raises(OSError) as failure:
        run_trial(cfg, local=True, storage_path=str(tmp_path), name="t")
    assert failure.value.errno == errno.ENOSPC
    monkeypatch.setattr(torch, "save", real_save)

    run_dir = tmp_path / "t"
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_000000"], "a torn or temporary folder was left"
    assert load_checkpoint(RunDirectory(run_dir).latest())["epoch"] == 0

    resumed = run_trial(cfg, local=True, storage_path=str(tmp_path), name="t")
    clean = run_trial(cfg, local=True, storage_path=None)
    assert list(resumed.history["epoch"]) == [1.0, 2.0]
    pd.testing.assert_frame_equal(
        NOT_TIMING(resumed.history).reset_index(drop=True), NOT_TIMING(clean.history.iloc[1:]).reset_index(drop=True)
    )


CRASH_BETWEEN_FILES = """
import os, signal, sys
from pathlib import Path
from pf_sweep.run_dir import RunDirectory

def write(directory: Path, crash: bool) -> None:
    (directory / "state.pt").write_bytes(b"weights")
    if crash:
        os.kill(os.getpid(), signal.SIGKILL)  # dead between two files: no except, no finally
    (directory / "config.json").write_text("{}")
    (directory / "metrics.json").write_text("[]")

run_dir = RunDirectory(sys.argv[1])
run_dir.write(0, lambda d: write(d, crash=False))
run_dir.write(1, lambda d: write(d, crash=True))
"""


def test_a_writer_killed_between_checkpoint_files_leaves_nothing_latest_picks(tmp_path):
    # A real SIGKILL between state.pt and config.json, so no cleanup code runs: the half-written
    # checkpoint stays hidden under its temporary name, and the next write removes it.
    script = tmp_path / "crash.py"
    script.write_text(CRASH_BETWEEN_FILES)
    run = tmp_path / "train-x"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(script), str(run)], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = [p.name for p in run.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and (run / leftovers[0] / "state.pt").exists(), "the crash did not happen between files"
    run_dir = RunDirectory(run)
    assert run_dir.checkpoints() == ["checkpoint_000000"]
    assert run_dir.latest() == str(run / "checkpoint_000000")
    run_dir.write(1, lambda d: [(d / n).write_text("{}") for n in ("state.pt", "config.json", "metrics.json")])
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint_000000", "checkpoint_000001"]


def test_an_upload_that_dies_before_state_pt_is_whole_leaves_no_checkpoint(tmp_path, monkeypatch):
    # On a URI the files are copied one by one. state.pt completes a checkpoint, so it goes last,
    # under a temporary name: a copy that fails in it leaves a folder ``checkpoints`` ignores.
    import pyarrow.fs

    real_copy = pyarrow.fs.copy_files

    def copy_then_fail_on_state(source, destination, **kwargs):
        real_copy(source, destination, **kwargs)
        if Path(source).name == "state.pt":
            raise OSError(errno.ENOSPC, "No space left on device")

    run_dir = RunDirectory(f"file://{tmp_path}/train-x")
    files = lambda d: [(d / n).write_text("{}") for n in ("state.pt", "config.json", "metrics.json")]  # noqa: E731
    run_dir.write(0, files)
    monkeypatch.setattr(pyarrow.fs, "copy_files", copy_then_fail_on_state)
    with pytest.raises(OSError, match="No space"):
        run_dir.write(1, files)
    assert sorted(p.name for p in (tmp_path / "train-x" / "checkpoint_000001").iterdir()) == [
        "config.json",
        "metrics.json",
        "state.pt.partial",
    ]
    assert run_dir.checkpoints() == ["checkpoint_000000"]


# ------------------------------------------------------------------------------------ worker killed
TWO_WORKERS = {**TINY, "train_split": "train[:512]", "num_workers": 2, "epochs": 4, "seed": 9, "max_failures": 1}


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    from pf_sweep.trial import ensure_ray

    if ray.is_initialized():  # another module's Ray, perhaps without a dashboard
        ray.shutdown()
    ensure_ray(num_cpus=4, verbose=False)  # dashboard on: the State API below lists the Train workers
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def two_worker_reference(local_ray, tmp_path_factory):
    """An uninterrupted 2-worker trial: what a faulted run with the same seed must end with."""
    return run_trial(TrialConfig(**TWO_WORKERS), storage_path=str(tmp_path_factory.mktemp("ref")), name="ref")


def _alive_train_workers() -> list:
    """The Train worker actors alive in this test's Ray (other Ray instances may run on the machine)."""
    import ray
    from ray.util.state import list_actors
    from ray.util.state.exception import ServerUnavailable

    filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    try:
        return list_actors(address=ray.get_runtime_context().gcs_address, filters=filters, raise_on_missing_output=False)
    except (ConnectionError, ServerUnavailable):  # the State API's dashboard not up yet (a loaded machine): ask again
        return []


def _registered(run: Path, checkpoint: str) -> bool:
    """Whether Ray Train has recorded ``checkpoint`` as the run's latest (its snapshot on storage).

    Its files are on storage a moment before: a worker group restarted in between starts over.
    """
    snapshot = run / "checkpoint_manager_snapshot.json"
    return snapshot.exists() and f'"{checkpoint}"' in snapshot.read_text()


def _stored_first_epoch(run: Path) -> dict:
    """Epoch 0's row as its checkpoint stored it. A resumed run carries this row, timings included;
    a run that started over would have measured new timings."""
    return json.loads((run / "checkpoint_000000" / "metrics.json").read_text())[0]


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def target() -> None:
        try:
            out["result"] = fn()
        except BaseException as err:  # re-raised by the test
            out["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, out


@pytest.mark.ray
@pytest.mark.slow
def test_a_sigkilled_train_worker_resumes_from_the_last_checkpoint_with_equal_metrics(local_ray, two_worker_reference, tmp_path):
    # SIGKILL rank 1's process (found through Ray's State API, by PID) once epoch 0's checkpoint is
    # stored and recorded. max_failures=1: Train restarts the whole worker group from that checkpoint, and the
    # trial ends exactly where the uninterrupted run ended.
    import psutil

    run = tmp_path / "killed"
    thread, out = _in_thread(lambda: run_trial(TrialConfig(**TWO_WORKERS), storage_path=str(tmp_path), name="killed"))
    workers, deadline = [], time.monotonic() + 120
    while len(workers) < 2 and thread.is_alive() and time.monotonic() < deadline:
        workers = _alive_train_workers()
        time.sleep(0.2)
    assert len(workers) == 2, f"never saw the two Train workers: {workers}"
    while not _registered(run, "checkpoint_000000") and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = psutil.Process(max(w.pid for w in workers))
    unfinished = not (run / f"checkpoint_{TWO_WORKERS['epochs'] - 1:06d}").exists()
    first_epoch = _stored_first_epoch(run)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    thread.join(timeout=240)
    assert unfinished, "the trial finished before its worker could be killed"
    assert not thread.is_alive(), "the trial never ended after its worker was killed"
    if "error" in out:
        raise out["error"]
    result = out["result"]
    assert victim.pid not in {w.pid for w in _alive_train_workers()}
    assert result.history.iloc[0][list(first_epoch)].to_dict() == first_epoch, (
        "epoch 0 was trained again: the restart did not resume"
    )
    pd.testing.assert_frame_equal(NOT_TIMING(result.history), NOT_TIMING(two_worker_reference.history), check_dtype=False)


@pytest.mark.ray
@pytest.mark.slow
def test_a_two_worker_trial_is_identical_run_to_run(two_worker_reference, tmp_path):
    # Determinism with a worker group: same config and seed, a fresh group of two workers, the very
    # same metrics (docs/ray.md, "Determinism", says what differs from one worker and why).
    again = run_trial(TrialConfig(**TWO_WORKERS), storage_path=str(tmp_path), name="again")
    pd.testing.assert_frame_equal(NOT_TIMING(again.history), NOT_TIMING(two_worker_reference.history))
    assert again.metrics["val/top1"] > 50.0  # it trained: far above chance (10%)


# ------------------------------------------------------------------------------------ node lost
@pytest.fixture
def three_node_cluster():
    """A head with no CPUs (the driver's node, as on a real cluster) and two 2-CPU worker nodes."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from pf_sweep.trial import set_ray_environment

    ray.shutdown()  # this module's local Ray, if a test above started it
    set_ray_environment()
    # On the machine's address, not 127.0.0.1: a driver joining by address resolves 127.0.0.1 to it.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_a_lost_node_reschedules_the_trial_from_its_checkpoint_on_another_node(three_node_cluster, tmp_path):
    # A 1-trial sweep whose trial trains on a worker group; once epoch 0's checkpoint is on the
    # shared storage (tmp_path, which every simulated node reads), the node running the trial's
    # worker goes away with every process on it. The sweep must finish the trial on the other node,
    # resumed from that checkpoint, with the metrics of an uninterrupted run.
    import search_spaces.base
    from pf_sweep.sweep import SweepSettings, launch

    cluster, nodes = three_node_cluster
    base = {**TINY, "epochs": 3, "seed": 2, "max_failures": 1}
    space = search_spaces.base.SearchSpace(name="lost", description="one trial", base=base, grid={"rho": [0.05]})
    settings = SweepSettings(num_samples=1, max_concurrent=1, executor="workers", max_failures=1)
    thread, out = _in_thread(lambda: launch(space, settings, storage_path=str(tmp_path), name="lost", address=cluster.address))
    runs, deadline, workers = tmp_path / "lost" / "runs", time.monotonic() + 180, []
    while thread.is_alive() and time.monotonic() < deadline:
        if any(_registered(run, "checkpoint_000000") for run in runs.glob("train-*")):
            workers = _alive_train_workers()
            if workers:
                break
        time.sleep(0.05)
    assert workers, "the trial never checkpointed with a live worker"
    (node,) = [n for n in nodes if n.node_id == workers[0].node_id]
    (run,) = runs.glob("train-*")
    unfinished = not (run / "checkpoint_000002").exists()
    first_epoch = _stored_first_epoch(run)
    cluster.remove_node(node, allow_graceful=False)
    thread.join(timeout=240)
    assert unfinished, "the trial finished before its node could be removed"
    assert not thread.is_alive(), "the sweep never ended after the node was lost"
    if "error" in out:
        raise out["error"]
    (result,) = list(out["result"])
    assert result.error is None, result.error
    survivor = next(n for n in nodes if n is not node)
    assert {w.node_id for w in _alive_train_workers()} <= {survivor.node_id}
    history = pd.DataFrame(json.loads((run / "checkpoint_000002" / "metrics.json").read_text()))  # floats exact
    assert history.iloc[0][list(first_epoch)].to_dict() == first_epoch, "epoch 0 was trained again: the trial did not resume"
    clean = run_trial(TrialConfig(**base, rho=0.05), local=True, storage_path=None)
    pd.testing.assert_frame_equal(NOT_TIMING(history), NOT_TIMING(clean.history), check_dtype=False)


# ------------------------------------------------------------------------------------ storage gone
def _set_writable(path: Path, writable: bool) -> None:
    """Make a tree unwritable (or writable again), also for root: the immutable flag, else the mode bits."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "-i" if writable else "+i", str(path)], check=True, capture_output=True)
    else:
        subprocess.run(["chmod", "-R", "u+w" if writable else "a-w", str(path)], check=True, capture_output=True)


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_whose_storage_becomes_unwritable_fails_clearly_and_resumes_once_it_is_back(tmp_path):
    # Three one-at-a-time trials; once the first has finished, nothing under the sweep directory can
    # be written any more (a full or read-only volume, a lost mount). The sweep must stop with a
    # non-zero exit and one clear line naming the directory, not retry trials into the void or
    # report success; once the storage is back, `--resume` completes every trial, each exactly once.
    if os.geteuid() == 0 and subprocess.run(["which", "chattr"], capture_output=True).returncode != 0:
        pytest.skip("root without chattr cannot make a directory unwritable")
    storage = tmp_path / "store"
    args = ["--storage", str(storage), "--name", "gone", "--num-samples", "3", "--max-concurrent", "1"]
    args += ["--set", "epochs=2", "--set", "train_split=train[:384]"]
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    sweep_dir, deadline = storage / "gone", time.monotonic() + 240
    try:
        while time.monotonic() < deadline and driver.poll() is None and not any(sweep_dir.glob("runs/*/checkpoint_000001")):
            time.sleep(0.05)
        _set_writable(sweep_dir, False)
        try:
            out, _ = driver.communicate(timeout=120)
        finally:
            _set_writable(sweep_dir, True)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()
    assert driver.returncode not in (0, None), out[-3000:]
    assert str(sweep_dir) in out and "writ" in out.lower(), out[-3000:]

    proc = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert len(summary) == 3 and set(summary["epoch"]) == {1}
