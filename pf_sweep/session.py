"""Where the train loop reports to: Ray Train on workers, Ray Tune inside a trial actor, or a plain
in-process session.

The loop only sees this small interface, which is what lets ``run_trial(local=True)`` and a sweep's
one-worker trials run the very same ``train_loop`` as a Ray Train worker.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from pf_sweep.run_dir import CHECKPOINT_PATH_KEY, CHECKPOINT_PREFIX, RunDirectory, checkpoint_name

__all__ = ["CHECKPOINT_PREFIX", "LocalSession", "RaySession", "Session", "TuneSession"]


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def latest_checkpoint(self) -> str | None: ...

    def report(self, metrics: dict[str, float], write_checkpoint: Callable[[Path], None] | None) -> None: ...


class LocalSession:
    """One process, no Ray. Checkpoints go to ``directory/checkpoint_<epoch>`` when a directory is given."""

    rank = 0
    world_size = 1

    def __init__(self, directory: str | Path | None = None, device: str = "cpu") -> None:
        self.directory = Path(directory) if directory is not None else None
        self._run_dir = RunDirectory(self.directory) if self.directory is not None else None
        self.device = torch.device(device)
        self.history: list[dict[str, float]] = []
        self.checkpoint: str | None = self.latest_checkpoint()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> str | None:
        return self._run_dir.latest() if self._run_dir is not None else None

    def report(self, metrics: dict[str, float], write_checkpoint: Callable[[Path], None] | None) -> None:
        self.history.append(dict(metrics))
        if write_checkpoint is not None and self._run_dir is not None:
            self.checkpoint = self._run_dir.write(int(metrics["epoch"]), write_checkpoint)


class TuneSession:
    """A one-worker trial inside its Ray Tune trial actor: no worker group, reports go straight to Tune.

    Checkpoints go to the trial's run directory (``runs/train-<trial id>/checkpoint_<epoch>``, the
    same place and names a worker group's Ray Train run uses), the two newest are kept, and each
    report carries ``checkpoint_path`` as the worker-group path does. A retry or a resumed sweep
    finds the newest complete checkpoint there. ``reports`` lists what this session sent, so the
    caller can tell a run that resumed after its last epoch (and reported nothing) from one that ran.
    """

    rank = 0
    world_size = 1

    def __init__(self, run_dir: RunDirectory, device: str = "cpu", keep: int = 2) -> None:
        self.run_dir, self.keep = run_dir, keep
        self.device = torch.device(device)
        self.reports: list[dict[str, Any]] = []

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> str | None:
        return self.run_dir.latest()

    def report(self, metrics: dict[str, float], write_checkpoint: Callable[[Path], None] | None) -> None:
        import ray.tune

        out: dict[str, Any] = dict(metrics)
        if write_checkpoint is not None:
            out[CHECKPOINT_PATH_KEY] = self.run_dir.write(int(metrics["epoch"]), write_checkpoint)
            self.run_dir.prune(self.keep)
        self.reports.append(out)
        ray.tune.report(out)


class RaySession:
    """Inside a Ray Train worker: rank and device from Train's context, reports through ``ray.train.report``."""

    def __init__(self) -> None:
        import ray.train
        import ray.train.torch

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def latest_checkpoint(self) -> str | None:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        # Local storage: the directory itself; remote storage: a local copy that outlives this call.
        return checkpoint.to_directory() if not Path(checkpoint.path).is_dir() else checkpoint.path

    def report(self, metrics: dict[str, float], write_checkpoint: Callable[[Path], None] | None) -> None:
        from ray.train import Checkpoint

        if write_checkpoint is None or self.rank != 0:
            self._train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="pf-ckpt-") as tmp:
            write_checkpoint(Path(tmp))
            name = checkpoint_name(int(metrics["epoch"]))
            self._train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=name)
