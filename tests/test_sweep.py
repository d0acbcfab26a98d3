"""Sweeps: shipped spaces give valid trials; the CLI rejects bad input before Ray; a real tiny sweep."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

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


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--space", "nope"], "Unknown space"),
        (["--set", "rho=-1"], "Invalid rho"),
        (["--set", "bogus=1"], "Unknown TrialConfig field 'bogus'"),
        (["--set", "rho"], "expected FIELD=VALUE"),
        (["--set", "batch_size=60"], "sharpness_m"),
        (["--cpus-per-worker", "64"], "Impossible resources"),
        (["--num-samples", "0"], "--num-samples"),
    ],
)
def test_cli_rejects_bad_arguments_with_exit_2_before_ray(args, message, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(tmp_path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert not any(tmp_path.iterdir())


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


@pytest.mark.ray
def test_four_trial_sweep_finishes_and_reports_the_best_stored_trial(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run_sweep.py"),
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
    assert f"val/top1 = {best_value}" in proc.stdout
    runs = sorted((sweep_dir / "runs").iterdir())
    assert len(runs) == 4 and all(any(r.glob("checkpoint_*/state.pt")) for r in runs)
