"""Per-worker data loading: sharded samplers and augmentation seeded by (seed, epoch, index).

Each Ray Train worker builds its own loader over its own shard, so no data moves between workers.
The order of a shard depends only on (seed, epoch), and each augmented image only on
(seed, epoch, index): a rerun, a resumed run, or a run with a different number of DataLoader
processes sees exactly the same batches.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ShardedSampler(Sampler):
    """Indices of one rank's shard of a split, for one epoch.

    Training (``shuffle=True``, ``batch_multiple=B``): a permutation seeded by (seed, epoch), cut to
    the largest multiple of ``num_replicas * B`` so every rank runs the same number of full batches
    (a rank that ran one more step than another would hang the collectives); the dropped tail
    (fewer than ``num_replicas * B`` examples) changes every epoch. Evaluation (``shuffle=False``,
    no multiple): rank r takes indices r, r + W, ...: every example exactly once across ranks.
    Yields ``(index, epoch)`` when ``with_epoch`` so the dataset can seed augmentation.
    """

    def __init__(
        self,
        size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = False,
        seed: int = 0,
        batch_multiple: int | None = None,
        with_epoch: bool = False,
    ) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"Invalid rank {rank} for {num_replicas} replicas")
        self.size, self.num_replicas, self.rank = size, num_replicas, rank
        self.shuffle, self.seed, self.batch_multiple, self.with_epoch = shuffle, seed, batch_multiple, with_epoch
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.batch_multiple:
            per_rank = self.size // (self.num_replicas * self.batch_multiple) * self.batch_multiple
            order = order[: per_rank * self.num_replicas]
        return order[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[Any]:
        idx = self.indices()
        return iter([(i, self.epoch) for i in idx] if self.with_epoch else idx)

    def __len__(self) -> int:
        return len(self.indices())


@contextlib.contextmanager
def _seeded_rngs(seed: int) -> Iterator[None]:
    """Seed Python's and torch's global CPU RNGs (which timm/torchvision transforms draw from), then restore.

    ``torch.default_generator``, not ``torch.manual_seed``: that one also reseeds every CUDA device
    (which ``set_rng_state`` would not restore, so on a GPU the training's CUDA stream would be
    reseeded by every example), and records a stack trace per call while CUDA is not initialized.
    """
    py_state, torch_state = random.getstate(), torch.get_rng_state()
    random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.set_rng_state(torch_state)


class TransformedSplit(Dataset):
    """A split with its transform; keys ``(index, epoch)`` get augmentation seeded by (seed, epoch, index)."""

    def __init__(self, split: Sequence, transform: Callable, seed: int = 0) -> None:
        self.split, self.transform, self.seed = split, transform, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, Any]:
        if isinstance(key, tuple):
            index, epoch = key
            image, label = self.split[index]
            with _seeded_rngs(hash((self.seed, epoch, index)) & 0x7FFF_FFFF_FFFF):
                return self.transform(image), label
        image, label = self.split[key]
        return self.transform(image), label


def build_loader(
    dataset: Dataset, sampler: ShardedSampler, batch_size: int, *, workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        drop_last=False,  # the sampler already sized every shard
        # Not fork: a process forked after its parent read array_record records can deadlock on a
        # reader thread's copied lock (see tfds_source.py); forkserver children start clean.
        multiprocessing_context="forkserver" if workers > 0 else None,
    )
