"""Where a short sweep's CPU goes: the driver, Ray's own processes, the trial actors, and idle cores.

Runs the whole ``run_sweep.py`` CLI (as ``sweep_executors.py`` does) and samples the CPU time
(user + system) of every process in its tree with psutil, four times a second, naming each by its
role: the driver, each Ray daemon (GCS, raylet, dashboard, dashboard agent, runtime-env agent, log
monitor, autoscaler monitor), trial actors (``ray::ImplicitFunc``), and workers Ray started that
never became anything (``ray::IDLE``). A process's last sample is its total, so a process that lives
less than 0.25 s may be missed. Then it prints:

- the CPU the machine had (cores x wall), what each role used, and what stayed idle;
- the sweep's efficiency, loop / (wall x concurrency), with loop the summed train + eval time;
- two ceilings on that efficiency (the wall is at least the CPU used / cores): loop x cores / (all
  CPU used x concurrency), reached only if no core ever idled, and the same with the trial actors'
  CPU alone, reached only if, besides, the driver and Ray used no CPU at all.

    .venv/bin/python benchmarks/sweep_cpu_budget.py                       # digits_cpu, 12 trials, 2 at a time
    .venv/bin/python benchmarks/sweep_cpu_budget.py --num-samples 24 --rounds 3
    .venv/bin/python benchmarks/sweep_cpu_budget.py --num-samples 4 --executor workers   # worker groups
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from pf_sweep.run_dir import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
ROLES = [  # (role, a piece of the process's command line), first match wins
    ("trial actors", "ray::ImplicitFunc"),
    ("Train controllers", "ray::TrainController"),
    ("Train workers", "ray::RayTrainWorker"),
    ("idle Ray workers", "ray::IDLE"),
    ("dashboard agent", "ray::DashboardAgent"),
    ("dashboard agent", "dashboard/agent.py"),
    ("runtime-env agent", "ray::RuntimeEnvAgent"),
    ("runtime-env agent", "runtime_env/agent"),
    ("dashboard", "dashboard/dashboard.py"),
    ("log monitor", "log_monitor.py"),
    ("autoscaler monitor", "autoscaler/_private/monitor.py"),
    ("raylet", "ray/raylet/raylet"),
    ("gcs", "ray/gcs/gcs_server"),
]


def role_of(argv: list[str]) -> str:
    """By the program and its script only: the raylet's own arguments name the agents it starts."""
    program = " ".join(argv[:3])  # python [-u] script.py
    return next((role for role, piece in ROLES if piece in program), f"other: {program[:60]}")


def sample_tree(proc: subprocess.Popen, period_s: float = 0.25) -> dict[int, tuple[str, float]]:
    """{pid: (last role seen, last CPU seconds seen)} of ``proc`` and all its descendants, until it exits."""
    seen: dict[int, tuple[str, float]] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                with p.oneshot():
                    cpu = p.cpu_times()
                    argv = p.cmdline()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            role = "driver" if p.pid == proc.pid else role_of(argv) if argv else seen.get(p.pid, ("?", 0.0))[0]
            seen[p.pid] = (role, cpu.user + cpu.system)
        time.sleep(period_s)
    return seen


def one_sweep(space: str, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([str(ROOT / ".venv/bin/ray"), "stop", "--force"], capture_output=True)
        cmd = [sys.executable, str(ROOT / "run_sweep.py"), "--space", space, "--storage", tmp, "--name", "budget", *extra]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seen = sample_tree(proc)
        _, err = proc.communicate()
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"the sweep failed:\n{err[-3000:]}")
        loop = 0.0
        for run in (Path(tmp) / "budget" / "runs").iterdir():
            final = run / RunDirectory(run).checkpoints()[-1]
            loop += sum(r["time/epoch_s"] + r["time/eval_s"] for r in json.loads((final / "metrics.json").read_text()))
    roles: collections.Counter[str] = collections.Counter()
    for role, cpu in seen.values():
        roles[role] += cpu
    return {"wall": wall, "loop": loop, "roles": dict(roles)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="digits_cpu")
    p.add_argument("--num-samples", type=int, default=12)
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--executor", choices=["auto", "workers"], default="auto")
    p.add_argument("--rounds", type=int, default=1, help="sweeps to run; medians are printed")
    args = p.parse_args()
    cores = psutil.cpu_count()
    extra = ["--num-samples", str(args.num_samples), "--max-concurrent", str(args.max_concurrent), "--executor", args.executor]
    runs = [one_sweep(args.space, extra) for _ in range(args.rounds)]

    def med(get) -> float:
        return statistics.median(get(r) for r in runs)

    wall, loop = med(lambda r: r["wall"]), med(lambda r: r["loop"])
    names = sorted({k for r in runs for k in r["roles"]}, key=lambda k: -med(lambda r, k=k: r["roles"].get(k, 0.0)))
    used = med(lambda r: sum(r["roles"].values()))
    actors = med(lambda r: r["roles"].get("trial actors", 0.0))
    print(f"{args.space}, {args.num_samples} trials, {args.max_concurrent} at a time, --executor {args.executor}, {cores} cores")
    print(f"medians of {len(runs)} runs")
    efficiency = loop / (wall * args.max_concurrent)
    print(f"wall {wall:.1f} s, loop {loop:.1f} s, efficiency loop / (wall x {args.max_concurrent}) = {efficiency:.2f}")
    print(f"CPU the machine had (cores x wall): {cores * wall:.1f} s")
    for name in names:
        print(f"  {name:<22}{med(lambda r, n=name: r['roles'].get(n, 0.0)):>7.1f} s")
    print(f"  {'idle':<22}{cores * wall - used:>7.1f} s")
    # wall >= CPU used / cores, so efficiency <= loop x cores / (CPU used x concurrency).
    scale = cores / args.max_concurrent
    print(f"ceiling with no idle core: loop x cores / (all CPU used x concurrency) = {loop * scale / used:.2f}")
    print(f"ceiling if, besides, the driver and Ray used no CPU: with the trial actors' CPU = {loop * scale / actors:.2f}")


if __name__ == "__main__":
    main()
