"""``train_loop(config_dict)``: what every Ray Train ``TorchTrainer`` worker runs.

It builds everything from the config (data shard, model, SAM, schedule), resumes from the latest
checkpoint when there is one, trains, evaluates every epoch and reports once per epoch (each report
is a barrier across workers and costs time, see docs/ray.md). ``run(cfg, session)`` is the same
loop against any ``Session``, which is how a trial also runs in-process.

With ``record_examples`` the loop also keeps Toneva et al.'s per-example record: the sampler's order
for the epoch is deterministic, so batch i of a rank holds the dataset indices at positions
[i * batch_size, (i + 1) * batch_size) of ``ShardedSampler.indices()``; the clean (and perturbed)
correctness of those examples is written on the device, ranks are merged once per epoch, and the
record is saved as ``examples.npz`` beside every checkpoint (``pf_sweep.checkpoint``).

A non-finite training loss raises ``TrainingDiverged`` (``pf_sweep.divergence``) naming the epoch
and the first update whose loss was not finite; see ``_LossWatch`` for how that costs no GPU sync.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pf_sweep.checkpoint import load_checkpoint, load_examples, save_checkpoint
from pf_sweep.config import TrialConfig
from pf_sweep.data import DatasetInfo, ShardedSampler, TransformedSplit, build_loader, build_transform, get_source
from pf_sweep.divergence import TrainingDiverged, reason
from pf_sweep.forgetting import FORGETTING_KEYS, ExampleRecorder
from pf_sweep.losses import build_loss, build_perturbation
from pf_sweep.models import build_model
from pf_sweep.optim import SAM
from pf_sweep.optim.build import build_optimizer, build_scheduler
from pf_sweep.session import LocalSession, RaySession, Session

logger = logging.getLogger(__name__)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train entry point (``TorchTrainer(train_loop, train_loop_config=cfg.to_dict())``)."""
    run(TrialConfig.from_dict(config), RaySession())


@dataclass
class _Data:
    train: torch.utils.data.DataLoader
    train_sampler: ShardedSampler
    val: torch.utils.data.DataLoader
    train_subset: torch.utils.data.DataLoader
    extra: dict[str, torch.utils.data.DataLoader]
    info: DatasetInfo


def _eval_loader(cfg: TrialConfig, session: Session, dataset: str, split: str, limit: int | None = None):
    source = get_source(dataset)
    hints = {"img_size": cfg.img_size, "num_classes": cfg.num_classes}
    info = source.info(cfg.data_dir, **hints)
    data = source.split(split, cfg.data_dir, **hints)
    if limit is not None and limit < len(data):
        g = torch.Generator().manual_seed(cfg.seed)
        keep = sorted(torch.randperm(len(data), generator=g)[:limit].tolist())
        from pf_sweep.data.builtin import Subset

        data = Subset(data, keep)
    ds = TransformedSplit(data, build_transform(cfg, info, training=False))
    sampler = ShardedSampler(len(ds), num_replicas=session.world_size, rank=session.rank)
    return build_loader(ds, sampler, cfg.batch_size, workers=cfg.loader_workers, pin_memory=cfg.use_gpu)


def build_data(cfg: TrialConfig, session: Session) -> _Data:
    source = get_source(cfg.dataset)
    hints = {"img_size": cfg.img_size, "num_classes": cfg.num_classes}
    info = source.info(cfg.data_dir, **hints)
    train_split = source.split(cfg.train_split, cfg.data_dir, **hints)
    train_ds = TransformedSplit(train_split, build_transform(cfg, info, training=True), seed=cfg.seed)
    sampler = ShardedSampler(
        len(train_ds),
        num_replicas=session.world_size,
        rank=session.rank,
        shuffle=True,
        seed=cfg.seed,
        batch_multiple=cfg.batch_size * cfg.grad_accum_steps,
        with_epoch=True,
    )
    if len(sampler) == 0:
        raise ValueError(
            f"Split {cfg.dataset}:{cfg.train_split} has {len(train_ds)} examples, fewer than one update "
            f"(batch_size x grad_accum_steps x num_workers = {cfg.global_batch_size})"
        )
    train = build_loader(train_ds, sampler, cfg.batch_size, workers=cfg.loader_workers, pin_memory=cfg.use_gpu)
    return _Data(
        train=train,
        train_sampler=sampler,
        val=_eval_loader(cfg, session, cfg.dataset, cfg.val_split or info.default_val_split),
        train_subset=_eval_loader(cfg, session, cfg.dataset, cfg.train_split, limit=cfg.train_eval_size),
        extra={eval_set_name(d, s): _eval_loader(cfg, session, d, s) for d, s in cfg.eval_sets},
        info=info,
    )


def eval_set_name(dataset: str, split: str) -> str:
    """``eval/<name>/top1`` key of an extra evaluation set."""
    return f"{dataset.removeprefix('tfds/')}:{split}"


def _all_reduce(t: torch.Tensor, session: Session) -> torch.Tensor:
    if session.world_size > 1 and dist.is_initialized():
        dist.all_reduce(t)
    return t


@torch.no_grad()
def _share_buffers(model: nn.Module, session: Session) -> None:
    """Every rank takes rank 0's buffers (BatchNorm running statistics) at the end of an epoch.

    SAM's passes run under ``no_sync``, so each rank's statistics drift apart, while the checkpoint
    holds rank 0's: without this, a run restarted from a checkpoint would evaluate (and train on)
    different statistics on the other ranks than the uninterrupted run did.
    """
    if session.world_size > 1 and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


@torch.no_grad()
def evaluate(model: nn.Module, loader, session: Session, amp: bool) -> dict[str, float]:
    """Loss (CE, no smoothing), top-1 and top-5 over the whole split, summed across ranks.

    Labels are class ids, or label sets (ImageNet ReaL) as rows padded with -1: see ``_label_set_sums``.
    """
    model.eval()
    device = session.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with _autocast(device, amp):
            logits = model(x).float()
        if y.dim() == 2:
            sums += _label_set_sums(logits, y)
            continue
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hit = top == y[:, None]
        sums += torch.stack(
            [
                nn.functional.cross_entropy(logits, y, reduction="sum"),
                hit[:, 0].sum(),
                hit.any(dim=-1).sum(),
                torch.tensor(float(len(y)), device=device),
            ]
        ).double()
    loss, top1, top5, n = _all_reduce(sums, session).tolist()
    model.train()
    n = max(n, 1.0)
    return {"loss": loss / n, "top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def _label_set_sums(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[loss, top1, top5, count] of a batch whose labels are sets: rows of class ids padded with -1.

    Images with an empty set (ReaL leaves ambiguous ones unlabelled) are left out of every sum and
    of the count. A top-k hit is a valid label among the k best predictions (top-1: the ReaL
    accuracy). The loss is -log of the probability on the valid labels, -log sum_{c in set} p_c: the
    cross-entropy when the set holds one label.
    """
    classes = logits.shape[-1]
    member = torch.zeros(len(y), classes + 1, dtype=torch.bool, device=y.device)  # column C: the padding
    member.scatter_(1, torch.where(y < 0, classes, y), True)
    member = member[:, :classes]  # (B, C)
    keep = member.any(dim=-1)
    hit = member.gather(1, logits.topk(min(5, logits.shape[-1]), dim=-1).indices)
    loss = -logits.log_softmax(dim=-1).masked_fill(~member, float("-inf")).logsumexp(dim=-1)
    return torch.stack([loss[keep].sum(), hit[keep, 0].sum(), hit[keep].any(dim=-1).sum(), keep.sum()]).double()


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


class _SnpAnchor:
    """Shrink and perturb: before each update w <- s w0 + (1 - s) w, s = snp_factor * lr / peak lr."""

    def __init__(self, model: nn.Module, factor: float) -> None:
        self.factor = factor
        self.tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        self.initial = [t.detach().clone() for t in self.tensors]

    @torch.no_grad()
    def apply(self, lr: float, peak_lr: float) -> None:
        s = self.factor * lr / peak_lr
        torch._foreach_lerp_(self.tensors, self.initial, s)


def run(cfg: TrialConfig, session: Session) -> None:
    """Train one trial against ``session`` (Ray worker or in-process)."""
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    data = build_data(cfg, session)
    model = build_model(cfg, data.info)
    model = session.prepare_model(model)
    bare = model.module if hasattr(model, "module") else model
    loss_fn = build_loss(cfg.loss, smoothing=cfg.smoothing, bce_reduction=cfg.bce_reduction)
    perturb_fn = build_perturbation(cfg.perturbation, obf_C=cfg.obf_C, obf_gamma=cfg.obf_gamma, obf_sigmoid=cfg.obf_sigmoid)
    optimizer = build_optimizer(bare, cfg, rank=session.rank)
    updates_per_epoch = len(data.train) // cfg.grad_accum_steps
    scheduler = build_scheduler(optimizer, cfg, updates_per_epoch)
    snp = _SnpAnchor(bare, cfg.snp_factor) if cfg.snp_factor > 0 else None
    recorder = (
        ExampleRecorder(data.train_sampler.size, session.device, has_perturbed=cfg.uses_sam) if cfg.record_examples else None
    )

    start_epoch, step, history = 0, 0, []
    checkpoint = session.latest_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, map_location=session.device)
        bare.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if snp is not None:
            snp.initial = [t.to(session.device) for t in state["snp_initial"]]
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(_as_tuple(state["rng"]["python"]))
        start_epoch, step, history = state["epoch"] + 1, state["step"], state["history"]
        if recorder is not None:
            _resume_record(recorder, checkpoint, start_epoch)
        logger.info("resumed from %s at epoch %d", checkpoint, start_epoch)

    peak_lr = cfg.resolved_lr
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        train_stats, step = _train_epoch(
            cfg, session, model, data, optimizer, scheduler, loss_fn, perturb_fn, snp, epoch, step, peak_lr, recorder
        )
        scheduler.step(epoch + 1)
        epoch_s = time.perf_counter() - t0
        _share_buffers(bare, session)
        val = evaluate(bare, data.val, session, cfg.amp)
        eval_s = time.perf_counter() - t0 - epoch_s
        metrics: dict[str, float] = {
            "epoch": float(epoch),
            "step": float(step),
            "lr": float(optimizer.param_groups[0]["lr"]),
            "rho": float(optimizer.rho) if isinstance(optimizer, SAM) else 0.0,
            **train_stats,
            "val/loss": val["loss"],
            "val/top1": val["top1"],
            "val/top5": val["top5"],
            "time/epoch_s": epoch_s,
            "time/eval_s": eval_s,
            "time/samples_per_s": len(data.train) * cfg.batch_size * session.world_size / epoch_s,
        }
        last = epoch == cfg.epochs - 1
        if last:
            train_top1 = evaluate(bare, data.train_subset, session, cfg.amp)["top1"]
            metrics["eval/train_subset/top1"] = train_top1
            metrics["gen_gap"] = train_top1 - val["top1"]
            for name, loader in data.extra.items():
                metrics[f"eval/{name}/top1"] = evaluate(bare, loader, session, cfg.amp)["top1"]
            if cfg.eval_suite and session.rank == 0:  # the release's stand-alone evaluation, on rank 0
                from pf_sweep.evaluate import evaluate_model

                metrics.update(evaluate_model(bare, cfg, cfg.eval_suite, batch_size=cfg.batch_size, native=data.info.image_size))
                bare.train()
        history.append(metrics)
        write = None
        if last or (epoch + 1) % cfg.checkpoint_every == 0:
            state = {
                "model": bare.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch,
                "step": step,
                "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate())},
            }
            if snp is not None:
                state["snp_initial"] = snp.initial

            write = functools.partial(
                _write_checkpoint, state=state, config=cfg.to_dict(), history=list(history), recorder=recorder
            )

        session.report(metrics, write)
        if session.rank == 0:
            logger.info("epoch %d: val/top1 %.2f train/loss %.4f", epoch, val["top1"], metrics["train/loss"])


def _write_checkpoint(
    directory: Path, *, state: dict, config: dict, history: list[dict], recorder: ExampleRecorder | None = None
) -> None:
    # The record is read here, not when the partial is built: only the rank that writes pays for it,
    # and it cannot change in between (the loop waits for the report that calls this).
    save_checkpoint(directory, state, config, history, examples=recorder.arrays() if recorder is not None else None)


def _resume_record(recorder: ExampleRecorder, checkpoint: str, start_epoch: int) -> None:
    arrays = load_examples(checkpoint)
    if arrays is None:
        logger.warning("checkpoint %s has no example record: recording starts at epoch %d", checkpoint, start_epoch)
        return
    recorder.load_arrays(arrays, before_epoch=start_epoch)


def _all_reduce_min(session: Session):
    """In-place elementwise-min all-reduce across ranks, or None on a single rank."""
    if session.world_size > 1 and dist.is_initialized():
        return functools.partial(dist.all_reduce, op=dist.ReduceOp.MIN)
    return None


def _as_tuple(x: Any) -> Any:
    """weights_only loading turns tuples into lists; ``random.setstate`` wants the tuples back."""
    return tuple(_as_tuple(v) for v in x) if isinstance(x, list | tuple) else x


class _LossWatch:
    """Finds the first non-finite training loss of an epoch without a GPU sync per step.

    On the device it keeps whether every loss so far was finite, how many were, and the first one
    that was not (a few scalar kernels per micro-batch, never read back on the way). On the CPU the
    flag is read after every micro-batch, a plain memory read, so the loop stops before applying the
    update. On a GPU the flag is copied each micro-batch, without blocking, into pinned host memory
    and that copy is read: it trails the device by the steps queued ahead, so the loop stops within
    a few updates. ``check`` (called where the loop syncs anyway: the log line, the end of the
    epoch) reads the flag itself, so a divergence never reaches a report. Either way the reason
    names the first non-finite update, read from the device only then.
    """

    def __init__(self, device: torch.device, epoch: int, first_step: int, accum: int) -> None:
        self.epoch, self.first_step, self.accum = epoch, first_step, accum
        self.ok = torch.ones((), dtype=torch.bool, device=device)
        self.finite = torch.zeros((), dtype=torch.int64, device=device)  # micro-batches before the first bad one
        self.first_bad = torch.zeros((), dtype=torch.float32, device=device)
        self.eager = device.type == "cpu"
        self.host = torch.ones((), dtype=torch.bool, pin_memory=True) if device.type == "cuda" else None

    def update(self, loss: torch.Tensor) -> None:
        """Fold in one micro-batch's loss; raises ``TrainingDiverged`` once the host can see it without waiting."""
        loss = loss.detach().float()
        self.first_bad = torch.where(self.ok, loss, self.first_bad)
        self.ok &= torch.isfinite(loss)
        self.finite += self.ok
        if self.eager:
            self.check()
        elif self.host is not None:
            self.host.copy_(self.ok, non_blocking=True)
            if not self.host.item():  # a pinned CPU tensor: no sync
                self.fail()

    def check(self) -> None:
        """Raise if any loss so far was not finite (reads the device flag: call it where the loop syncs anyway)."""
        if not self.ok.item():
            self.fail()

    def fail(self) -> None:
        step = self.first_step + int(self.finite.item()) // self.accum
        raise TrainingDiverged(reason(self.first_bad.item(), self.epoch, step))


def _train_epoch(cfg, session, model, data, optimizer, scheduler, loss_fn, perturb_fn, snp, epoch, step, peak_lr, recorder=None):
    """One pass over this worker's shard; returns epoch-averaged metrics (averaged over workers too)."""
    model.train()
    device = session.device
    data.train_sampler.set_epoch(epoch)
    if recorder is not None:
        recorder.start_epoch(epoch, data.train_sampler.indices())
    accum = cfg.grad_accum_steps
    keys = ["loss", "perturb_loss", "top1", *FORGETTING_KEYS] if cfg.uses_sam else ["loss", "top1"]
    sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    watch = _LossWatch(device, epoch, step + 1, accum)
    n_batches = 0
    for i, (x, y) in enumerate(data.train):
        if i >= len(data.train) // accum * accum:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last_micro = (i + 1) % accum == 0
        if snp is not None and i % accum == 0:
            snp.apply(optimizer.param_groups[0]["lr"], peak_lr)
        with _autocast(device, cfg.amp):
            if cfg.uses_sam:
                stats = optimizer.backward(
                    model,
                    x,
                    y,
                    loss_fn,
                    perturb_fn,
                    sharpness_m=cfg.sharpness_m,
                    accum_steps=accum,
                    sync=last_micro,
                    per_example=recorder is not None,
                )
                if recorder is not None:
                    recorder.record(i * cfg.batch_size, y, stats["correct"], stats["correct_perturbed"])
                values = [stats["loss"], stats["perturb_loss"], stats["clean_top1"], *(stats[k] for k in FORGETTING_KEYS)]
            else:
                sync = contextlib.nullcontext() if last_micro or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    logits = model(x)
                    loss = loss_fn(logits, y)
                    (loss / accum).backward()
                correct = logits.detach().argmax(-1) == y
                if recorder is not None:
                    recorder.record(i * cfg.batch_size, y, correct, None)
                values = [loss.detach(), correct.float().mean()]
        watch.update(values[0])
        sums += torch.stack([v.double() for v in values])
        n_batches += 1
        if last_micro:
            if cfg.clip_grad is not None:
                nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            scheduler.step_update(num_updates=step)
            if cfg.log_every and session.rank == 0 and step % cfg.log_every == 0:
                logger.info("epoch %d step %d loss %.4f", epoch, step, values[0].item())
                watch.check()
    if recorder is not None:
        recorder.end_epoch(_all_reduce_min(session))
    avg = (_all_reduce(sums, session) / (max(n_batches, 1) * session.world_size)).tolist()
    watch.check()  # the line above synced: free
    out = {}
    for key, value in zip(keys, avg, strict=True):
        name = f"forget/{key}" if key in FORGETTING_KEYS else f"train/{key}"
        out[name] = 100.0 * value if key == "top1" else value
    return out, step


def run_local(cfg: TrialConfig, directory: str | Path | None = None) -> LocalSession:
    """The same loop in this process, no Ray; returns the session holding history and checkpoint."""
    session = LocalSession(directory, device="cuda" if cfg.use_gpu else "cpu")
    run(cfg, session)
    return session
