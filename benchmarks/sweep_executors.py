"""Sweep executors side by side: ``--executor auto`` vs ``--executor workers`` vs in-process.

For each space it runs the whole ``run_sweep.py`` CLI in a subprocess (its wall time is the sweep's
wall time: Python start, imports, ``ray.init``, Tune, every trial, shutdown), once per executor,
then replays the very same trial configs (read back from each trial's final ``config.json``) one
after another in one fresh process with ``run_trial(cfg, local=True)``. It prints per run:

- wall: seconds of the whole process;
- loop: the summed train + eval loop time of every trial (``time/epoch_s + time/eval_s`` of every
  stored epoch), the work a sweep cannot avoid;
- efficiency = loop / (wall x concurrency);
- fixed cost per trial = (wall x concurrency - loop) / trials: what each trial pays beyond training;
- peak RSS of the driver and of each trial actor (sampled every 0.5 s with psutil), and for
  ``auto`` whether the actors' RSS grew from their first to their last trial.

    .venv/bin/python benchmarks/sweep_executors.py                                 # digits_cpu, 12 trials
    .venv/bin/python benchmarks/sweep_executors.py --space m_sharpness_study --executors auto --no-replay  # 96 trials
    .venv/bin/python benchmarks/sweep_executors.py --executors auto --num-samples 24  # RSS over 24 trials
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from pf_sweep.run_dir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
REPLAY = """
import json, sys, time
from pf_sweep import TrialConfig
from pf_sweep.trial import run_trial
configs = json.loads(sys.stdin.read())
t0 = time.perf_counter()
loop = 0.0
for c in configs:
    result = run_trial(TrialConfig.from_dict(c), local=True, storage_path=None)
    loop += float((result.history["time/epoch_s"] + result.history["time/eval_s"]).sum())
print(json.dumps({"wall": time.perf_counter() - t0, "loop": loop}))
"""


def trial_actor_processes() -> list[psutil.Process]:
    """This machine's Tune trial actors (function trainables), found by the process title Ray gives them."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "ray::ImplicitFunc" in cmd or "ray::_WrappedFunc" in cmd:
            found.append(proc)
    return found


class RssSampler(threading.Thread):
    """Peak RSS of a process tree: the driver, and each trial actor (``ray::ImplicitFunc``) over time."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.root = psutil.Process(pid)
        self.driver_peak = 0
        self.actor_series: dict[int, list[int]] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.driver_peak = max(self.driver_peak, self.root.memory_info().rss)
                for proc in trial_actor_processes():
                    self.actor_series.setdefault(proc.pid, []).append(proc.memory_info().rss)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
            self.stop.wait(0.5)


def run_cli(space: str, executor: str, storage: Path, extra: list[str]) -> dict:
    name = f"{space}-{executor}"
    cmd = [sys.executable, str(ROOT / "run_sweep.py"), "--space", space, "--storage", str(storage), "--name", name]
    cmd += ["--executor", executor, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    sampler = RssSampler(proc.pid)
    sampler.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - t0
    sampler.stop.set()
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    configs, loop = [], 0.0
    for run in sorted((storage / name / "runs").iterdir()):
        final = run / RunDirectory(run).checkpoints()[-1]
        configs.append(json.loads((final / "config.json").read_text()))
        loop += sum(r["time/epoch_s"] + r["time/eval_s"] for r in json.loads((final / "metrics.json").read_text()))
    actors = [s for s in sampler.actor_series.values() if len(s) > 4]
    return {
        "wall": wall,
        "loop": loop,
        "configs": configs,
        "driver_peak_mb": sampler.driver_peak / 2**20,
        "actor_peak_mb": max((max(s) for s in actors), default=0) / 2**20,
        # RSS of a long-lived (reused) actor: its last tenth of samples vs its third tenth (the first
        # ones are the process still importing torch and building its first trial).
        "actor_growth_mb": max((_tail(s) - _head(s) for s in actors), default=0.0) / 2**20,
        "actors": len(sampler.actor_series),
    }


def _head(series: list[int]) -> float:
    k = max(1, len(series) // 10)
    window = series[2 * k : 3 * k] or series[:k]
    return sorted(window)[len(window) // 2]


def _tail(series: list[int]) -> float:
    k = max(1, len(series) // 10)
    return sorted(series[-k:])[k // 2]


def replay(configs: list[dict]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", REPLAY], input=json.dumps(configs), capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "process_wall": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="digits_cpu")
    p.add_argument("--num-samples", type=int, default=12, help="trials (searched spaces; a grid runs every point)")
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--executors", default="auto,workers", help="comma-separated, in the order to run")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--storage", help="keep the sweeps here (default: a temporary directory)")
    p.add_argument("--no-replay", action="store_true", help="skip the in-process replay (the goals need only the sweeps)")
    args = p.parse_args()
    storage = Path(args.storage or tempfile.mkdtemp(prefix="pf-exec-bench-"))
    extra = ["--num-samples", str(args.num_samples), "--max-concurrent", str(args.max_concurrent)]
    for item in args.overrides:
        extra += ["--set", item]
    rows = {}
    for executor in args.executors.split(","):
        rows[executor] = run_cli(args.space, executor, storage, extra)
        print(f"ran {executor}: {rows[executor]['wall']:.1f} s", file=sys.stderr)
    first = next(iter(rows.values()))
    n, c = len(first["configs"]), args.max_concurrent
    seq = None if args.no_replay else replay(first["configs"])
    print(f"\n{args.space}: {n} trials, {c} at a time, on {os.cpu_count()} CPUs\n")
    header = f"{'run':<22}{'wall s':>9}{'loop s':>9}{'effic.':>8}{'fixed s/trial':>15}"
    header += f"{'driver MB':>11}{'actor MB':>10}{'actor +MB':>10}"
    print(header)
    print("-" * len(header))
    for executor, r in rows.items():
        eff = r["loop"] / (r["wall"] * c)
        fixed = (r["wall"] * c - r["loop"]) / n
        print(
            f"{'--executor ' + executor:<22}{r['wall']:>9.1f}{r['loop']:>9.1f}{eff:>8.2f}{fixed:>15.2f}"
            f"{r['driver_peak_mb']:>11.0f}{r['actor_peak_mb']:>10.0f}{r['actor_growth_mb']:>10.1f}"
        )
    if seq is not None:
        print(
            f"{'in-process, 1 at a time':<22}{seq['process_wall']:>9.1f}{seq['loop']:>9.1f}"
            f"{seq['loop'] / seq['process_wall']:>8.2f}"
        )
    print()
    if "auto" in rows and "workers" in rows:
        print(f"wall workers / auto: {rows['workers']['wall'] / rows['auto']['wall']:.2f}x")
    for executor, r in rows.items():
        print(f"wall {executor} / (loop / {c}): {r['wall'] / (r['loop'] / c):.2f}x")
    if seq is not None:
        print(f"in-process loop / sweep loop (first): {seq['loop'] / first['loop']:.2f}x (contention from running 2 at once)")
    print(f"sweeps kept in {storage}" if args.storage else "")


if __name__ == "__main__":
    main()
