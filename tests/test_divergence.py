"""Divergence: a non-finite training loss ends the trial at once with its reason, in-process and in a
sweep, where Optuna records it as failed, the other trials go on and no retry trains it again."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pf_sweep
import pf_sweep.train as train_module
from pf_sweep import TrainingDiverged, TrialConfig, run_trial
from pf_sweep.divergence import MARKER_FILE, as_diverged, find_reason, mark, read_marker, refuse_if_diverged
from pf_sweep.progress import SweepProgress

ROOT = Path(__file__).resolve().parents[1]
BASE = {"dataset": "digits", "model": "pf_mlp", "train_split": "train[:256]", "batch_size": 32, "train_eval_size": 64}


def _count_updates(monkeypatch) -> list[int]:
    """Patch the loop's optimizer factory so that every applied update is counted."""
    applied: list[int] = []
    build = train_module.build_optimizer

    def counting(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        target = getattr(optimizer, "base_optimizer", optimizer)  # SAM wraps the base optimizer
        target.register_step_post_hook(lambda *_: applied.append(1))
        return optimizer

    monkeypatch.setattr(train_module, "build_optimizer", counting)
    return applied


def _record_losses(monkeypatch) -> list[float]:
    """Patch the loop's loss factory so that every training loss it computes is recorded."""
    seen: list[float] = []
    build = train_module.build_loss

    def recording(*args, **kwargs):
        loss_fn = build(*args, **kwargs)

        def recorded(logits, targets):
            loss = loss_fn(logits, targets)
            seen.append(float(loss.detach()))
            return loss

        return recorded

    monkeypatch.setattr(train_module, "build_loss", recording)
    return seen


@pytest.mark.parametrize("method", ["sgd", "sam"])
def test_a_huge_lr_raises_training_diverged_before_applying_the_first_nan_update(monkeypatch, method):
    applied = _count_updates(monkeypatch)
    losses = _record_losses(monkeypatch)
    cfg = TrialConfig(**BASE, epochs=3, lr=1e6, method=method)
    with pytest.raises(TrainingDiverged, match=r"^diverged: train/loss is nan at epoch 0 step \d+$") as caught:
        run_trial(cfg, local=True, storage_path=None)
    assert isinstance(caught.value, RuntimeError) and pf_sweep.TrainingDiverged is TrainingDiverged
    # The step named is the first whose training loss (SAM: the clean one, first of its two) was NaN,
    # counted independently of the loop's own check; the update with that loss never applied.
    clean = losses[:: 1 if method == "sgd" else 2]
    first_nan = next(i for i, value in enumerate(clean) if not math.isfinite(value)) + 1
    assert caught.value.step == first_nan
    assert len(applied) == caught.value.step - 1


def test_an_inf_loss_names_its_update_counted_over_epochs_and_accumulation(monkeypatch):
    # grad_accum_steps=2 on 256 examples of 32: 4 updates an epoch. Micro-batch 13 (counted from 0 over
    # the trial) is the second epoch's sixth, so update 4 + 5 // 2 + 1 = 7 of the trial.
    calls = []
    build_loss = train_module.build_loss

    def loss_going_inf(*args, **kwargs):
        real = build_loss(*args, **kwargs)

        def loss(logits, y):
            calls.append(1)
            value = real(logits, y)
            return value + float("inf") if len(calls) == 14 else value

        return loss

    monkeypatch.setattr(train_module, "build_loss", loss_going_inf)
    applied = _count_updates(monkeypatch)
    cfg = TrialConfig(**BASE, epochs=3, lr=0.05, grad_accum_steps=2, method="sgd")
    with pytest.raises(TrainingDiverged, match=r"^diverged: train/loss is inf at epoch 1 step 7$"):
        run_trial(cfg, local=True, storage_path=None)
    assert len(calls) == 14 and len(applied) == 6


def test_the_device_watch_reports_the_first_bad_update_when_read_only_at_the_epoch_end():
    # What a GPU run does between sync points: keep going, and name the first bad update when read.
    watch = train_module._LossWatch(torch.device("cpu"), epoch=2, first_step=11, accum=1)
    watch.eager = False
    for value in (1.0, 2.0, float("-inf"), float("nan"), 3.0):
        watch.update(torch.tensor(value))
    with pytest.raises(TrainingDiverged, match=r"^diverged: train/loss is -inf at epoch 2 step 13$"):
        watch.check()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_watch_never_syncs_per_step_and_still_names_the_first_bad_update():
    cuda = torch.device("cuda")
    finite = [torch.tensor(float(i), device=cuda) for i in range(20)]
    diverging = [torch.tensor(v, device=cuda) for v in (float("inf"), float("nan"), 1.0)]
    watch = train_module._LossWatch(cuda, epoch=4, first_step=101, accum=2)
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        for loss in finite:
            watch.update(loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(TrainingDiverged, match=r"^diverged: train/loss is inf at epoch 4 step 111$"):
        for loss in diverging:
            watch.update(loss)
        torch.cuda.synchronize()
        watch.update(finite[0])  # the pinned copy has landed: seen without a sync
        pytest.fail("the pinned flag never showed the divergence")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_huge_lr_on_a_gpu_raises_training_diverged():
    cfg = TrialConfig(**BASE, epochs=2, lr=1e6, method="sam", use_gpu=True)
    with pytest.raises(TrainingDiverged, match=r"^diverged: train/loss is nan at epoch 0 step \d+$"):
        run_trial(cfg, local=True, storage_path=None)


def test_the_marker_refuses_retries_and_counts_them(tmp_path):
    run = tmp_path / "runs" / "train-x"
    refuse_if_diverged(run)  # never diverged: nothing happens
    mark(run, TrainingDiverged("diverged: train/loss is nan at epoch 1 step 9"))
    for _ in range(2):
        with pytest.raises(TrainingDiverged, match=r"^diverged: train/loss is nan at epoch 1 step 9$"):
            refuse_if_diverged(run)
    assert read_marker(run) == {"reason": "diverged: train/loss is nan at epoch 1 step 9", "refused_retries": 2}
    assert [p.name for p in run.iterdir()] == [MARKER_FILE]


def test_a_worker_group_failure_yields_the_earliest_rank_divergence():
    class FakeWorkerGroupError(Exception):
        def __init__(self, failures):
            super().__init__("Training failed due to worker errors")
            self.worker_failures = failures

    late = TrainingDiverged("diverged: train/loss is nan at epoch 0 step 12")
    early = TrainingDiverged("diverged: train/loss is inf at epoch 0 step 11")
    error = FakeWorkerGroupError({0: late, 1: early, 2: ConnectionError("gloo: peer closed")})
    assert as_diverged(error).reason == early.reason
    assert as_diverged(FakeWorkerGroupError({0: ValueError("x")})) is None
    text = "Failure # 1\nTraceback ...\npf_sweep.divergence.TrainingDiverged: diverged: train/loss is nan at epoch 3 step 40\n"
    assert find_reason(text) == "diverged: train/loss is nan at epoch 3 step 40"


def test_progress_line_gives_the_reason_and_a_failed_trial_leaves_the_best(tmp_path, caplog):
    class FakeTrial:
        def __init__(self, trial_id, status="RUNNING", error_file=None):
            self.trial_id, self.status, self.error_file = trial_id, status, error_file

    error_file = tmp_path / "error.txt"
    error_file.write_text("Failure # 1 (occurred at x)\nTrainingDiverged: diverged: train/loss is nan at epoch 1 step 14\n")
    progress = SweepProgress("val/top1", "max", 2)
    good, bad = FakeTrial("good", "TERMINATED"), FakeTrial("bad", error_file=str(error_file))
    progress.on_trial_result(0, [good, bad], good, {"val/top1": 80.0})
    progress.on_trial_result(0, [good, bad], bad, {"val/top1": 90.0})
    assert progress.best_trial == "bad"
    with caplog.at_level("INFO", logger="pf_sweep.progress"):
        progress.on_trial_error(0, [good, bad], bad)
    assert "trial bad failed (diverged: train/loss is nan at epoch 1 step 14) (val/top1 90): 2/2 done" in caplog.text
    assert "best val/top1 80 (trial good)" in caplog.text


# Tune pickles the searcher by reference, so ``suggest`` lives in an importable module (a function
# defined in the space file itself cannot be pickled: the file is loaded by path, not imported).
SUGGEST = """
def suggest(trial):
    trial.suggest_categorical("lr", [0.05, 1e6])
"""
OPTUNA_SPACE = """
from search_spaces.base import SearchSpace
from diverging_suggest import suggest

SPACE = SearchSpace(
    name="diverging",
    description="one sane lr and one that diverges at once",
    base={"dataset": "digits", "model": "pf_mlp", "train_split": "train[:256]", "epochs": 2, "batch_size": 32,
          "train_eval_size": 64},
    suggest=suggest,
    points_to_evaluate=({"lr": 1e6}, {"lr": 0.05}),
    num_samples=2,
    max_concurrent=1,
)
"""


@pytest.mark.ray
@pytest.mark.parametrize("executor", ["auto", pytest.param("workers", marks=pytest.mark.slow)])
def test_a_diverging_trial_fails_once_in_the_sweep_and_the_sweep_goes_on(tmp_path, executor):
    space = tmp_path / "diverging.py"
    space.write_text(OPTUNA_SPACE)
    (tmp_path / "diverging_suggest.py").write_text(SUGGEST)
    storage = tmp_path / "store"
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(storage), "--name", "d", "--space", str(space)]
    # A worker group diverges the same way in its own processes: only the diverging trial runs there
    # (the sane one shows that the sweep goes on, which does not depend on the executor).
    trials_run = 2 if executor == "auto" else 1
    cmd += ["--max-failures", "1", "--executor", executor, "--num-samples", str(trials_run)]
    proc = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(tmp_path)])},
        cwd=tmp_path,
    )
    # A sweep whose every trial failed has no best trial: it ends with the errors and exit code 1.
    assert proc.returncode == (0 if trials_run == 2 else 1), proc.stdout[-3000:] + proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    assert "failed (diverged: train/loss is nan at epoch 0 step" in console and f"{trials_run}/{trials_run} done" in console
    assert ("No trial reported val/top1" in proc.stderr) == (trials_run == 1)

    from analysis import load_sweep

    trials = load_sweep(storage / "d").set_index("lr")
    assert trials.loc[1e6, "status"] == "ERROR" and len(trials) == trials_run
    diverged_id = trials.loc[1e6, "trial_id"]
    marker = read_marker(storage / "d" / "runs" / f"train-{diverged_id}")
    assert trials.loc[1e6, "error"] == marker["reason"]
    assert re.fullmatch(r"diverged: train/loss is nan at epoch 0 step \d+", marker["reason"])
    assert f"trial {diverged_id} failed ({marker['reason']})" in console
    if trials_run == 2:
        assert trials.loc[0.05, "status"] == "TERMINATED"
        assert trials.loc[0.05, "epochs_done"] == 2 and trials.loc[0.05, "error"] is None

    # Tune retried it once (--max-failures 1); the retry found the marker and did not train.
    assert marker["refused_retries"] == 1, marker
    failures = (storage / "d" / f"trial-{diverged_id}" / "error.txt").read_text().count("Failure #")
    assert failures == 2
    assert not list((storage / "d" / "runs" / f"train-{diverged_id}").glob("checkpoint_*"))

    import optuna

    study = optuna.load_study(study_name="d", storage=f"sqlite:///{storage / 'd' / 'optuna.db'}")
    # With the budget spent, Tune's searcher may still have asked Optuna for one more trial it never ran.
    states = {t.params["lr"]: t.state for t in study.trials if t.params}
    expected = {1e6: optuna.trial.TrialState.FAIL, 0.05: optuna.trial.TrialState.COMPLETE}
    assert states == dict(list(expected.items())[:trials_run])
    assert json.loads((storage / "d" / "sweep.json").read_text())["settings"]["max_failures"] == 1
