"""Sweep efficiency: how much of a Ray Tune sweep's slot time its trials spend training.

Runs an N-trial ``digits_cpu`` sweep through ``pf_sweep.sweep.launch`` on a local Ray, then the very
same N trial configs (read back from each trial's final checkpoint, ``config.json``) one after
another in this process with ``run_trial(cfg, local=True)``. For both it prints the wall time, the
summed train-loop time of the trials (``time/epoch_s`` + ``time/eval_s`` of every stored epoch row)
and the efficiency = summed train-loop time / (wall x concurrency). Then, per trial, where the time
between Tune creating a trial and Tune seeing it complete goes, from driver-side timestamps taken by
a ``ray.tune.Callback`` (public API, passed to ``launch(callbacks=...)``):

- actor: trial first seen by the controller loop -> ``on_trial_start`` (trial actor process, imports);
- startup: ``on_trial_start`` -> first result, minus the first epoch's train + eval time
  (TorchTrainer controller, worker group, worker imports, data + model build, first report);
- reports: first -> last result, minus the train + eval time of those epochs (report barrier,
  checkpoint write and upload, the last epoch's extra evaluations);
- teardown: last result -> ``on_trial_complete`` (trainer shutdown, trial actor exit).

Startup and teardown are split further by Ray actor (trial actor, Train controller, Train worker)
with ``ray.timeline()`` task events. Also measured: ``ray.init``, Tune's start and stop around the
trials, idle slots, how many Train worker groups really ran at once (logical CPUs held, sampled with
``ray.available_resources()``), and the import time of torch / timm / ``pf_sweep.train`` / Ray Train
in a fresh interpreter (what every new trial actor and Train worker pays). Timings on a shared
2-core machine are indicative only.

    .venv/bin/python benchmarks/sweep_efficiency.py                              # 8 trials, 2 at a time
    .venv/bin/python benchmarks/sweep_efficiency.py --num-samples 2 --epochs 1   # quick check
    .venv/bin/python benchmarks/sweep_efficiency.py --repeats 3 --storage /tmp/eff  # medians of 3, kept
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray
from ray import tune

import pf_sweep.sweep as sweep_mod
import search_spaces
from pf_sweep.checkpoint import CONFIG_FILE, METRICS_FILE
from pf_sweep.config import TrialConfig
from pf_sweep.storage import StoragePath, is_uri

IMPORT_PROBE = """
import json, time
stamps = [time.perf_counter()]
import torch
stamps.append(time.perf_counter())
import timm
stamps.append(time.perf_counter())
import pf_sweep.train
stamps.append(time.perf_counter())
import ray.train.torch, ray.tune
stamps.append(time.perf_counter())
print(json.dumps([b - a for a, b in zip(stamps, stamps[1:])]))
"""
IMPORT_STEPS = ("torch", "timm", "pf_sweep.train (rest)", "ray.train.torch + ray.tune")


class TrialTimes(tune.Callback):
    """Driver-side wall-clock stamps of every trial's life (Tune calls these in the driver process)."""

    SAMPLE_EVERY_S = 0.5

    def __init__(self) -> None:
        self.seen: dict[str, float] = {}
        self.started: dict[str, float] = {}
        self.results: dict[str, list[float]] = {}
        self.completed: dict[str, float] = {}
        self.cpu_samples: list[tuple[float, float]] = []  # (time, logical CPUs held on the cluster)
        self.cluster_cpus = float("nan")

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        # Tune has no public "trial added" hook; the controller steps every <= 0.1 s plus its work.
        now = time.time()
        for trial in trials:
            self.seen.setdefault(trial.trial_id, now)
        if not self.cpu_samples or now - self.cpu_samples[-1][0] >= self.SAMPLE_EVERY_S:
            # Logical CPUs in use show how many Train worker groups really run at once.
            self.cluster_cpus = ray.cluster_resources().get("CPU", 0.0)
            held = self.cluster_cpus - ray.available_resources().get("CPU", 0.0)
            self.cpu_samples.append((now, held))

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        now = time.time()
        self.seen.setdefault(trial.trial_id, now)
        self.started[trial.trial_id] = now

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        self.results.setdefault(trial.trial_id, []).append(time.time())

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.completed[trial.trial_id] = time.time()


@dataclass
class TrialRun:
    """One sweep trial: its stored config and epoch rows, Tune's total time, driver stamps."""

    trial_id: str
    config: dict[str, Any]
    rows: list[dict[str, float]]
    time_total_s: float
    seen: float
    started: float
    results: list[float]
    completed: float
    phases: dict[str, float] = field(default_factory=dict)  # from ray.timeline(), when it could be paired
    local_wall: float = float("nan")  # the same config in-process (filled in later)
    local_loop: float = float("nan")

    @property
    def loop_s(self) -> float:
        return sum(_loop(row) for row in self.rows)

    def breakdown(self) -> dict[str, float]:
        """Seconds per phase; actor + startup + loop + reports + teardown == span by construction."""
        first, last = self.results[0], self.results[len(self.rows) - 1]
        return {
            "tune_total": self.time_total_s,
            "loop": self.loop_s,
            "tune_overhead": self.time_total_s - self.loop_s,
            "span": self.completed - self.seen,
            "actor": self.started - self.seen,
            "startup": first - self.started - _loop(self.rows[0]),
            "reports": last - first - sum(_loop(row) for row in self.rows[1:]),
            "teardown": self.completed - last,
            "fixed": self.completed - self.seen - self.loop_s,
            "local_wall": self.local_wall,
            "local_loop": self.local_loop,
            "local_fixed": self.local_wall - self.local_loop,
        }


@dataclass
class Round:
    """One sweep and its sequential in-process replay."""

    ray_init_s: float
    launch_start: float
    launch_end: float
    concurrency: int
    trials: list[TrialRun]
    cpu_samples: list[tuple[float, float]]
    cpus_per_trial: float
    cluster_cpus: float
    seq_wall: float = 0.0
    seq_loops: list[float] = field(default_factory=list)
    seq_trains: list[float] = field(default_factory=list)

    @property
    def sweep_wall(self) -> float:
        return self.ray_init_s + self.launch_end - self.launch_start

    def summary(self) -> dict[str, float]:
        c = self.concurrency
        wall, launch = self.sweep_wall, self.launch_end - self.launch_start
        loop = sum(t.loop_s for t in self.trials)
        train = sum(sum(float(r["time/epoch_s"]) for r in t.rows) for t in self.trials)
        spans = sum(t.completed - t.seen for t in self.trials)
        seq_loop = sum(self.seq_loops)
        groups = self.worker_groups()
        return {
            "ray_init": self.ray_init_s,
            "sweep_wall": wall,
            "sweep_launch": launch,
            "sweep_train": train,
            "sweep_loop": loop,
            "sweep_eff": loop / (wall * c),
            "sweep_eff_launch": loop / (launch * c),
            "seq_wall": self.seq_wall,
            "seq_train": sum(self.seq_trains),
            "seq_loop": seq_loop,
            "seq_eff": seq_loop / self.seq_wall,
            "slots": wall * c,
            "slot_init": self.ray_init_s * c,
            "slot_overhead": spans - loop,
            "slot_idle": launch * c - spans,
            "tune_start": min(t.seen for t in self.trials) - self.launch_start,
            "tune_stop": self.launch_end - max(t.completed for t in self.trials),
            "groups_mean": groups[0],
            "groups_full": groups[1],
            "cluster_cpus": self.cluster_cpus,
            "cpus_held_max": max((held for _, held in self.cpu_samples), default=float("nan")),
        }

    def worker_groups(self) -> tuple[float, float]:
        """(time-weighted mean of Train worker groups holding their CPUs, fraction of time all slots did).

        From the driver's samples of logical CPUs in use, over first trial created -> last trial done;
        a trial actor's token share (0.01 CPU) is rounded away.
        """
        begin, end = min(t.seen for t in self.trials), max(t.completed for t in self.trials)
        samples = [(t, held) for t, held in self.cpu_samples if begin <= t <= end]
        weighted = full = 0.0
        for (t, held), (t_next, _) in zip(samples, [*samples[1:], (end, 0.0)], strict=True):
            running = int((held + 1e-6) // self.cpus_per_trial)
            weighted += running * (t_next - t)
            full += (t_next - t) if running >= self.concurrency else 0.0
        span = max(end - samples[0][0], 1e-9) if samples else float("nan")
        return weighted / span, full / span


def _loop(row: dict[str, float]) -> float:
    """Train-loop seconds of one epoch row: training plus the per-epoch validation pass."""
    return float(row["time/epoch_s"]) + float(row.get("time/eval_s", 0.0))


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _checkpoint_dir(checkpoint_path: str, storage: str) -> StoragePath:
    """Tune's ``checkpoint_path`` metric drops a URI's scheme; put it back for remote storage."""
    if is_uri(storage) and not is_uri(checkpoint_path):
        return StoragePath.of(f"{storage.split('://', 1)[0]}://{checkpoint_path.lstrip('/')}")
    return StoragePath.of(checkpoint_path)


def _actors(events: list[dict], cls: str) -> list[dict[str, tuple[float, float]]]:
    """Every actor of class ``cls`` (one timeline ``tid`` each), in the order of their last event.

    Each is a dict: task name -> (start, end) of its first call, in seconds.
    """
    tasks: dict[str, dict[str, tuple[float, float]]] = {}
    ends: dict[str, float] = {}
    prefix = f"task::{cls}."
    for e in events:
        if not e.get("cat", "").startswith(prefix):
            continue
        start, end = e["ts"] / 1e6, (e["ts"] + e.get("dur", 0.0)) / 1e6
        actor = tasks.setdefault(e["tid"], {})
        name = e["cat"][len(prefix) :]
        if name not in actor or start < actor[name][0]:
            actor[name] = (start, end)
        ends[e["tid"]] = max(ends.get(e["tid"], end), end)
    return [tasks[tid] for tid in sorted(tasks, key=ends.__getitem__)]


def attach_phases(trials: list[TrialRun], events: list[dict]) -> None:
    """Split each trial's startup and teardown with ``ray.timeline()`` task events (a public API).

    Timeline events do not say which trial an actor served, so the trial actors (``ImplicitFunc``),
    Train controllers and Train workers are paired with trials by the order in which they finished,
    and the pairing is kept only if each trial's actors nest in time (trial actor, then controller
    run, then worker, all inside the trial). Actor and task names are Ray's: if they change, the
    phases are left out.
    """
    needed = {"ImplicitFunc": ("train",), "TrainController": ("__init__", "run"), "RayTrainWorker": ("__init__", "run_train_fn")}
    groups = [_actors(events, cls) for cls in needed]
    for group, names in zip(groups, needed.values(), strict=True):
        if len(group) != len(trials) or not all(name in actor for actor in group for name in names):
            return
    paired = list(zip(sorted(trials, key=lambda t: t.completed), *groups, strict=True))
    for trial, actor, controller, worker in paired:
        run = controller["run"]
        if not (trial.seen - 1 <= actor["train"][0] <= run[0] <= worker["__init__"][0] <= run[1] <= trial.completed):
            return
    for trial, actor, controller, worker in paired:
        first, last = trial.results[0], trial.results[len(trial.rows) - 1]
        trial.phases = {
            "trial fn: imports, TorchTrainer, controller actor": controller["__init__"][0] - actor["train"][0],
            "controller init (args, imports)": controller["run"][0] - controller["__init__"][0],
            "worker group: wait for CPUs, worker process": worker["__init__"][0] - controller["run"][0],
            "worker init: context, imports, process group": worker["run_train_fn"][0] - worker["__init__"][0],
            "train fn to 1st result, minus epoch 0's loop": first - worker["run_train_fn"][0] - _loop(trial.rows[0]),
            "teardown: last result -> controller done": controller["run"][1] - last,
            "teardown: controller done -> trial complete": trial.completed - controller["run"][1],
        }


def run_sweep(space: Any, settings: sweep_mod.SweepSettings, storage: str, name: str) -> Round:
    """Launch the sweep (timing ``ray.init`` apart) and read every trial's stored config and epochs."""
    times = TrialTimes()
    t0 = time.time()
    sweep_mod.ensure_sweep_ray()
    t1 = time.time()
    results = sweep_mod.launch(space, settings, storage_path=storage, name=name, callbacks=[times])
    t2 = time.time()
    events = ray.timeline()  # before shutdown: task events live in the running cluster
    ray.shutdown()
    if results.num_errors:
        raise RuntimeError(f"{results.num_errors} trial(s) failed: {results.errors}")
    trials = []
    for i in range(len(results)):
        metrics = results[i].metrics or {}
        trial_id = metrics["trial_id"]
        ckpt = _checkpoint_dir(metrics["checkpoint_path"], storage)
        rows = json.loads((ckpt / METRICS_FILE).read_text())
        stamps = times.results.get(trial_id, [])
        if len(stamps) < len(rows):
            raise RuntimeError(f"trial {trial_id}: {len(rows)} stored epochs but {len(stamps)} results seen by Tune")
        trials.append(
            TrialRun(
                trial_id=trial_id,
                config=json.loads((ckpt / CONFIG_FILE).read_text()),
                rows=rows,
                time_total_s=float(metrics["time_total_s"]),
                seen=times.seen[trial_id],
                started=times.started[trial_id],
                results=stamps,
                completed=times.completed[trial_id],
            )
        )
    trials.sort(key=lambda t: t.seen)
    if settings.workers_per_trial == 1:
        attach_phases(trials, events)
    per_trial = settings.workers_per_trial * settings.cpus_per_worker
    return Round(t1 - t0, t1, t2, settings.max_concurrent, trials, times.cpu_samples, per_trial, times.cluster_cpus)


def run_sequential(rnd: Round) -> None:
    """The sweep's exact trial configs, one after another in this process (no Ray)."""
    from pf_sweep import run_trial

    start = time.time()
    for trial in rnd.trials:
        t0 = time.time()
        result = run_trial(TrialConfig.from_dict(trial.config), local=True, storage_path=None)
        trial.local_wall = time.time() - t0
        rows = result.history.to_dict("records")
        trial.local_loop = sum(_loop(row) for row in rows)
        rnd.seq_loops.append(trial.local_loop)
        rnd.seq_trains.append(sum(float(row["time/epoch_s"]) for row in rows))
    rnd.seq_wall = time.time() - start


def fresh_imports(repeats: int) -> list[float]:
    """Median seconds of each step of ``IMPORT_PROBE`` in a fresh interpreter (what a new Ray process pays)."""
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], check=True, capture_output=True, text=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return [statistics.median(step) for step in zip(*runs, strict=True)]


def _label(config: dict[str, Any]) -> str:
    if config.get("method") == "sgd":
        return "sgd"
    m = config.get("sharpness_m") or config.get("batch_size")
    return f"{config.get('method')}/{config.get('perturbation')} rho={float(config.get('rho', 0)):.3g} m={m}"


def print_report(rounds: list[Round], imports: list[float], epochs: int) -> None:
    """Summary table (medians over rounds), slot accounting, per-trial breakdown (last round)."""
    s = {k: _median([r.summary()[k] for r in rounds]) for k in rounds[0].summary()}
    c, n = rounds[0].concurrency, len(rounds[0].trials)
    print()
    print(
        f"digits_cpu sweep: {n} trials x {epochs} epoch(s), {c} concurrent; medians of {len(rounds)} round(s); "
        f"cpus={os.cpu_count()}"
    )
    header = f"{'mode':<22}{'wall s':>9}{'wall-init s':>13}{'sum train s':>13}{'sum loop s':>12}{'conc':>6}{'efficiency':>12}"
    print(header)
    print("-" * len(header))
    print(
        f"{'ray tune sweep':<22}{s['sweep_wall']:>9.1f}{s['sweep_launch']:>13.1f}{s['sweep_train']:>13.1f}"
        f"{s['sweep_loop']:>12.1f}{c:>6d}{s['sweep_eff']:>12.1%}"
    )
    print(
        f"{'in-process sequential':<22}{s['seq_wall']:>9.1f}{s['seq_wall']:>13.1f}{s['seq_train']:>13.1f}"
        f"{s['seq_loop']:>12.1f}{1:>6d}{s['seq_eff']:>12.1%}"
    )
    print(
        f"  sweep wall / sequential wall: {s['sweep_wall'] / s['seq_wall']:.2f}x "
        f"(excl. ray.init {s['sweep_launch'] / s['seq_wall']:.2f}x; ideal with {c} slots: {1 / c:.2f}x)"
    )
    print(
        f"  efficiency sweep / sequential: {s['sweep_eff']:.1%} / {s['seq_eff']:.1%} "
        f"(sweep excl. ray.init {s['sweep_eff_launch']:.1%})"
    )
    print(f"  sum loop sweep / sequential: {s['sweep_loop'] / s['seq_loop']:.2f}x (contention on the loop itself)")
    print("  loop = time/epoch_s + time/eval_s over every epoch; efficiency = sum loop / (wall x concurrency);")
    print("  wall includes ray.init, wall-init is launch() alone; the sequential run pays no ray.init and no import.")

    print()
    print(f"Where the sweep's slot time goes (wall x concurrency = {s['slots']:.1f} slot-s)")
    parts = [
        ("ray.init", s["slot_init"]),
        ("trial train loops", s["sweep_loop"]),
        ("per-trial overhead", s["slot_overhead"]),
        ("idle slots", s["slot_idle"]),
    ]
    for label, value in parts:
        print(f"  {label:<20}{value:>9.1f} slot-s {value / s['slots']:>7.1%}")
    print(
        f"  Train worker groups running at once (logical CPUs held, sampled every {TrialTimes.SAMPLE_EVERY_S:g} s): "
        f"mean {s['groups_mean']:.2f} of {c}, all {c} slots busy {s['groups_full']:.0%} of the time, "
        f"peak CPUs held {s['cpus_held_max']:.2f} of {s['cluster_cpus']:g}"
    )
    print(
        f"  idle slots include Tune's start (launch -> first trial {s['tune_start']:.1f} s) and stop "
        f"(last trial -> launch returns {s['tune_stop']:.1f} s), gaps between trials and the tail."
    )

    print()
    print("Per trial (last round; seconds; median row over all rounds' trials)")
    cols = [
        ("tune_total", "tune tot"),
        ("loop", "loop"),
        ("tune_overhead", "tune ovh"),
        ("span", "span"),
        ("actor", "actor"),
        ("startup", "startup"),
        ("reports", "reports"),
        ("teardown", "teardown"),
        ("local_wall", "inproc"),
        ("local_loop", "inp loop"),
    ]
    header = f"{'trial':<13}{'config':<30}" + "".join(f"{title:>9}" for _, title in cols)
    print(header)
    print("-" * len(header))
    for trial in rounds[-1].trials:
        b = trial.breakdown()
        print(f"{trial.trial_id:<13}{_label(trial.config):<30}" + "".join(f"{b[k]:>9.2f}" for k, _ in cols))
    every = [t.breakdown() for r in rounds for t in r.trials]
    med = {k: _median([b[k] for b in every]) for k in every[0]}
    print(f"{'median':<43}" + "".join(f"{med[k]:>9.2f}" for k, _ in cols))
    print("  tune tot: Tune's time_total_s (actor's first train() -> last report); tune ovh = tune tot - loop;")
    print("  span: trial created -> complete, = actor + startup + loop + reports + teardown (driver clock);")
    print("  inproc / inp loop: the same config with run_trial(local=True): wall and loop time.")
    if epochs == 1:
        print("  with one epoch the last epoch's extra evaluations (train subset) fall in startup, not reports.")

    print()
    print("Where the fixed per-trial overhead goes (medians over trials)")
    total_import = sum(imports)
    steps = ", ".join(f"{name} {secs:.2f}" for name, secs in zip(IMPORT_STEPS, imports, strict=True))
    lines = [
        ("span - loop (all fixed cost of a trial)", med["fixed"], f"Tune's time_total_s - loop: {med['tune_overhead']:.2f} s"),
        ("actor: trial actor start, unpickle", med["actor"], ""),
        ("startup: trainer, workers, setup, 1st report", med["startup"], ""),
        ("  for scale: fresh-process imports", total_import, f"{steps}; per trial actor and per Train worker"),
        ("  for scale: in-process fixed cost", med["local_fixed"], "inproc - inp loop: data + model setup, final evals"),
        ("reports: barrier, checkpoints, final evals", med["reports"], f"over {epochs - 1} report(s) after the first"),
        ("teardown: trainer shutdown, actor exit", med["teardown"], ""),
    ]
    for label, secs, note in lines:
        print(f"  {label:<46}{secs:>7.2f} s" + (f"  ({note})" if note else ""))

    phased = [t.phases for r in rounds for t in r.trials if t.phases]
    print()
    if not phased:
        print("Startup and teardown by Ray actor (ray.timeline): not available (events missing or could not be paired)")
        return
    print(f"Startup and teardown by Ray actor (ray.timeline; medians over {len(phased)} paired trial(s))")
    for name in phased[0]:
        values = [p[name] for p in phased]
        print(f"  {name:<52}{_median(values):>7.2f} s  (min {min(values):.2f}, max {max(values):.2f})")
    print("  worker group waits when no slot has CPUs free: each trial actor holds 0.01 CPU besides its workers.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=8, help="trials per sweep")
    parser.add_argument("--max-concurrent", type=int, default=2, help="trials at once (capped by CPUs like run_sweep.py)")
    parser.add_argument("--epochs", type=int, help="epochs per trial (default: the space's)")
    parser.add_argument("--storage", help="where sweeps are stored (default: a temporary directory, removed after)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of sweep + sequential replay (medians)")
    parser.add_argument("--import-repeats", type=int, default=3, help="fresh-interpreter import timings (median)")
    args = parser.parse_args()

    space = search_spaces.get("digits_cpu")
    per_trial = space.workers_per_trial * space.cpus_per_worker
    concurrency = max(1, min(args.max_concurrent, int((os.cpu_count() or 1) // per_trial)))
    if concurrency != args.max_concurrent:
        print(f"--max-concurrent {args.max_concurrent} capped to {concurrency}: a trial needs {per_trial:g} CPUs")
    settings = sweep_mod.SweepSettings(
        num_samples=args.num_samples,
        max_concurrent=concurrency,
        seed=args.seed,
        workers_per_trial=space.workers_per_trial,
        cpus_per_worker=space.cpus_per_worker,
        overrides={"epochs": args.epochs} if args.epochs is not None else None,
    )
    settings.validate()
    epochs = args.epochs if args.epochs is not None else int(space.base.get("epochs", TrialConfig().epochs))

    imports = fresh_imports(args.import_repeats)  # before Ray starts, so nothing else competes
    import pf_sweep.train  # noqa: F401  # the sequential replay should not pay for the first import

    rounds = []
    with contextlib.ExitStack() as stack:
        storage = args.storage or stack.enter_context(tempfile.TemporaryDirectory(prefix="pf-sweep-eff-"))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for rep in range(args.repeats):
            print(f"[round {rep + 1}/{args.repeats}] sweep of {args.num_samples} trials ...", flush=True)
            rnd = run_sweep(space, settings, storage, f"sweep-eff-{stamp}-{rep}")
            print(f"[round {rep + 1}/{args.repeats}] the same {len(rnd.trials)} configs in-process ...", flush=True)
            run_sequential(rnd)
            rounds.append(rnd)
    print_report(rounds, imports, epochs)


if __name__ == "__main__":
    main()
