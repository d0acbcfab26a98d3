"""Fixed cost of a Ray Train trial vs the same trial in-process.

Runs the same small ``digits`` trial (global batch 64) three ways through ``run_trial``:
in-process (``local=True``), Ray Train with 1 worker, Ray Train with 2 workers (batch 32 each).
Report timestamps come from ``LocalSession.report`` (in-process) and from a ``ray.train.UserCallback``
(Ray; it runs in the Train controller process, so it appends timestamps to a file).

    .venv/bin/python benchmarks/trial_overhead.py [--repeats 1] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray.train

import pf_sweep.trial as trial_mod
from pf_sweep.config import TrialConfig
from pf_sweep.session import LocalSession


class ReportTimes(ray.train.UserCallback):
    """Appends the wall-clock time of every report to ``path`` (runs in the controller process)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def after_report(self, run_context, metrics, checkpoint) -> None:
        with open(self.path, "a") as f:
            f.write(f"{time.time()!r}\n")


def _install_hooks(state: dict) -> None:
    """Route report timestamps into ``state["stamps"]`` (local) or ``state["stamp_file"]`` (Ray)."""
    original_build = trial_mod.build_trainer
    original_report = LocalSession.report

    def build_trainer(cfg, *, storage_path, name, callbacks=()):
        return original_build(cfg, storage_path=storage_path, name=name, callbacks=[*callbacks, ReportTimes(state["stamp_file"])])

    def report(self, metrics, write_checkpoint):
        state["stamps"].append(time.time())
        return original_report(self, metrics, write_checkpoint)

    trial_mod.build_trainer = build_trainer
    LocalSession.report = report


def _measure(mode: str, cfg: TrialConfig, state: dict, workdir: Path) -> dict[str, float]:
    state["stamps"] = []
    state["stamp_file"] = str(workdir / f"stamps-{mode}-{time.time_ns()}.txt")
    storage = tempfile.mkdtemp(prefix=f"storage-{mode}-", dir=workdir)  # fresh: a reused (storage, name) would resume
    start = time.time()
    if mode == "local":
        result = trial_mod.run_trial(cfg, local=True, storage_path=None)
    else:
        result = trial_mod.run_trial(cfg, storage_path=storage)
    wall = time.time() - start
    stamps = state["stamps"]
    if mode != "local":
        stamps = [float(line) for line in Path(state["stamp_file"]).read_text().split()]
    epoch_s = [float(x) for x in result.history["time/epoch_s"]]
    if len(stamps) != cfg.epochs:
        raise RuntimeError(f"{mode}: expected {cfg.epochs} report timestamps, got {len(stamps)}")
    first = stamps[0] - start
    per_report = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else float("nan")
    return {
        "wall": wall,
        "first": first,
        "per_report": per_report,
        "epoch0": epoch_s[0],
        "epoch_mean": statistics.mean(epoch_s),
        "train": sum(epoch_s),
        "startup": first - epoch_s[0],  # everything before the first epoch's training + its eval/report
        "teardown": wall - (stamps[-1] - start),
        "fixed": wall - sum(epoch_s),  # startup + evals + reports + teardown
        "val_top1": float(result.metrics.get("val/top1", float("nan"))),
    }


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    base = TrialConfig(epochs=args.epochs, lr=0.05)
    modes = {
        "in-process": ("local", base.replace(batch_size=64, num_workers=1)),
        "ray 1 worker": ("ray1", base.replace(batch_size=64, num_workers=1)),
        "ray 2 workers": ("ray2", base.replace(batch_size=32, num_workers=2)),
    }
    for _, cfg in modes.values():
        assert cfg.global_batch_size == 64

    import pf_sweep.train  # noqa: F401  # import torch & the loop up front: the in-process run should not pay for it

    state: dict = {}
    _install_hooks(state)
    t0 = time.time()
    trial_mod.ensure_ray()
    ray_init_s = time.time() - t0

    results: dict[str, list[dict[str, float]]] = {label: [] for label in modes}
    with tempfile.TemporaryDirectory(prefix="pf-trial-overhead-") as tmp:
        for rep in range(args.repeats):
            for label, (mode, cfg) in modes.items():
                print(f"[repeat {rep + 1}/{args.repeats}] {label} ...", flush=True)
                results[label].append(_measure(mode, cfg, state, Path(tmp)))
    import ray

    ray.shutdown()

    med = {label: _median(runs) for label, runs in results.items()}
    local_wall = med["in-process"]["wall"]
    print()
    print(f"digits, {args.epochs} epochs, global batch 64, lr 0.05; medians of {args.repeats} repeat(s); cpus={os.cpu_count()}")
    header = (
        f"{'mode':<15}{'wall s':>9}{'1st report s':>14}{'per report s':>14}{'epoch s':>9}"
        f"{'fixed s':>9}{'overhead x':>12}{'val/top1':>10}"
    )
    print(header)
    print("-" * len(header))
    for label, m in med.items():
        print(
            f"{label:<15}{m['wall']:>9.2f}{m['first']:>14.2f}{m['per_report']:>14.2f}{m['epoch_mean']:>9.2f}"
            f"{m['fixed']:>9.2f}{m['wall'] / local_wall:>12.2f}{m['val_top1']:>10.2f}"
        )
    print("  1st report: run_trial call -> first report; per report: mean gap between reports (an epoch + eval + report);")
    print("  epoch: mean time/epoch_s (training only); fixed: wall - sum(epoch_s); overhead x: wall / in-process wall.")
    print()
    print("Where the fixed cost goes")
    print(f"  ray.init (once per driver, not in the rows above): {ray_init_s:6.2f} s")
    local = med["in-process"]
    for label, m in med.items():
        extra = m["startup"] - local["startup"]
        print(
            f"  {label:<15} startup before 1st epoch {m['startup']:6.2f} s (vs in-process {extra:+6.2f} s), "
            f"per-report excess {m['per_report'] - m['epoch_mean'] - (local['per_report'] - local['epoch_mean']):+6.2f} s, "
            f"teardown after last report {m['teardown']:6.2f} s"
        )
    print("  startup = time to 1st report - 1st epoch's train time (so it includes one eval + report);")
    print("  per-report excess = (gap between reports - epoch train time), relative to in-process.")


if __name__ == "__main__":
    main()
