"""Where the train loop reports to: Ray Train on workers, or a plain in-process session.

The loop only sees this small interface, which is what lets ``run_trial(local=True)`` run the very
same ``train_loop`` as a Ray Train worker.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

CHECKPOINT_PREFIX = "checkpoint_"


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
        self.device = torch.device(device)
        self.history: list[dict[str, float]] = []
        self.checkpoint: str | None = self.latest_checkpoint()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def latest_checkpoint(self) -> str | None:
        if self.directory is None or not self.directory.exists():
            return None
        found = sorted(p for p in self.directory.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.pt").exists())
        return str(found[-1]) if found else None

    def report(self, metrics: dict[str, float], write_checkpoint: Callable[[Path], None] | None) -> None:
        self.history.append(dict(metrics))
        if write_checkpoint is not None and self.directory is not None:
            target = self.directory / f"{CHECKPOINT_PREFIX}{int(metrics['epoch']):06d}"
            write_checkpoint(target)
            self.checkpoint = str(target)


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
            self._train.report(metrics, checkpoint=Checkpoint.from_directory(tmp), checkpoint_dir_name=_dir_name(metrics))


def _dir_name(metrics: dict[str, Any]) -> str:
    return f"{CHECKPOINT_PREFIX}{int(metrics['epoch']):06d}"
