"""Soak: hundreds of short trials through the whole ``run_sweep.py`` CLI, watched for a hang.

A sweep once stopped for good after 47 trials: a trial's Train run had ended but its last report
never reached Tune. That race is rare per trial, so only many trials show it is gone. This runs
``--num-samples`` (default 200) one-epoch ``digits_cpu`` trials of the tiny ``pf_cnn_tiny`` on 256
training images, two at a time, and watches the trials finish (``runs/*/checkpoint_*/metrics.json``
of the last epoch). If no trial finishes for ``--stall-s`` seconds the sweep counts as hung: the
script dumps the trial actors' stacks with ``py-spy`` (shipped with ``ray[default]``), stops the
sweep and exits 1.

It prints the wall time, trials per minute, when the first trial finished, the median and longest
gap between two finished trials (a hang-in-waiting shows as a long tail), and the driver's and trial actors' peak RSS.

    .venv/bin/python benchmarks/sweep_soak.py                    # 200 trials, about a minute on 2 cores
    .venv/bin/python benchmarks/sweep_soak.py --num-samples 50   # a quicker look
    .venv/bin/python benchmarks/sweep_soak.py --executor workers # Train worker groups: the reporting bridge
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import psutil
from sweep_executors import RssSampler  # benchmarks/ is the script's directory, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
SETS = {"epochs": "1", "model": "pf_cnn_tiny", "train_split": "train[:256]", "train_eval_size": "64"}


def finished_runs(runs: Path) -> set[str]:
    last = f"checkpoint_{int(SETS['epochs']) - 1:06d}"
    return {p.parents[1].name for p in runs.glob(f"train-*/{last}/metrics.json")}


def dump_stacks(pids: list[int]) -> None:
    py_spy = Path(sys.executable).with_name("py-spy")
    for pid in pids:
        print(f"\n--- py-spy dump --pid {pid}", flush=True)
        subprocess.run([str(py_spy), "dump", "--pid", str(pid)], timeout=60, check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--stall-s", type=float, default=180.0, help="no trial finished for this long = hung (default 180)")
    parser.add_argument("--executor", default="auto", choices=["auto", "workers"])
    parser.add_argument("--storage", help="keep the sweep here (default: a temporary directory)")
    args = parser.parse_args()
    if args.num_samples < 1 or args.max_concurrent < 1 or args.stall_s <= 0:
        parser.error("--num-samples, --max-concurrent and --stall-s must be positive")
    storage = Path(args.storage or tempfile.mkdtemp(prefix="pf-soak-"))
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), "--storage", str(storage), "--name", "soak"]
    cmd += ["--num-samples", str(args.num_samples), "--max-concurrent", str(args.max_concurrent), "--executor", args.executor]
    for field, value in SETS.items():
        cmd += ["--set", f"{field}={value}"]
    log = storage / "soak.log"
    storage.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        start = time.perf_counter()
        driver = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        sampler = RssSampler(driver.pid)
        sampler.start()
        runs = storage / "soak" / "runs"
        seen: dict[str, float] = {}
        last_change, hung = start, False
        while driver.poll() is None:
            now = time.perf_counter()
            for run in finished_runs(runs) - seen.keys():
                seen[run] = now
                last_change = now
            if now - last_change > args.stall_s:
                hung = True
                print(f"HUNG: no trial finished for {args.stall_s:.0f} s after {len(seen)} trials", flush=True)
                dump_stacks([pid for pid in sampler.actor_series if psutil.pid_exists(pid)])
                driver.send_signal(signal.SIGTERM)
                driver.wait(timeout=120)
                break
            time.sleep(0.5)
        wall = time.perf_counter() - start
        sampler.stop.set()
    actor_peak = max((max(series) for series in sampler.actor_series.values()), default=0)
    times = sorted(seen.values())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    summary_file = storage / "soak" / "summary.csv"
    summarized = len(pd.read_csv(summary_file)) if summary_file.exists() else 0
    print(f"\n{args.num_samples} trials ({args.executor}, {args.max_concurrent} at a time) on {os.cpu_count()} CPUs")
    print(f"exit code {driver.returncode}, {len(seen)} trials finished, {summarized} in summary.csv")
    print(f"wall {wall:.1f} s, {60 * len(seen) / wall:.1f} trials/min")
    if times:
        print(f"first trial finished after {times[0] - start:.1f} s (Python, imports, Ray's start, one trial)")
    if gaps:
        print(f"gap between finished trials: median {statistics.median(gaps):.2f} s, longest {max(gaps):.2f} s")
    print(f"peak RSS: driver {sampler.driver_peak / 2**20:.0f} MB, trial actor {actor_peak / 2**20:.0f} MB")
    print(f"log: {log}")
    ok = not hung and driver.returncode == 0 and len(seen) == summarized == args.num_samples
    print("soak: " + ("no hang, every trial finished" if ok else "FAILED"))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
