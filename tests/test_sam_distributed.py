"""SAM under data parallelism: two gloo processes on CPU against one process on the whole batch.

Each rank holds b examples of a 2b batch and uses sharpness_m = b, so every rank is one sub-batch of
the single-process run on the 2b batch with sharpness_m = b: after the all-reduce (the mean over
ranks) the gradients must agree. The two processes run once per module (the ``ranks`` fixture) and
save what they saw; the tests compare.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pf_sweep.optim import SAM

WORLD = 2
B = 4  # examples per rank
NUM_CLASSES = 5
RHO = 0.1


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 5 * 5, NUM_CLASSES),
    ).double()


def full_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(WORLD * B, 2, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (WORLD * B,), generator=g)
    return x, y


def shard(rank: int, seed: int = 1):
    x, y = full_batch(seed)
    return x[rank * B : (rank + 1) * B], y[rank * B : (rank + 1) * B]


class RecordingDDP(DistributedDataParallel):
    """DDP that notes, at every forward, whether it would all-reduce in backward (False under no_sync)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.grad_sync_at_forward: list[bool] = []

    def forward(self, *args, **kwargs):
        self.grad_sync_at_forward.append(bool(self.require_backward_grad_sync))
        return super().forward(*args, **kwargs)


def sam_grads(model: nn.Module, net: nn.Module, x, y, m: int, sync: bool = True) -> list[torch.Tensor]:
    sam = SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=RHO)
    sam.backward(net, x, y, F.cross_entropy, sharpness_m=m, sync=sync)
    return [p.grad.detach().clone() for p in model.parameters()]


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x, y = shard(rank)
        results = {}
        model = make_model()
        results["plain"] = sam_grads(model, model, x, y, m=B)
        model = make_model()
        ddp = RecordingDDP(model)
        results["ddp"] = sam_grads(model, ddp, x, y, m=B // 2)
        results["ddp_grad_sync_at_forward"] = ddp.grad_sync_at_forward
        model = make_model()
        results["no_sync"] = sam_grads(model, model, x, y, m=B, sync=False)

        # two accumulation micro-batches, all-reduced only at the last one
        model = make_model()
        net = DistributedDataParallel(model)
        sam = SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=RHO)
        for seed, sync in ((1, False), (2, True)):
            sam.backward(net, *shard(rank, seed), F.cross_entropy, sharpness_m=B, accum_steps=2, sync=sync)
        results["accum"] = [p.grad.detach().clone() for p in model.parameters()]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        del net, ddp  # DDP reducers hold the process group: release them before tearing it down
        dist.barrier()  # no rank tears gloo down while its peer still talks to it (that aborted both ranks)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, list[torch.Tensor]]]:
    tmp = tmp_path_factory.mktemp("gloo")
    try:
        mp.spawn(_worker, args=(str(tmp / "rendezvous"), str(tmp)), nprocs=WORLD, join=True)
    except mp.ProcessExitedException:
        # gloo can abort a rank while it tears the process group down ("terminate called without an
        # active exception", seen under load), after both ranks saved their results: those still count.
        if not all((tmp / f"rank{r}.pt").exists() for r in range(WORLD)):
            raise
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def single_process_grads(x, y, m: int) -> list[torch.Tensor]:
    assert not dist.is_initialized()
    model = make_model()
    return sam_grads(model, model, x, y, m=m)


def assert_all_close(actual, expected) -> None:
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-12)


@pytest.mark.timeout(180)
def test_two_ranks_match_one_process_on_the_concatenated_batch(ranks):
    expected = single_process_grads(*full_batch(), m=B)
    assert_all_close(ranks[0]["plain"], expected)


@pytest.mark.timeout(180)
def test_two_ddp_ranks_with_m_sharpness_match_one_process_on_the_concatenated_batch(ranks):
    expected = single_process_grads(*full_batch(), m=B // 2)
    assert_all_close(ranks[0]["ddp"], expected)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("rank", range(WORLD))
def test_ddp_runs_clean_and_perturbed_passes_of_every_sub_batch_under_no_sync(ranks, rank):
    assert ranks[rank]["ddp_grad_sync_at_forward"] == [False] * 4  # 2 sub-batches x 2 passes


@pytest.mark.timeout(180)
@pytest.mark.parametrize("wrapper", ["plain", "ddp"])
def test_both_ranks_end_with_identical_gradients(ranks, wrapper):
    for a, b in zip(ranks[0][wrapper], ranks[1][wrapper], strict=True):
        assert torch.equal(a, b)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("rank", range(WORLD))
def test_accumulation_synced_at_last_micro_batch_matches_one_process_on_all_examples(ranks, rank):
    (x1, y1), (x2, y2) = full_batch(1), full_batch(2)
    expected = single_process_grads(torch.cat([x1, x2]), torch.cat([y1, y2]), m=B)
    assert_all_close(ranks[rank]["accum"], expected)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("rank", range(WORLD))
def test_sync_false_keeps_each_rank_local_gradient(ranks, rank):
    assert_all_close(ranks[rank]["no_sync"], single_process_grads(*shard(rank), m=B))


def test_local_gradients_of_the_shards_differ_so_the_all_reduce_is_observable():
    local = [single_process_grads(*shard(r), m=B) for r in range(WORLD)]
    diff = sum(float((a - b).abs().sum()) for a, b in zip(*local, strict=True))
    assert diff > 1e-3
