"""Two per-trial costs of the built-in digits, before and after, side by side in one run.

1. Seeding each augmented example. ``TransformedSplit`` seeds the global CPU RNGs per example (so
   each image depends only on (seed, epoch, index)). It did so with ``torch.manual_seed``, which
   also queues a reseed of every CUDA device and records a Python stack trace each call while CUDA
   is not initialized; it now seeds ``torch.default_generator`` alone. Rows: one training epoch of
   digits (1,437 images, the digits_cpu transforms, batch 64) through the current loader, and the
   same with the old seeding patched in; epochs interleaved round-robin, medians.
2. Loading digits in a fresh process (what each trial actor pays once): ``sklearn.datasets.load_digits``
   (importing scikit-learn) against reading scikit-learn's bundled CSV directly, as pf-sweep now
   does; each in a fresh interpreter that has already imported torch, medians.

    .venv/bin/python benchmarks/digits_overheads.py               # about 30 s on 2 cores
    .venv/bin/python benchmarks/digits_overheads.py --rounds 9
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator

import torch

from pf_sweep.config import TrialConfig
from pf_sweep.data import ShardedSampler, TransformedSplit, build_loader, build_transform, get_source
from pf_sweep.data import loader as loader_module

LOAD_PROBE = {
    "load_digits (imports scikit-learn)": "from sklearn.datasets import load_digits; load_digits()",
    "bundled CSV read directly (now)": "from pf_sweep.data.builtin import _digits_arrays; _digits_arrays()",
}


@contextlib.contextmanager
def _old_seeded_rngs(seed: int) -> Iterator[None]:
    """The seeding as it was: ``torch.manual_seed`` (all devices) instead of the CPU generator alone."""
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.set_rng_state(torch_state)


def epoch_seconds(dataset: TransformedSplit, sampler: ShardedSampler, epoch: int) -> float:
    sampler.set_epoch(epoch)
    start = time.perf_counter()
    for _ in build_loader(dataset, sampler, 64):
        pass
    return time.perf_counter() - start


def seeding_rows(rounds: int) -> dict[str, list[float]]:
    cfg = TrialConfig.from_dict({"dataset": "digits", "model": "pf_cnn_small", "batch_size": 64})
    source = get_source("digits")
    split = source.split("train", None)
    dataset = TransformedSplit(split, build_transform(cfg, source.info(None), training=True), seed=0)
    sampler = ShardedSampler(len(split), shuffle=True, batch_multiple=64, with_epoch=True)
    current = loader_module._seeded_rngs
    rows: dict[str, list[float]] = {"torch.manual_seed (before)": [], "torch.default_generator (now)": []}
    for epoch in range(rounds + 1):  # round 0 warms both up and is dropped
        for name, seeding in (("torch.manual_seed (before)", _old_seeded_rngs), ("torch.default_generator (now)", current)):
            loader_module._seeded_rngs = seeding
            try:
                seconds = epoch_seconds(dataset, sampler, epoch)
            finally:
                loader_module._seeded_rngs = current
            if epoch:
                rows[name].append(seconds)
    return rows


def load_rows(rounds: int) -> dict[str, list[float]]:
    rows: dict[str, list[float]] = {name: [] for name in LOAD_PROBE}
    for _ in range(rounds):
        for name, code in LOAD_PROBE.items():
            probe = f"import json, time, torch\nt = time.perf_counter()\n{code}\nprint(json.dumps(time.perf_counter() - t))"
            out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
            rows[name].append(json.loads(out))
    return rows


def print_rows(title: str, rows: dict[str, list[float]], unit: str) -> None:
    print(f"\n{title}")
    medians = {name: statistics.median(values) for name, values in rows.items()}
    before, now = medians.values()
    for name, value in medians.items():
        print(f"  {name:38s} {value * 1000:8.1f} ms{unit}  (n={len(rows[name])})")
    print(f"  ratio before / now: {before / now:.2f}x, saved {1000 * (before - now):.0f} ms{unit}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed epochs / fresh processes per row (default 5)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print_rows("One digits training epoch (1,437 augmented images, batch 64, 1 thread)", seeding_rows(args.rounds), " per epoch")
    print_rows("Loading digits in a fresh process (torch already imported)", load_rows(args.rounds), " per process")


if __name__ == "__main__":
    main()
