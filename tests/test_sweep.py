"""Sweeps: shipped spaces give valid trials; the CLI rejects bad input before Ray; a real tiny sweep."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import fake_ray_path, sigkill_sweep_mid_trial, tear_experiment_state

import search_spaces
from pf_sweep import TrialConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", search_spaces.names())
def test_every_shipped_space_suggests_valid_trial_configs(name):
    space = search_spaces.get(name)
    for params in space.sample(12, seed=1):
        cfg = space.config_for(params)
        assert isinstance(cfg, TrialConfig)
        # Conditional parameters appear only where they belong.
        if cfg.method == "sgd":
            assert "rho" not in params and "sharpness_m" not in params
        if params.get("perturbation") != "obf":
            assert "obf_gamma" not in params


def test_unknown_space_names_the_shipped_ones():
    with pytest.raises(ValueError, match="digits_cpu"):
        search_spaces.get("nope")


@pytest.fixture
def no_ray_path(tmp_path):
    """A PYTHONPATH entry whose ``ray`` package fails on import: proof that Ray was never started."""
    return fake_ray_path(tmp_path)


def _cli(args, *, storage, pythonpath=None, timeout=60):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, str(ROOT)) if p)}
    return subprocess.run(
        [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(storage), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=storage.parent,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--space", "nope"], "Unknown space"),
        (["--set", "rho=-1"], "Invalid rho"),
        (["--set", "bogus=1"], "Unknown TrialConfig field 'bogus'"),
        (["--set", "rho"], "expected FIELD=VALUE"),
        (["--set", "batch_size=60"], "sharpness_m"),
        (["--space", "m_sharpness_study", "--set", "batch_size=48"], "Invalid sharpness_m: 32"),
        (["--cpus-per-worker", "64"], "Impossible resources"),
        (["--num-samples", "0"], "--num-samples"),
        (["--max-failures", "-1"], "--max-failures"),
        (["--optuna-storage", "not a url"], "Invalid Optuna storage URL"),
        (["--log", "wandb"], "needs the 'wandb' package"),
        (["--name", "missing", "--resume"], "No sweep at"),
        (["--resume", "--log", "tensorboard"], "apply at launch"),
        (["--set", "dataset=tfds/cifar10", "--set", "data_dir=no-data-here"], "python -m pf_sweep.data prepare cifar10"),
    ],
)
def test_cli_rejects_bad_arguments_with_exit_2_before_ray(args, message, tmp_path, no_ray_path):
    if args[:2] == ["--log", "wandb"] and importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    storage = tmp_path / "store"
    proc = _cli(args, storage=storage, pythonpath=no_ray_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr  # one message, no traceback
    assert not storage.exists()


def test_cli_refuses_a_study_name_already_in_a_user_optuna_storage(tmp_path, no_ray_path):
    import optuna

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    study = optuna.create_study(study_name="exp", storage=url)
    study.optimize(lambda trial: trial.suggest_float("x", 0, 1), n_trials=3)
    proc = _cli(["--name", "exp", "--optuna-storage", url], storage=tmp_path / "store", pythonpath=no_ray_path)
    assert proc.returncode == 2 and "Optuna study 'exp' already exists" in proc.stderr
    assert len(optuna.load_study(study_name="exp", storage=url).trials) == 3


def test_cli_refuses_to_overwrite_an_existing_sweep(tmp_path, no_ray_path):
    storage = tmp_path / "store"
    (storage / "old").mkdir(parents=True)
    (storage / "old" / "sweep.json").write_text("{}")
    proc = _cli(["--name", "old"], storage=storage, pythonpath=no_ray_path)
    assert proc.returncode == 2 and "--resume" in proc.stderr
    assert sorted(p.name for p in (storage / "old").iterdir()) == ["sweep.json"]


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(tmp_path), "--dry-run", "--set", "epochs=2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"epochs": 2' in proc.stdout and "trial 0:" in proc.stdout
    assert not any(tmp_path.iterdir())


# The default executor only: worker-group trials are swept end to end by tests/test_executors.py
# (same metrics and layout, late reports), resumed after a killed worker by tests/test_faults.py and
# tests/test_trial_ray.py, and stopped by SIGTERM below; each worker-group variant here cost 2 minutes.
EXECUTORS = pytest.mark.parametrize("executor", ["auto"])


@pytest.mark.ray
@EXECUTORS
def test_four_trial_sweep_finishes_and_reports_the_best_stored_trial(tmp_path, executor):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            DRIVER_MODULES,
            str(ROOT / "run_sweep.py"),
            "--executor",
            executor,
            "--storage",
            str(tmp_path),
            "--name",
            "s",
            "--num-samples",
            "4",
            "--set",
            "epochs=1",
            "--set",
            "train_split=train[:640]",
        ],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sweep_dir = tmp_path / "s"
    assert json.loads((sweep_dir / "sweep.json").read_text())["space"] == "digits_cpu"
    summary = pd.read_csv(sweep_dir / "summary.csv")
    assert len(summary) == 4
    best_value = summary["val/top1"].max()
    assert f"val/top1 = {best_value:.6g}):" in proc.stdout
    runs = sorted((sweep_dir / "runs").iterdir())
    assert len(runs) == 4 and all(any(r.glob("checkpoint_*/state.pt")) for r in runs)
    # Tune's trial directories are named by trial id too, like the Train runs.
    tune_trials = sorted(p.name for p in sweep_dir.glob("trial-*"))
    assert tune_trials == [r.name.replace("train-", "trial-") for r in runs]
    # The Optuna study is in the sweep's SQLite file, where optuna-dashboard and Optuna's plots read it.
    import optuna

    study = optuna.load_study(study_name="s", storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    values = sorted(t.value for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert values == sorted(summary["val/top1"])
    assert "4/4 done, best val/top1" in proc.stderr
    # Tune's file loggers, but no TensorBoard unless --log asks: Tune's default one imported torch
    # into the driver (which only schedules) and wrote event files into every trial's directory.
    assert all((sweep_dir / trial / "result.json").stat().st_size > 0 for trial in tune_trials)
    assert all((sweep_dir / trial / "progress.csv").exists() for trial in tune_trials)
    assert not list(sweep_dir.glob("trial-*/events.out.tfevents.*"))
    assert "driver imported: []" in proc.stdout
    # Stopped by run_sweep itself, not in Ray's exit hook (which first sleeps half a second).
    assert "ray running at exit: False" in proc.stdout


# Runs the script named by argv[1] as __main__, then prints which heavy modules the process imported
# and whether Ray was still running when it returned.
DRIVER_MODULES = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    print("driver imported:", sorted({"torch", "timm", "tensorboardX"} & set(sys.modules)))
    print("ray running at exit:", "ray" in sys.modules and sys.modules["ray"].is_initialized())
"""


def _tune_epochs(sweep_dir: Path) -> dict[str, list[int]]:
    """Epochs each Tune trial reported, in order (Tune's own result.json per trial)."""
    out = {}
    for result in sweep_dir.glob("trial-*/result.json"):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        out[result.parent.name.removeprefix("trial-")] = [int(r["epoch"]) for r in rows]
    return out


@pytest.mark.ray
@EXECUTORS
def test_killed_sweep_driver_resumes_without_losing_or_repeating_trials(tmp_path, executor):
    # One trial at a time; SIGKILL the driver's whole process group (driver and its local Ray) once one
    # trial has finished and the next has checkpointed an epoch but not finished. `--resume` must
    # keep the finished trial, continue the interrupted one from its checkpoint, and run the rest.
    epochs, storage = 3, tmp_path / "store"
    args = ["--name", "k", "--num-samples", "3", "--max-concurrent", "1", "--set", f"epochs={epochs}", "--executor", executor]
    args += ["--set", "train_split=train[:640]"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(storage), *args]
    finished, running = sigkill_sweep_mid_trial(cmd, env=env, runs=storage / "k" / "runs", last_epoch=epochs - 1)
    before = _tune_epochs(storage / "k")
    trained = {run: (run / f"checkpoint_{epochs - 1:06d}" / "state.pt").stat().st_mtime_ns for run in finished}
    # As if the kill had come while Tune copied its state from the Ray session's staging folder: the
    # resume must put the staged copy back and lose nothing.
    torn = tear_experiment_state(storage / "k")

    proc = _cli([*args, "--resume"], storage=storage, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    if torn is not None:
        assert f"{torn.name} in {storage / 'k'} was cut short" in proc.stdout + proc.stderr
    summary = pd.read_csv(storage / "k" / "summary.csv")
    assert len(summary) == 3 and set(summary["epoch"]) == {epochs - 1}
    after = _tune_epochs(storage / "k")
    assert len(after) == 3
    for trial_id, reported in after.items():
        assert reported[-1] == epochs - 1 and reported == sorted(set(reported)), f"trial {trial_id}: {reported}"
    for run in finished:
        trial_id = run.name.removeprefix("train-")
        # Not trained again. Either Tune had recorded the trial's end (its results stay as they were),
        # or the driver died before that: Tune reruns the trial, which reports only its stored final
        # row, once, after what Tune had already logged (result.json is appended to, never rewritten).
        assert (run / f"checkpoint_{epochs - 1:06d}" / "state.pt").stat().st_mtime_ns == trained[run], (
            "a finished trial ran again"
        )
        logged = before.get(trial_id, [])
        expected = logged if logged[-1:] == [epochs - 1] else [*logged, epochs - 1]
        assert after[trial_id] == expected, f"trial {trial_id}: {after[trial_id]} after {logged}"
    assert not list((storage / "k").glob("trial-*/events.out.tfevents.*")), "the resumed sweep added Tune's default loggers"
    for run in running:
        # Tune keeps only the results after the restore; the first one must follow the checkpoint.
        trial_id = run.name.removeprefix("train-")
        assert trial_id in after, f"the interrupted trial {trial_id} was lost: Tune had not saved it"
        assert after[trial_id][0] >= 1, "the interrupted trial started over"


def test_tunes_default_loggers_are_off_only_while_the_sweep_runs(monkeypatch):
    from pf_sweep.sweep import NO_DEFAULT_LOGGERS_ENV, _tune_loggers_as_given

    monkeypatch.delenv(NO_DEFAULT_LOGGERS_ENV, raising=False)
    with _tune_loggers_as_given():
        assert os.environ[NO_DEFAULT_LOGGERS_ENV] == "1"
    assert NO_DEFAULT_LOGGERS_ENV not in os.environ
    monkeypatch.setenv(NO_DEFAULT_LOGGERS_ENV, "0")
    with _tune_loggers_as_given(enabled=False):  # a sweep stored before pf-sweep named its loggers
        assert os.environ[NO_DEFAULT_LOGGERS_ENV] == "0"
    with pytest.raises(RuntimeError), _tune_loggers_as_given():
        raise RuntimeError("the sweep failed")
    assert os.environ[NO_DEFAULT_LOGGERS_ENV] == "0"


def test_log_flag_adds_the_tracker_callback_and_progress_counts_finished_trials(tmp_path, caplog):
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    from pf_sweep.progress import SweepProgress
    from pf_sweep.storage import StoragePath
    from pf_sweep.sweep import SweepSettings, _callbacks

    space = search_spaces.get("digits_cpu")
    settings = SweepSettings(num_samples=3, max_concurrent=1, loggers=["tensorboard"])
    settings.validate()
    callbacks = _callbacks(settings, space, StoragePath.of(tmp_path), "s", 3)
    assert [type(c) for c in callbacks] == [SweepProgress, JsonLoggerCallback, CSVLoggerCallback, TBXLoggerCallback]
    # A caller's own file logger (launch(callbacks=...)) is not doubled: each would write every row.
    mine = JsonLoggerCallback()
    again = _callbacks(settings, space, StoragePath.of(tmp_path), "s", 3, given=[mine])
    assert [type(c) for c in again] == [SweepProgress, CSVLoggerCallback, TBXLoggerCallback]

    class FakeTrial:
        def __init__(self, trial_id, status="RUNNING"):
            self.trial_id, self.status = trial_id, status

    progress = callbacks[0]
    a, b, c = FakeTrial("a", "TERMINATED"), FakeTrial("b"), FakeTrial("c", "PENDING")
    progress.on_trial_result(0, [a, b, c], b, {"val/top1": 91.0})
    progress.on_trial_result(0, [a, b, c], b, {"val/top1": 88.0})  # worse: the best stays
    with caplog.at_level("INFO", logger="pf_sweep.progress"):
        progress.on_trial_complete(0, [a, b, c], b)
    assert "trial b finished (val/top1 88): 2/3 done, best val/top1 91 (trial b)" in caplog.text


@pytest.mark.ray
@pytest.mark.parametrize("executor", ["workers"])  # the in-actor executor: tests/test_unschedulable.py
def test_sigterm_stops_the_sweep_cleanly_and_prints_the_resume_command(tmp_path, executor):
    # What `ray job stop` sends to the driver alone: the CLI turns it into Tune's graceful Ctrl-C stop.
    storage = tmp_path / "store"
    args = ["--name", "t", "--num-samples", "3", "--max-concurrent", "1", "--set", "epochs=4", "--executor", executor]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(storage), *args]
    driver = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None and not any((storage / "t" / "runs").glob("*/checkpoint_*")):
        time.sleep(0.05)
    driver.send_signal(signal.SIGTERM)
    out, _ = driver.communicate(timeout=240)
    assert driver.returncode == 130, out[-3000:]
    assert f"--storage {storage} --name t --resume" in out


def test_a_database_password_is_masked_in_what_the_sweep_stores_and_prints():
    from pf_sweep.sweep import redact_url

    assert redact_url("postgresql://bob:s3cret@db:5432/optuna") == "postgresql://bob:***@db:5432/optuna"
    assert "s3cret" not in redact_url("mysql+pymysql://bob:s3cret@db/optuna?charset=utf8")
    assert redact_url("sqlite:////tmp/x/optuna.db") == "sqlite:////tmp/x/optuna.db"
    assert redact_url(None) is None


def test_summary_keeps_a_trial_whose_result_file_lost_its_rows():
    # A refused write can leave a trial's result.json empty while Tune's own state kept its last result.
    from types import SimpleNamespace

    from pf_sweep.sweep import summarize

    logged = {"trial_id": "a", "epoch": 1.0, "val/top1": 90.0, "config/lr": 0.1, "logdir": "a"}

    def result(trial_id, top1, lr):
        metrics = {"trial_id": trial_id, "epoch": 1.0, "val/top1": top1, "config": {"lr": lr}}
        return SimpleNamespace(metrics=metrics, config={"lr": lr}, path=f"/s/{trial_id}")

    results = [result("a", 90.0, 0.1), result("b", 95.0, 0.2)]

    class Grid(list):
        def get_dataframe(self):
            return pd.DataFrame([logged])  # what result.json gave: trial b's file is empty

        def get_best_result(self, metric, mode):
            return max(self, key=lambda r: r.metrics[metric])

    best, frame = summarize(Grid(results), "val/top1", "max")
    assert sorted(frame["trial_id"]) == ["a", "b"]
    row = frame.set_index("trial_id").loc["b"]
    assert row["val/top1"] == 95.0 and row["config/lr"] == 0.2 and row["epoch"] == 1.0
    assert best["config"] == {"lr": 0.2}


def test_the_best_trial_of_equal_scores_is_the_one_that_finished_first_in_any_result_order():
    # Tune's result order changes on --resume; the named winner must not.
    from types import SimpleNamespace

    from pf_sweep.sweep import best_result

    def result(trial_id, top1, timestamp):
        return SimpleNamespace(metrics={"trial_id": trial_id, "val/top1": top1, "timestamp": timestamp})

    results = [result("late", 99.4, 200), result("early", 99.4, 100), result("worse", 98.0, 50), result("nan", float("nan"), 1)]
    for order in (results, results[::-1], results[1:] + results[:1]):
        assert best_result(order, "val/top1", "max").metrics["trial_id"] == "early"
    assert best_result(results, "val/top1", "min").metrics["trial_id"] == "worse"
    same_second = [result("b", 99.4, 100), result("a", 99.4, 100)]
    assert best_result(same_second, "val/top1", "max").metrics["trial_id"] == "a"
    with pytest.raises(RuntimeError, match="No trial reported"):
        best_result([result("nan", float("nan"), 1), SimpleNamespace(metrics=None)], "val/top1", "max")
