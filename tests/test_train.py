"""The training loop in-process (no Ray): learning, determinism, resume, accumulation."""

from __future__ import annotations

import math
import shutil

import pandas as pd
import pytest

from pf_sweep import TrialConfig, run_trial
from pf_sweep.forgetting import FORGETTING_KEYS

FAST = {"epochs": 2, "lr": 0.05, "batch_size": 64}
NOT_TIMING = lambda df: df[[c for c in df.columns if not c.startswith("time/")]]  # noqa: E731


def test_same_seed_gives_identical_metrics_twice():
    cfg = TrialConfig(**FAST, seed=3)
    a = run_trial(cfg, local=True, storage_path=None)
    b = run_trial(cfg, local=True, storage_path=None)
    pd.testing.assert_frame_equal(NOT_TIMING(a.history), NOT_TIMING(b.history))


def test_different_seed_gives_different_metrics():
    a = run_trial(TrialConfig(**FAST, seed=1), local=True, storage_path=None)
    b = run_trial(TrialConfig(**FAST, seed=2), local=True, storage_path=None)
    assert a.metrics["train/loss"] != b.metrics["train/loss"]


@pytest.mark.parametrize("perturbation", ["max", "obf"])
def test_sam_trial_on_digits_reaches_90_percent_and_reports_forgetting(perturbation):
    result = run_trial(TrialConfig(method="sam", perturbation=perturbation, epochs=5, lr=0.05), local=True, storage_path=None)
    assert result.metrics["val/top1"] >= 90.0
    assert len(result.history) == 5
    expected = {
        "epoch",
        "step",
        "lr",
        "rho",
        "train/loss",
        "train/perturb_loss",
        "train/top1",
        "val/loss",
        "val/top1",
        "val/top5",
        "time/epoch_s",
        "time/eval_s",
        "time/samples_per_s",
        "eval/train_subset/top1",
        "gen_gap",
    }
    assert expected | {f"forget/{k}" for k in FORGETTING_KEYS} <= set(result.metrics)
    # Forgetting is measured, not a placeholder: the perturbation changes the predictions over training.
    assert result.history["forget/kl"].max() > 0
    assert result.history["forget/loss_increase"].abs().max() > 0
    assert result.metrics["gen_gap"] == pytest.approx(result.metrics["eval/train_subset/top1"] - result.metrics["val/top1"])


@pytest.mark.parametrize(
    "overrides",
    [
        {"method": "sgd"},
        {"method": "gsam", "gsam_alpha": 0.1},
        {"method": "asam", "asam_before_norm": True, "asam_after_norm": True, "rho": 0.5},
        {"method": "randsam"},
        {"method": "sam", "sharpness_m": 16, "rho_policy": "lr_prop", "min_rho": 0.01},
        {"method": "sam", "loss": "bce", "smoothing": 0.1, "opt": "adamw", "lr": 1e-3, "sched": "linear"},
        {"method": "sam", "snp_factor": 0.1, "clip_grad": 1.0, "warmup_epochs": 1},
    ],
)
def test_every_method_trains_and_reports_finite_metrics(overrides):
    result = run_trial(TrialConfig(**{**FAST, **overrides}), local=True, storage_path=None)
    assert len(result.history) == 2
    assert all(math.isfinite(v) for v in result.metrics.values())
    assert result.metrics["val/top1"] > 30.0  # far above chance (10%) after two epochs
    assert ("forget/kl" in result.metrics) == (overrides["method"] != "sgd")


def test_resumed_trial_equals_uninterrupted_run(tmp_path):
    cfg = TrialConfig(epochs=4, lr=0.05, method="sam", snp_factor=0.05, drop=0.1)
    full = run_trial(cfg, local=True, storage_path=str(tmp_path / "a"), name="t")
    # What an interruption after epoch 1 leaves behind: the checkpoints up to epoch 1 only.
    shutil.copytree(tmp_path / "a" / "t", tmp_path / "b" / "t")
    for late in ("checkpoint_000002", "checkpoint_000003"):
        shutil.rmtree(tmp_path / "b" / "t" / late)
    resumed = run_trial(cfg, local=True, storage_path=str(tmp_path / "b"), name="t")
    assert list(resumed.history["epoch"]) == [2.0, 3.0]  # only the missing epochs ran
    pd.testing.assert_frame_equal(
        NOT_TIMING(resumed.history).reset_index(drop=True), NOT_TIMING(full.history.iloc[2:]).reset_index(drop=True)
    )


def test_checkpoint_holds_full_history_and_config(tmp_path):
    cfg = TrialConfig(**FAST)
    result = run_trial(cfg, local=True, storage_path=str(tmp_path), name="t")
    from pf_sweep.checkpoint import load_checkpoint

    state = load_checkpoint(result.checkpoint)
    assert TrialConfig.from_dict(state["config"]) == cfg
    assert [row["epoch"] for row in state["history"]] == [0.0, 1.0]
    assert state["epoch"] == 1


def test_gradient_accumulation_matches_the_large_batch():
    # No BatchNorm, no dropout, plain SGD: two micro-batches of 32 average to the batch of 64 exactly
    # (up to float summation order), because the sampler keeps the same global batches.
    common = {"model": "pf_mlp", "method": "sgd", "epochs": 1, "lr": 0.05, "augment": False}
    big = run_trial(TrialConfig(**common, batch_size=64), local=True, storage_path=None)
    accum = run_trial(TrialConfig(**common, batch_size=32, grad_accum_steps=2), local=True, storage_path=None)
    assert accum.metrics["step"] == big.metrics["step"]
    assert accum.metrics["val/loss"] == pytest.approx(big.metrics["val/loss"], rel=1e-5)


def test_too_small_train_split_fails_with_a_clear_error():
    with pytest.raises(ValueError, match="fewer than one update"):
        run_trial(TrialConfig(train_split="train[:10]", batch_size=64), local=True, storage_path=None)


def test_extra_eval_sets_are_reported_on_the_last_epoch():
    cfg = TrialConfig(dataset="digits_spurious", eval_sets=(("digits_spurious", "validation_aligned"),), **FAST)
    result = run_trial(cfg, local=True, storage_path=None)
    assert "eval/digits_spurious:validation_aligned/top1" in result.metrics
    assert "eval/digits_spurious:validation_aligned/top1" not in result.history.iloc[0].dropna()
