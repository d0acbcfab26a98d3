"""``run_trial`` on a small local Ray: the same loop as in-process, one and two workers."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from pf_sweep import TrialConfig, run_trial

pytestmark = pytest.mark.ray
NOT_TIMING = lambda df: df[[c for c in df.columns if not c.startswith("time/")]]  # noqa: E731


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    from pf_sweep.trial import set_ray_environment

    set_ray_environment()
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.1"
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_one_worker_matches_in_process_run(ray_cluster, tmp_path):
    cfg = TrialConfig(epochs=2, lr=0.05, batch_size=64, seed=5)
    on_ray = run_trial(cfg, storage_path=str(tmp_path), name="one")
    local = run_trial(cfg, local=True, storage_path=None)
    pd.testing.assert_frame_equal(NOT_TIMING(on_ray.history), NOT_TIMING(local.history))
    assert on_ray.checkpoint is not None and os.path.exists(os.path.join(on_ray.checkpoint, "state.pt"))


def test_two_workers_average_gradients_like_one_worker_on_the_global_batch(ray_cluster, tmp_path):
    # pf_mlp has no BatchNorm and plain SGD has no perturbation, so each worker's half batch averages
    # (one all-reduce per step) to exactly the one-worker gradient: only float summation order differs.
    common = {"model": "pf_mlp", "method": "sgd", "epochs": 1, "lr": 0.05, "augment": False}
    two = run_trial(TrialConfig(**common, batch_size=32, num_workers=2), storage_path=str(tmp_path), name="two")
    one = run_trial(TrialConfig(**common, batch_size=64), local=True, storage_path=None)
    assert two.metrics["step"] == one.metrics["step"]
    assert two.metrics["train/loss"] == pytest.approx(one.metrics["train/loss"], rel=1e-5)
    assert two.metrics["val/loss"] == pytest.approx(one.metrics["val/loss"], rel=1e-5)


def test_two_sam_workers_first_epoch_loss_close_to_one_worker(ray_cluster, tmp_path):
    # With SAM each worker perturbs with its own half batch (m = 32 instead of 64) and BatchNorm
    # normalises over 32 examples: a different trajectory on the same global batches. Measured here,
    # the first-epoch loss differs by about 4%; 15% leaves room for seeds while still catching a worker
    # that trains on the wrong shard or skips the gradient average (loss stays near ln 10 = 2.3).
    two = run_trial(TrialConfig(epochs=1, lr=0.05, batch_size=32, num_workers=2), storage_path=str(tmp_path), name="sam2")
    one = run_trial(TrialConfig(epochs=1, lr=0.05, batch_size=64), local=True, storage_path=None)
    assert two.history["train/loss"].iloc[0] == pytest.approx(one.history["train/loss"].iloc[0], rel=0.15)
    assert two.metrics["val/top1"] > 80.0


def test_worker_crash_resumes_from_last_checkpoint_and_matches_uninterrupted_run(ray_cluster, tmp_path):
    # The first attempt's worker dies during epoch 1 (after epoch 0's checkpoint was reported); Ray
    # Train restarts the worker group (max_failures=1) and the loop resumes from that checkpoint.
    # Resume restores model, optimizer, scheduler and RNG, so the result equals a run that never failed.
    from pf_sweep.trial import build_trainer

    marker, reports = tmp_path / "crashed-once", tmp_path / "reports.txt"

    def crash_once_in_epoch_1(config):
        from pf_sweep import train
        from pf_sweep.session import RaySession

        class CrashingSession(RaySession):
            def report(self, metrics, write_checkpoint):
                with reports.open("a") as f:
                    f.write(f"{int(metrics['epoch'])}\n")
                if metrics["epoch"] == 1 and not marker.exists():
                    marker.touch()
                    raise RuntimeError("injected worker failure")
                super().report(metrics, write_checkpoint)

        train.run(train.TrialConfig.from_dict(config), CrashingSession())

    cfg = TrialConfig(epochs=3, lr=0.05, batch_size=64, seed=11, method="sam", rho=0.05, max_failures=1)
    result = build_trainer(cfg, storage_path=str(tmp_path), name="crash", train_fn=crash_once_in_epoch_1).fit()
    assert result.error is None
    assert marker.exists(), "the failure was never injected"
    assert reports.read_text().split() == ["0", "1", "1", "2"], "the restarted group did not resume after epoch 0"
    resumed = pd.read_json(os.path.join(result.checkpoint.path, "metrics.json"))
    clean = run_trial(cfg, local=True, storage_path=None)
    assert list(resumed["epoch"]) == [0.0, 1.0, 2.0]
    pd.testing.assert_frame_equal(NOT_TIMING(resumed), NOT_TIMING(clean.history), check_dtype=False)


def test_run_trial_rejects_callbacks_in_process():
    with pytest.raises(ValueError, match="callbacks"):
        run_trial(TrialConfig(epochs=1), local=True, storage_path=None, callbacks=[object()])


def test_uri_storage_keeps_checkpoints_and_history(ray_cluster, tmp_path):
    # A URI goes through pyarrow filesystems (as s3:// or gs:// would); file:// needs no network.
    cfg = TrialConfig(epochs=2, lr=0.05, batch_size=64, seed=3, method="sgd")
    result = run_trial(cfg, storage_path=f"file://{tmp_path}/store", name="uri")
    assert list(result.history["epoch"]) == [0.0, 1.0]
    assert (tmp_path / "store" / "uri").is_dir()
    assert any((tmp_path / "store" / "uri").glob("checkpoint_*/state.pt"))


def test_a_local_ray_from_the_api_is_on_loopback_and_its_monitor_is_stopped_alone():
    """``ensure_ray`` in a fresh process that has not imported Ray (as ``run_trial``, ``launch`` and the
    analysis functions call it): the node address is loopback, Gloo is pinned to the loopback interface
    in the local Ray's processes but not left in the caller's environment (nor is Train's preemption
    watcher switch), and stopping the autoscaler monitor (``pf_sweep.trial._kill_local_autoscaler_monitor``,
    run before Ray's exit handler) kills only the monitor while Ray keeps working."""
    import subprocess
    import sys
    from pathlib import Path

    code = """
import contextlib, os, time, psutil
from pf_sweep.trial import _kill_local_autoscaler_monitor, ensure_ray
ensure_ray(num_cpus=1, verbose=False, dashboard=False)
import ray
def running():
    out = {}
    for c in psutil.Process().children():
        with contextlib.suppress(psutil.NoSuchProcess):
            if c.status() != psutil.STATUS_ZOMBIE:
                out[c.pid] = c
    return out
before = running()
raylet = next(c for c in before.values() if c.name() == "raylet")
monitors = sorted(pid for pid, c in before.items() if any("/ray/autoscaler/" in part for part in c.cmdline()))
_kill_local_autoscaler_monitor()
time.sleep(0.5)
print(ray.util.get_node_ip_address(), raylet.environ().get("GLOO_SOCKET_IFNAME"), "GLOO_SOCKET_IFNAME" in os.environ)
watcher = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
print(raylet.environ().get(watcher), watcher in os.environ)
print(len(before), len(monitors), sorted(set(before) - set(running())) == monitors, ray.get(ray.put(7)))
"""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"}  # pf-sweep's default
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    address, gloo, leaked, watcher, watcher_leaked, children, monitors, only_the_monitor_died, value = proc.stdout.split()
    assert address == "127.0.0.1" and gloo == "lo" and leaked == "False"
    # Ray Train's preemption watcher, a process per worker group, is off in a local Ray (and the
    # caller's environment is as it was).
    assert watcher == "0" and watcher_leaked == "False"
    assert int(children) > 2 and monitors == "1" and only_the_monitor_died == "True" and value == "7"
    assert "every interface" not in proc.stderr  # the warning for a Ray imported too early
