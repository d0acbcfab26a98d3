"""Memory across trials: does a reused trial actor, or the training loop itself, grow trial after trial?

Two series, side by side in one run:

- **sweep**: the whole ``run_sweep.py`` CLI, one trial at a time (``--max-concurrent 1``), so one
  reused Tune trial actor runs every trial. Each time another trial's last checkpoint lands, it
  records the actor's RSS and the driver's.
- **loop**: the same kind of trials (SGD, SAM and SAM-OBF at each m in turn) run by
  ``pf_sweep.train.run`` one after another in this process, with ``gc.collect()`` after each: our
  training code alone, without Ray or Tune.

It prints each series at a few points and, for each, the growth per trial over the second half of the
trials: a leak grows linearly, a warm-up (allocator pools, lazily built caches) levels off early.

    .venv/bin/python benchmarks/trial_memory.py              # 48 trials of 2 digits epochs each
    .venv/bin/python benchmarks/trial_memory.py --trials 24
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from sweep_executors import trial_actor_processes

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def sweep_series(trials: int, epochs: int, storage: Path) -> tuple[list[float], list[float]]:
    """(actor RSS, driver RSS) in MB, one entry per finished trial of a one-at-a-time digits sweep."""
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(storage), "--name", "memory"]
    cmd += ["--num-samples", str(trials), "--max-concurrent", "1", "--set", f"epochs={epochs}"]
    proc = subprocess.Popen(
        cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    runs, last = storage / "memory" / "runs", f"checkpoint_{epochs - 1:06d}"
    actor, driver = [], []
    while proc.poll() is None:
        done = sum((run / last / "metrics.json").exists() for run in runs.glob("train-*"))
        if done > len(actor):
            rss = [p.memory_info().rss for p in trial_actor_processes()]
            try:
                driver.append(psutil.Process(proc.pid).memory_info().rss / MB)
            except psutil.NoSuchProcess:
                break
            actor.append(max(rss, default=0) / MB)
        time.sleep(0.05)
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"the sweep failed:\n{err[-3000:]}")
    return actor, driver


def loop_series(trials: int, epochs: int) -> list[float]:
    """RSS in MB of this process after each in-process digits trial (no Ray, no Tune)."""
    from pf_sweep.config import TrialConfig
    from pf_sweep.session import LocalSession
    from pf_sweep.train import run

    base = {"dataset": "digits", "model": "pf_cnn_small", "epochs": epochs, "batch_size": 64, "opt": "momentum"}
    base |= {"sched": "cosine", "weight_decay": 5e-4, "lr": 0.05, "cpus_per_worker": 1}
    me, series = psutil.Process(), []
    for i in range(trials):
        kind = ("sgd", "max", "obf")[i % 3]
        sam = {} if kind == "sgd" else {"rho": 0.05, "perturbation": kind, "sharpness_m": (8, 16, 32, 64)[i % 4]}
        cfg = TrialConfig(**base, method="sgd" if kind == "sgd" else "sam", seed=i, **sam)
        with tempfile.TemporaryDirectory() as run_dir:
            run(cfg, LocalSession(run_dir))
        gc.collect()
        series.append(me.memory_info().rss / MB)
    return series


def per_trial_growth(series: list[float]) -> float:
    """MB per trial over the second half (least-squares slope): what a leak shows once any warm-up is
    over. A fitted slope, not last minus middle, since one sample moves by a few MB with the moment
    in the next trial's start-up at which it is taken."""
    half = series[len(series) // 2 :]
    return float(np.polyfit(np.arange(len(half)), half, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    if args.trials < 4:
        parser.error("--trials must be at least 4")
    with tempfile.TemporaryDirectory() as storage:
        actor, driver = sweep_series(args.trials, args.epochs, Path(storage))
    loop = loop_series(args.trials, args.epochs)

    marks = sorted({1, 2, 4, len(loop) // 4, len(loop) // 2, 3 * len(loop) // 4, len(loop)})
    print(f"\nRSS (MB) after trial k, {args.trials} digits trials of {args.epochs} epochs, one at a time\n")
    print(f"{'k':>4}{'sweep actor':>13}{'sweep driver':>14}{'loop alone':>12}")
    for k in marks:
        cells = [series[k - 1] if k <= len(series) else float("nan") for series in (actor, driver, loop)]
        print(f"{k:>4}{cells[0]:>13.1f}{cells[1]:>14.1f}{cells[2]:>12.1f}")
    print("\ngrowth per trial over the second half, fitted (MB/trial):")
    for name, series in (("sweep actor", actor), ("sweep driver", driver), ("loop alone", loop)):
        rise = series[-1] - series[0]
        print(f"  {name:<13}{per_trial_growth(series):>8.3f}   (first to last trial: {rise:+.1f} MB)")


if __name__ == "__main__":
    main()
