"""Cost of the example-forgetting recorder (``TrialConfig(record_examples=True)``) in a training epoch.

Two measurements, both printed as medians:

1. Whole trials, in-process (``pf_sweep.train.run_local``), recorder off and on, interleaved
   round-robin (alternating which goes first) so machine noise hits both alike; the training time of every epoch but the first
   (warm-up excluded), as wall time (``time/epoch_s``) and as this process's CPU time (the loop's
   ``_train_epoch`` timed with ``time.process_time``: far less sensitive to other processes on a
   shared machine). Ratio on / off: the goal is below 1.05.
2. The recorder alone, on the same train loader: ``start_epoch`` (the sampler's order), one
   ``record`` per batch, ``end_epoch`` (the host copy), with no training in between. This isolates
   the recorder's own cost from the noise of (1); printed as a fraction of the median epoch.

The default trial is the smallest the project ships (digits, 8x8, ``pf_mlp``), the worst case for a
fixed per-batch cost; ``--model pf_cnn_small`` (the default model) or ``--dataset synthetic`` are
heavier epochs. When the recorder is off the loop only tests ``recorder is not None``.

    .venv/bin/python benchmarks/example_recorder.py                        # about a minute on 2 cores
    .venv/bin/python benchmarks/example_recorder.py --method sgd --repeats 3
    .venv/bin/python benchmarks/example_recorder.py --dataset synthetic --model pf_cnn_small
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import pf_sweep.train as train_mod
from pf_sweep.config import TrialConfig
from pf_sweep.forgetting import ExampleRecorder
from pf_sweep.session import LocalSession
from pf_sweep.train import build_data, run_local

GOAL = 1.05


_CPU_TIMES: list[float] = []


def _timed_train_epoch(*args, **kwargs):
    start = time.process_time()
    try:
        return _TRAIN_EPOCH(*args, **kwargs)
    finally:
        _CPU_TIMES.append(time.process_time() - start)


_TRAIN_EPOCH = train_mod._train_epoch
train_mod._train_epoch = _timed_train_epoch  # run() looks it up at call time


def epoch_times(cfg: TrialConfig) -> tuple[list[float], list[float]]:
    """(wall, CPU) training seconds of each epoch after the first."""
    _CPU_TIMES.clear()
    history = run_local(cfg, None).history
    return [row["time/epoch_s"] for row in history[1:]], _CPU_TIMES[1:]


def recorder_alone(cfg: TrialConfig, epochs: int) -> float:
    """Median seconds per epoch of the recorder's own work over this config's train loader."""
    data = build_data(cfg, LocalSession())
    n_batches = len(data.train)
    gen = torch.Generator().manual_seed(0)
    hits = [torch.rand(cfg.batch_size, generator=gen) < 0.8 for _ in range(n_batches)]
    labels = [torch.randint(0, 10, (cfg.batch_size,), generator=gen) for _ in range(n_batches)]
    recorder = ExampleRecorder(data.train_sampler.size, has_perturbed=cfg.uses_sam)
    times = []
    for epoch in range(epochs):
        data.train_sampler.set_epoch(epoch)
        start = time.perf_counter()
        recorder.start_epoch(epoch, data.train_sampler.indices())
        for i in range(n_batches):
            recorder.record(i * cfg.batch_size, labels[i], hits[i], hits[i] if cfg.uses_sam else None)
        recorder.end_epoch()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--model", default="pf_mlp")
    parser.add_argument("--method", default="sam")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=4, help="per trial; the first is warm-up")
    parser.add_argument("--repeats", type=int, default=5, help="trials per mode, interleaved")
    args = parser.parse_args()

    base = TrialConfig(
        dataset=args.dataset, model=args.model, method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=0.05
    )
    wall: dict[bool, list[float]] = {False: [], True: []}
    cpu: dict[bool, list[float]] = {False: [], True: []}
    for repeat in range(args.repeats):
        for on in (False, True) if repeat % 2 == 0 else (True, False):  # alternate which goes first
            w, c = epoch_times(base.replace(record_examples=on))
            wall[on] += w
            cpu[on] += c
    med = {name: {on: statistics.median(t[on]) for on in (False, True)} for name, t in (("wall", wall), ("cpu", cpu))}
    alone = recorder_alone(base, epochs=max(5, args.epochs))

    print(f"{args.dataset} / {args.model} / {args.method}, batch {args.batch_size}, {torch.get_num_threads()} thread(s)")
    print(f"{'recorder':<10} {'epochs':>6} {'median wall s':>14} {'median CPU s':>13}")
    for on in (False, True):
        print(f"{'on' if on else 'off':<10} {len(wall[on]):>6} {med['wall'][on]:>14.4f} {med['cpu'][on]:>13.4f}")
    for name in ("wall", "cpu"):
        ratio = med[name][True] / med[name][False]
        verdict = "OK" if ratio < GOAL else "ABOVE GOAL"
        print(f"ratio on/off, median {name} epoch: {ratio:.3f}  (goal < {GOAL})  {verdict}")
    share = 100 * alone / med["wall"][False]
    print(f"recorder alone: {alone * 1e3:.2f} ms per epoch = {share:.2f}% of a median (wall) epoch")


if __name__ == "__main__":
    main()
