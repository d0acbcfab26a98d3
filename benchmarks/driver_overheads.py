"""What a sweep's driver pays around its trials, with and without two of its fixes, side by side.

1. Stopping a local Ray: ``ray.init`` then ``ray.shutdown`` in a fresh interpreter, with and without
   first killing the local autoscaler monitor (``pf_sweep.trial._kill_local_autoscaler_monitor``,
   which pf-sweep's exit handler runs). Ray 2.60 stops the monitor after the GCS; its SIGTERM
   handler then waits on the dead GCS until Ray kills it, a second later.
2. Tune's default loggers: the 12-trial ``digits_cpu`` sweep (whole ``run_sweep.py`` process) with
   ``--log tensorboard``, which is what every sweep ran before pf-sweep turned Tune's defaults off
   (Tune's TensorBoard logger imports torch into the driver and writes event files per trial), and
   without it. Wall, summed loop, efficiency, fixed cost per trial, driver peak RSS.

Rounds alternate the two variants; medians over rounds.

    .venv/bin/python benchmarks/driver_overheads.py                 # 5 Ray starts each, 2 sweeps each
    .venv/bin/python benchmarks/driver_overheads.py --sweep-rounds 0  # the Ray stop only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sweep_executors import ROOT, run_cli

START_STOP = """
import json, logging, os, sys, time
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
t0 = time.perf_counter()
import ray
from pf_sweep.trial import _kill_local_autoscaler_monitor
ray.init(address="local", num_cpus=3, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
t1 = time.perf_counter()
if sys.argv[1] == "kill":
    _kill_local_autoscaler_monitor()
ray.shutdown()
print(json.dumps({"init": t1 - t0, "shutdown": time.perf_counter() - t1}))
"""


def start_stop(variant: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", START_STOP, variant], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def sweep_row(r: dict, trials: int, concurrency: int) -> dict:
    return {
        "wall": r["wall"],
        "loop": r["loop"],
        "efficiency": r["loop"] / (r["wall"] * concurrency),
        "fixed": (r["wall"] * concurrency - r["loop"]) / trials,
        "driver_mb": r["driver_peak_mb"],
        "events": r["event_files"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ray-rounds", type=int, default=5, help="local Ray starts and stops per variant")
    p.add_argument("--sweep-rounds", type=int, default=2, help="sweeps per variant")
    p.add_argument("--num-samples", type=int, default=12)
    p.add_argument("--max-concurrent", type=int, default=2)
    args = p.parse_args()

    stops: dict[str, list[dict]] = {"ray's order": [], "monitor killed first": []}
    for _ in range(args.ray_rounds):
        stops["ray's order"].append(start_stop("plain"))
        stops["monitor killed first"].append(start_stop("kill"))
    print(f"\nLocal Ray start and stop, fresh interpreter, medians of {args.ray_rounds}")
    print(f"{'variant':<24}{'import + init s':>16}{'shutdown s':>12}")
    for variant, rows in stops.items():
        init = statistics.median(r["init"] for r in rows)
        print(f"{variant:<24}{init:>16.2f}{statistics.median(r['shutdown'] for r in rows):>12.2f}")
    plain, killed = (statistics.median(r["shutdown"] for r in rows) for rows in stops.values())
    print(f"shutdown, Ray's order / monitor killed first: {plain / killed:.2f}x ({plain - killed:.2f} s saved per local Ray)")

    if args.sweep_rounds <= 0:
        return
    storage = Path(tempfile.mkdtemp(prefix="pf-driver-bench-"))
    extra = ["--num-samples", str(args.num_samples), "--max-concurrent", str(args.max_concurrent)]
    variants = {"Tune's default loggers": ["--log", "tensorboard"], "pf-sweep's loggers": []}
    sweeps: dict[str, list[dict]] = {v: [] for v in variants}
    for k in range(args.sweep_rounds):
        for variant, flags in variants.items():
            where = storage / f"{len(sweeps[variant])}-{'tb' if flags else 'plain'}"
            r = run_cli("digits_cpu", "auto", where, [*extra, *flags])
            r["event_files"] = len(list(where.glob("*/trial-*/events.out.tfevents.*")))
            sweeps[variant].append(sweep_row(r, args.num_samples, args.max_concurrent))
            print(f"round {k + 1}, {variant}: {r['wall']:.1f} s", file=sys.stderr)
    rounds = f"{args.max_concurrent} at a time, medians of {args.sweep_rounds}"
    print(f"\n{args.num_samples}-trial digits_cpu sweep, --executor auto, {rounds}")
    print(f"{'variant':<24}{'wall s':>8}{'loop s':>8}{'effic.':>8}{'fixed s/trial':>15}{'driver MB':>11}{'event files':>13}")
    med = {}
    for variant, rows in sweeps.items():
        med[variant] = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        m = med[variant]
        print(
            f"{variant:<24}{m['wall']:>8.1f}{m['loop']:>8.1f}{m['efficiency']:>8.2f}{m['fixed']:>15.2f}"
            f"{m['driver_mb']:>11.0f}{m['events']:>13.0f}"
        )
    tb, ours = med.values()
    print(f"wall, Tune's defaults / pf-sweep's: {tb['wall'] / ours['wall']:.2f}x", end="; ")
    print(f"driver RSS {tb['driver_mb'] / ours['driver_mb']:.2f}x")


if __name__ == "__main__":
    main()
